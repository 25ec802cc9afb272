"""Every Bucket operation against a real `rclone serve s3` process, and the server process itself."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from pydantic import SecretStr

from devnet.s3 import S3Server, S3ServerError
from protocol.storage_config import MiB
from protocol.storage_keys import (
    KeyKind,
    aggregate_key,
    checkpoint_key,
    dataset_key,
    gradient_key,
    peers_key,
    window_of_key,
)
from tests.plugins.s3 import TEST_STORAGE
from transport.bucket import (
    AccessDenied,
    Bucket,
    BucketConfig,
    BucketNotFound,
    ObjectNotFound,
    ObjectTooLarge,
    StorageConfig,
    StorageError,
    StorageUnavailable,
)

ROOT = Path(__file__).resolve().parents[1]
SECRET = "s3cr3t-value-that-must-never-leak"


# -- real S3 server ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 1000, 300_000])
def test_round_trip(s3_bucket, size):
    data = os.urandom(size)
    s3_bucket.put(peers_key(3), data)
    assert s3_bucket.get(peers_key(3), max_bytes=size) == data
    info = s3_bucket.head(peers_key(3))
    assert info.size == size and info.last_modified.utcoffset().total_seconds() == 0
    assert abs(time.time() - info.last_modified.timestamp()) < 3600
    s3_bucket.delete(peers_key(3))
    with pytest.raises(ObjectNotFound):
        s3_bucket.get(peers_key(3), max_bytes=size)


def test_stat_orders_uploads_within_one_second(s3_bucket):
    """Copy detection orders uploads by time: stat must resolve what HEAD's whole seconds cannot."""
    first, second = gradient_key(5, "5Original"), gradient_key(5, "5Copy")
    s3_bucket.put(first, b"a" * 10)
    time.sleep(0.05)
    s3_bucket.put(second, b"b" * 20)
    a, b = s3_bucket.stat(first), s3_bucket.stat(second)
    assert (a.size, b.size) == (10, 20) and a.key == first
    assert a.last_modified < b.last_modified
    assert abs((a.last_modified - s3_bucket.head(first).last_modified).total_seconds()) < 1
    with pytest.raises(ObjectNotFound):  # a longer key starting with the asked one must not answer
        s3_bucket.stat(first[: -len(".safetensors")])


def test_multipart_and_ranged_parallel_download(s3_server, s3_bucket_name, tmp_path):
    storage = TEST_STORAGE.model_copy(
        update=dict(multipart_threshold=8 * MiB, part_size=5 * MiB, max_concurrency=3)
    )
    bucket = Bucket(s3_server.bucket_config(s3_bucket_name), storage)
    data = os.urandom(23 * MiB + 17)
    seen_up: list[tuple[int, int]] = []
    seen_down: list[tuple[int, int]] = []
    bucket.put(checkpoint_key(5), data, progress=lambda d, t: seen_up.append((d, t)))
    assert (
        bucket.get(checkpoint_key(5), max_bytes=len(data), progress=lambda d, t: seen_down.append((d, t)))
        == data
    )
    ops = bucket.stats.by_operation
    assert ops["UploadPart"] == 5 and ops["CompleteMultipartUpload"] == 1 and "PutObject" not in ops
    assert ops["GetObject"] == 5  # five ranges, no whole-object GET
    for seen in (seen_up, seen_down):
        done = [d for d, _ in seen]
        assert done == sorted(done) and seen[-1] == (len(data), len(data))
    src, dst = tmp_path / "in.bin", tmp_path / "out.bin"
    src.write_bytes(data[: 11 * MiB])
    bucket.put_file(checkpoint_key(5, "config.json"), src)
    assert bucket.get_file(checkpoint_key(5, "config.json"), dst, max_bytes=11 * MiB) == 11 * MiB
    assert dst.read_bytes() == src.read_bytes() and not (tmp_path / "out.bin.part").exists()


def _count_calls(bucket: Bucket, event: str) -> list[str]:
    calls: list[str] = []
    bucket.client.meta.events.register(event, lambda **kw: calls.append(event))
    return calls


def test_size_cap_refuses_without_reading_the_body(s3_bucket, tmp_path):
    s3_bucket.put(aggregate_key(1), os.urandom(2 * MiB))
    gets = _count_calls(s3_bucket, "before-call.s3.GetObject")
    with pytest.raises(ObjectTooLarge) as err:
        s3_bucket.get(aggregate_key(1), max_bytes=MiB)
    assert err.value.size == 2 * MiB and err.value.limit == MiB
    with pytest.raises(ObjectTooLarge):
        s3_bucket.get_file(aggregate_key(1), tmp_path / "x", max_bytes=MiB)
    assert gets == [] and s3_bucket.stats.bytes_downloaded == 0 and not (tmp_path / "x").exists()


def test_size_cap_holds_when_object_grows_after_head(s3_server, s3_bucket, s3_bucket_name):
    s3_bucket.put(aggregate_key(2), b"small")
    other = Bucket(s3_server.bucket_config(s3_bucket_name), TEST_STORAGE)
    fired = []

    def swap(**kw):  # another writer replaces the object between our HEAD and our GET
        if not fired:
            fired.append(1)
            other.put(aggregate_key(2), os.urandom(MiB))

    s3_bucket.client.meta.events.register("after-call.s3.HeadObject", swap)
    with pytest.raises(ObjectTooLarge):
        s3_bucket.get(aggregate_key(2), max_bytes=1000)
    assert fired and s3_bucket.stats.bytes_downloaded == 0


def test_list_paginates_by_prefix(s3_server, s3_bucket_name):
    bucket = Bucket(
        s3_server.bucket_config(s3_bucket_name), TEST_STORAGE.model_copy(update={"list_page_size": 3})
    )
    hotkeys = [f"hk{i:02d}" for i in range(10)]
    for hk in hotkeys:
        bucket.put(gradient_key(7, hk), hk.encode())
    bucket.put(gradient_key(8, "hk00"), b"other window")
    found = bucket.list("gradients/7/")
    assert [o.key for o in found] == [gradient_key(7, hk) for hk in hotkeys]
    assert [o.size for o in found] == [4] * 10
    assert bucket.stats.by_operation["ListObjectsV2"] == 4
    with pytest.raises(StorageError, match="more than 5"):
        bucket.list("gradients/7/", max_objects=5)
    assert bucket.windows(KeyKind.GRADIENT) == [7, 8]


def test_cleanup_deletes_every_kind_past_retention(s3_bucket):
    for w in range(10):
        s3_bucket.put(gradient_key(w, "hk"), b"g")
        s3_bucket.put(peers_key(w), b"p")
        s3_bucket.put(aggregate_key(w), b"a")
    for w in (0, 4):
        s3_bucket.put(checkpoint_key(w), b"m")
        s3_bucket.put(checkpoint_key(w, "config.json"), b"c")
    s3_bucket.put(dataset_key("pages/0.bin"), b"d")
    s3_bucket.put("notes/readme.txt", b"n")
    deleted = s3_bucket.cleanup(current_window=12, retention_windows=3)  # newest checkpoint 4 < 12 - 3
    assert {window_of_key(k) for k in deleted} == set(range(4)) and len(deleted) == 4 * 3 + 2
    remaining = {o.key for o in s3_bucket.list()}
    assert checkpoint_key(4) in remaining and checkpoint_key(0) not in remaining  # newest checkpoint kept ...
    assert {dataset_key("pages/0.bin"), "notes/readme.txt"} <= remaining
    # ... and every window since it, past the retention: a replay from checkpoint 4 needs their records
    assert sorted(w for k in remaining if k.startswith("peers/") for w in [window_of_key(k)]) == list(range(4, 10))
    for w in (5, 6):
        s3_bucket.put(checkpoint_key(w), b"m")
        s3_bucket.put(checkpoint_key(w, "config.json"), b"c")
    deleted = s3_bucket.cleanup(current_window=9, retention_windows=3)  # a newer checkpoint: retention rules
    assert {window_of_key(k) for k in deleted} == {4, 5}


async def test_nodes_prune_their_own_bucket_every_checkpoint_interval_and_never_fail_on_it(s3_server, s3_bucket,
                                                                                           s3_bucket_name, caplog):
    import torch

    from neurons.node import Node
    from protocol.hparams import load_hparams

    hp = load_hparams("tiny", ["checkpoints.every_windows=5", "checkpoints.retention_windows=7"])
    for w in range(12):
        s3_bucket.put(aggregate_key(w), b"a")
    node = Node(hp, None, s3_bucket, None, torch.nn.Linear(1, 1))
    assert await node.prune(11) == []  # not a checkpoint interval: nothing listed, nothing deleted
    assert sorted(window_of_key(k) for k in await node.prune(10)) == [0, 1, 2]  # older than 10 - 7
    assert sorted(window_of_key(o.key) for o in s3_bucket.list()) == list(range(3, 12))
    bad = Bucket(s3_server.bucket_config(s3_bucket_name).model_copy(
        update={"access_key_id": "UNKNOWNKEY00000000", "secret_access_key": SecretStr(SECRET)}), TEST_STORAGE)
    assert await Node(hp, None, bad, None, torch.nn.Linear(1, 1)).prune(15) == []
    assert "pruning objects older than window 8 failed" in caplog.text


def test_wrong_credentials_are_a_clear_final_error(s3_server, s3_bucket, s3_bucket_name):
    s3_bucket.put(peers_key(1), b"x")
    good = s3_server.bucket_config(s3_bucket_name)
    cases = [
        good.model_copy(update={"secret_access_key": SecretStr(SECRET)}),
        good.model_copy(
            update={"access_key_id": "UNKNOWNKEY00000000", "secret_access_key": SecretStr(SECRET)}
        ),
    ]
    for cfg in cases:
        bucket = Bucket(cfg, TEST_STORAGE)
        for op in (
            lambda b=bucket: b.get(peers_key(1), 10),
            lambda b=bucket: b.put(peers_key(2), b"y"),
            bucket.list,
        ):
            with pytest.raises(AccessDenied) as err:
                op()
            assert SECRET not in str(err.value) and SECRET not in repr(err.value)
        assert bucket.stats.retries == 0


def test_missing_bucket_is_a_clear_final_error(s3_server):
    bucket = Bucket(s3_server.bucket_config("no-such-bucket-here"), TEST_STORAGE)
    for op in (lambda: bucket.get(peers_key(1), 10), lambda: bucket.put(peers_key(1), b"y"), bucket.list):
        with pytest.raises(BucketNotFound, match="no-such-bucket-here"):
            op()
    assert bucket.stats.retries == 0


def test_retry_survives_server_restart_and_gives_up_when_down(tmp_path):
    server = S3Server(tmp_path / "s3").start()
    try:
        server.ensure_bucket("alpha")
        patient = StorageConfig(
            connect_timeout_s=1.0,
            read_timeout_s=10.0,
            max_attempts=400,
            backoff_base_s=0.05,
            backoff_max_s=0.1,
        )
        bucket = Bucket(server.bucket_config("alpha"), patient)
        port = server.port
        server.stop()
        outcome: list[object] = []
        worker = threading.Thread(
            target=lambda: outcome.append(bucket.put(peers_key(4), b"after restart") or "ok")
        )
        worker.start()
        deadline = time.monotonic() + 30
        while bucket.stats.retries < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert bucket.stats.retries >= 2 and worker.is_alive()  # it is failing and retrying, not done
        server.start()
        assert server.port == port
        worker.join(timeout=60)
        assert outcome == ["ok"]
        assert bucket.get(peers_key(4), 100) == b"after restart"
        server.stop()
        impatient = Bucket(server.bucket_config("alpha"), TEST_STORAGE)
        with pytest.raises(StorageUnavailable) as err:
            impatient.get(peers_key(4), 100)
        assert err.value.attempts == TEST_STORAGE.max_attempts and impatient.stats.retries == 2
    finally:
        server.stop()


def test_data_and_keys_survive_restart(tmp_path):
    folder = tmp_path / "s3"
    with S3Server.open(folder) as first:
        first.ensure_bucket("alpha")
        Bucket(first.bucket_config("alpha"), TEST_STORAGE).put(checkpoint_key(3), b"theta")
        creds, port = first.credentials("alpha"), first.port
    assert (folder / "credentials.json").stat().st_mode & 0o777 == 0o600
    with S3Server.open(folder, port=port) as second:
        assert second.credentials("alpha") == creds
        assert Bucket(creds.read, TEST_STORAGE).get(checkpoint_key(3), 100) == b"theta"


def test_ensure_bucket_while_running_is_visible_and_idempotent(s3_server):
    s3_server.ensure_bucket("fresh-bucket-x")
    s3_server.ensure_bucket("fresh-bucket-x")
    bucket = Bucket(s3_server.bucket_config("fresh-bucket-x"), TEST_STORAGE)
    bucket.put(peers_key(0), b"{}")
    assert bucket.list() and (s3_server.dir / "fresh-bucket-x" / "peers" / "0.json").read_bytes() == b"{}"


def test_start_failure_reports_rclone_stderr(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        server = S3Server(tmp_path / "s3", port=taken.getsockname()[1], startup_timeout_s=10)
        with pytest.raises(S3ServerError, match="(?i)address already in use"):
            server.start()
        assert not server.running


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_cli_prints_json_and_stops_cleanly(tmp_path, sig):
    proc = subprocess.Popen(
        [sys.executable, "-m", "devnet.s3", "--dir", str(tmp_path), "--bucket", "alpha", "--bucket", "beta"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        info = json.loads(line)
        assert info["buckets"] == ["alpha", "beta"] and info["endpoint"].startswith("http://127.0.0.1:")
        cfg = BucketConfig(
            endpoint_url=info["endpoint"],
            region=info["region"],
            bucket="beta",
            access_key_id=info["write"]["access_key_id"],
            secret_access_key=info["write"]["secret_access_key"],
        )
        Bucket(cfg, TEST_STORAGE).put(peers_key(1), b"cli")
        assert (tmp_path / "beta" / "peers" / "1.json").read_bytes() == b"cli"
        proc.send_signal(sig)
        assert proc.wait(timeout=30) == 0
        assert not _alive(info["pid"])
        assert (
            json.loads((tmp_path / "credentials.json").read_text())["write"]["access_key"]
            == cfg.access_key_id
        )
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
