"""The hostile bucket (devnet/hostile_s3.py) does each lie it is told to, and the shard path is not fooled.

Every test talks to the proxy with `transport.bucket.Bucket` (boto3) and real rclone behind it. The
raw client calls (`stat`, `head`, `get`) are shown being fooled — a forged LastModified is believed, a
swapped body is returned, a trickle is read to the end, a short Content-Length truncates silently —
which pins down that the adversary works and what each lie costs a naive reader. Next to each, the
defence of issue 14 on the path a node actually reads peers' shards with (`Bucket.fetch` under a
deadline, `transport.fetch.ShardSource`, `transport.watch.UploadWatcher`; docs/protocol.md §5.1) is
shown not to be: no time field is ever asked for, bytes must match the pinned content hash, every
download ends at its deadline, a hung server holds neither a slot nor the watcher's round.
"""

from __future__ import annotations

import socket
import threading
import time
from datetime import UTC, datetime, timedelta

import pytest
import torch
from bittensor.sp_core import Keypair
from botocore.exceptions import IncompleteReadError
from pydantic import SecretStr

from devnet.s3 import S3Server
from protocol.codec import Compressor
from protocol.gather import FetchOutcome
from protocol.hparams import load_hparams
from protocol.storage_keys import gradient_key
from protocol.wire import RejectReason, ShardRules, read_shard, write_shard
from tests.plugins.hostile_s3 import Behaviour, ClientInfo, HostileS3
from transport.bucket import (
    AccessDenied,
    Bucket,
    DeadlineExceeded,
    ObjectChanged,
    StorageConfig,
    StorageError,
    StorageUnavailable,
    read_capped,
)
from transport.fetch import CHANGED_PIN, GIVE_UP_S, BucketPool, ShardSource
from transport.watch import UploadWatcher

# One attempt of 1 s at most, two attempts: a hang costs ~2 s here instead of TEST_STORAGE's 3 x 20 s.
FAST = StorageConfig(
    connect_timeout_s=1.0, read_timeout_s=1.0, max_attempts=2, backoff_base_s=0.05, backoff_max_s=0.1
)
A = b"A" * 1000
B = b"B" * 1000
SLACK_S = 0.5  # thread start-up and scheduling on 2 shared cores, on top of a deadline

# Small signed shards for the shard path (the wire format of tests/test_wire.py, a two-tensor model).
HP = load_hparams("tiny")
RULES = ShardRules(HP.sparseloco, 16, HP.revision(), {"layer.w": (128, 96), "layer.b": (96,)})
NETUID, WINDOW = 7, 42
KEYS = [Keypair.create_from_uri(f"//hostile-s3-{i}") for i in range(5)]


def signed_shard(keypair: Keypair, seed: int = 0) -> bytes:
    gen = torch.Generator().manual_seed(seed)
    update = {name: torch.randn(shape, generator=gen) for name, shape in RULES.shapes.items()}
    return write_shard(Compressor(HP.sparseloco).encode_all(update), keypair=keypair, netuid=NETUID,
                       window=WINDOW, revision=HP.revision(), data_digest="d1" * 16, debug_values=torch.zeros(16))


def content_hash(blob: bytes, keypair: Keypair) -> str:
    return read_shard(blob, shard_source(None, [keypair]).expectation(keypair.ss58_address)).header.content_hash


def shard_source(proxy: HostileS3 | None, keypairs: list[Keypair], *, window_s: float = 5.0, object_s: float = 5.0,
                 pinned: dict[str, str] | None = None, storage: StorageConfig = FAST) -> ShardSource:
    """A validator's window fetch of these hotkeys' shards, every one from the proxy's bucket."""
    config = proxy.bucket(storage=storage).config if proxy is not None else None
    creds = {k.ss58_address: config for k in keypairs} if config is not None else {}
    return ShardSource(warm_pool(storage, config), creds, NETUID, WINDOW, RULES, object_s, window_s, pinned)


def warm_pool(storage: StorageConfig, config=None) -> BucketPool:
    """A pool with its client already made, as a running node's is (making a boto3 client costs CPU)."""
    pool = BucketPool(storage)
    if config is not None:
        pool.get(config)
    return pool


def upload(hostile_s3: HostileS3, s3_bucket: Bucket, keypairs: list[Keypair]) -> dict[str, bytes]:
    blobs = {k.ss58_address: signed_shard(k, i) for i, k in enumerate(keypairs)}
    for hotkey, blob in blobs.items():
        s3_bucket.put(gradient_key(WINDOW, hotkey), blob)
    return blobs


def timed(fn):
    started = time.monotonic()
    try:
        return fn(), time.monotonic() - started
    except Exception as exc:  # noqa: BLE001 - the test inspects it
        return exc, time.monotonic() - started


def test_honest_by_default_and_the_clients_own_signature_is_checked(
    hostile_s3: HostileS3, s3_bucket: Bucket, s3_server: S3Server
):
    """Without rules it is a transparent proxy: same answers as rclone, requests forwarded as signed
    (Host preserved, nothing re-signed), so a wrong secret is still refused by rclone itself."""
    writer = hostile_s3.bucket(write=True)
    writer.put("g/1", A)
    reader = hostile_s3.bucket()
    assert reader.get("g/1", 10_000) == A == s3_bucket.get("g/1", 10_000)
    assert reader.stat("g/1") == s3_bucket.stat("g/1")
    assert reader.head("g/1") == s3_bucket.head("g/1")
    assert [o.key for o in reader.list("g/")] == ["g/1"]
    assert not any(s.resigned for s in hostile_s3.requests)
    assert {s.client.access_key for s in hostile_s3.requests} == {
        s3_server.write_key.access_key,
        s3_server.read_key.access_key,
    }

    cfg = reader.config.model_copy(update={"secret_access_key": SecretStr("x" * 40)})
    with pytest.raises(AccessDenied):
        Bucket(cfg, FAST).head("g/1")


@pytest.mark.parametrize("shift", [timedelta(minutes=-10), timedelta(hours=3)], ids=["earlier", "later"])
def test_forged_last_modified_is_believed_in_listing_and_head(
    hostile_s3: HostileS3, s3_bucket: Bucket, shift: timedelta
):
    """Listing `<LastModified>` (what `Bucket.stat` reports) and the HEAD/GET `Last-Modified` header
    both carry the forged time; only matching keys are touched. The shard path never asks for either:
    see `test_the_shard_path_asks_for_no_time_and_one_object`."""
    s3_bucket.put("gradient/5/x", A)
    s3_bucket.put("other/5/x", A)
    truth_ms, truth_s = (
        s3_bucket.stat("gradient/5/x").last_modified,
        s3_bucket.head("gradient/5/x").last_modified,
    )
    hostile_s3.behave("gradient/*", Behaviour(last_modified=shift))
    reader = hostile_s3.bucket()

    assert reader.stat("gradient/5/x").last_modified == truth_ms + shift  # fooled: believed as is
    assert reader.head("gradient/5/x").last_modified == truth_s + shift
    listed = {o.key: o.last_modified for o in reader.list("")}
    assert listed["gradient/5/x"] == truth_ms + shift
    assert listed["other/5/x"] == s3_bucket.stat("other/5/x").last_modified
    assert reader.get("gradient/5/x", 10_000) == A


def test_forged_absolute_time_and_only_in_listings(hostile_s3: HostileS3, s3_bucket: Bucket):
    """An absolute time, limited to listings by `ops`: HEAD still tells the truth, so the two disagree."""
    s3_bucket.put("g/1", A)
    s3_bucket.put("g/a b+c&d", A)  # listed URL-encoded (boto3 asks for EncodingType=url) and XML-escaped
    forged = datetime(2020, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)
    hostile_s3.behave("g/*", Behaviour(last_modified=forged), ops={"LIST"})
    reader = hostile_s3.bucket()
    assert reader.stat("g/1").last_modified == forged
    assert {o.key: o.last_modified for o in reader.list("g/")} == {"g/1": forged, "g/a b+c&d": forged}
    assert reader.head("g/1").last_modified == s3_bucket.head("g/1").last_modified != forged


def test_rclone_honours_client_mtime_and_the_proxy_can_strip_or_forge_it(
    hostile_s3: HostileS3, s3_bucket: Bucket
):
    """rclone itself takes an object's listed time from the uploader's `X-Amz-Meta-Mtime` (HEAD keeps
    the real upload second): any uploader picks its own on-time stamp, no lying server needed. The
    proxy can also strip that header (rclone's clock wins) or stamp a time of its own choosing, which
    needs re-signing the PUT towards rclone."""
    claimed, stamped = 1_000_000_000.5, datetime(2021, 6, 1, tzinfo=UTC)
    hostile_s3.behave("m/strip", Behaviour(client_mtime="strip"), ops={"PUT"})
    hostile_s3.behave("m/stamp", Behaviour(client_mtime=stamped), ops={"PUT"})
    writer = hostile_s3.bucket(write=True)
    before = datetime.now(UTC) - timedelta(seconds=5)

    s3_bucket.client.put_object(
        Bucket=s3_bucket.name, Key="m/direct", Body=A, Metadata={"mtime": str(claimed)}
    )
    for key in ("m/honour", "m/strip", "m/stamp"):
        writer.client.put_object(Bucket=writer.name, Key=key, Body=A, Metadata={"mtime": str(claimed)})
    writer.put("m/plain", A)  # Bucket.put sends no mtime; the proxy stamps only m/stamp anyway

    listed = {o.key: o.last_modified for o in s3_bucket.list("m/")}
    assert listed["m/direct"] == listed["m/honour"] == datetime.fromtimestamp(claimed, UTC)
    assert s3_bucket.head("m/direct").last_modified >= before  # HEAD: the real upload time
    assert listed["m/strip"] >= before and listed["m/plain"] >= before
    assert listed["m/stamp"] == stamped
    resigned = {s.key for s in hostile_s3.requests if s.resigned}
    assert resigned == {"m/strip", "m/stamp"}


def test_head_says_a_get_returns_b(hostile_s3: HostileS3, s3_bucket: Bucket):
    """A same-size swap between HEAD (and listing) and GET fools a plain `get`: it returns B while
    stat/head describe A. A different size is caught by the size check as ObjectChanged. (Shards are
    pinned by content hash instead: `test_a_swapped_shard_is_refused_against_its_pin`.)"""
    s3_bucket.put("g/1", A)
    hostile_s3.behave("g/*", Behaviour(bodies=(B,)), ops={"GET"})
    reader = hostile_s3.bucket()
    info = reader.stat("g/1")
    assert (info.size, info.etag) == (len(A), s3_bucket.stat("g/1").etag)
    assert reader.get("g/1", 10_000) == B  # fooled

    hostile_s3.behave("g/*", Behaviour(bodies=(B[:10],)), ops={"GET"})
    with pytest.raises(ObjectChanged):
        reader.get("g/1", 10_000)


def test_alternating_bodies_per_request(hostile_s3: HostileS3, s3_bucket: Bucket):
    """bodies=(A, B): successive GETs get A, B, A, ... — two nodes fetching in turn get different objects."""
    s3_bucket.put("g/1", A)
    hostile_s3.behave("g/*", Behaviour(bodies=(A, B)), ops={"GET"})
    reader = hostile_s3.bucket()
    assert [reader.get("g/1", 10_000) for _ in range(4)] == [A, B, A, B]


def test_ranged_gets_are_cut_from_the_swapped_body(hostile_s3: HostileS3, s3_bucket: Bucket):
    s3_bucket.put("g/1", A)
    hostile_s3.behave("g/*", Behaviour(bodies=(bytes(range(256)) * 4,)), ops={"GET"})
    r = hostile_s3.bucket().client.get_object(Bucket=hostile_s3.bucket_name, Key="g/1", Range="bytes=10-19")
    assert r["ContentRange"] == "bytes 10-19/1024"
    assert r["Body"].read() == bytes(range(10, 20))


def test_answers_differently_per_client(hostile_s3: HostileS3, s3_bucket: Bucket, s3_server: S3Server):
    """By access key id (the owner's write key vs the published read key), by listener (one port per
    simulated node address: on chain every node reads with the same read key) or by any predicate."""
    s3_bucket.put("g/1", A)
    hostile_s3.behave("g/*", Behaviour(bodies=(B,)), client=s3_server.read_key.access_key)
    hostile_s3.behave("g/*", Behaviour(bodies=(b"N" * len(A),)), client="node-b")
    hostile_s3.behave(
        "g/*",
        Behaviour(last_modified=timedelta(minutes=-5)),
        ops={"LIST"},
        client=lambda who: who.listener == "validator",
    )

    assert hostile_s3.bucket(write=True).get("g/1", 10_000) == A  # the owner sees the truth
    assert hostile_s3.bucket().get("g/1", 10_000) == B  # readers on the default listener
    assert hostile_s3.bucket(via="node-b").get("g/1", 10_000) == b"N" * len(A)
    truth = s3_bucket.stat("g/1").last_modified
    assert hostile_s3.bucket(via="validator").stat("g/1").last_modified == truth - timedelta(minutes=5)
    assert hostile_s3.bucket(via="node-b").stat("g/1").last_modified == truth
    assert hostile_s3.endpoint_for("node-b") != hostile_s3.endpoint
    assert isinstance(hostile_s3.requests[0].client, ClientInfo)


def test_trickle_is_not_bounded_by_the_read_timeout(hostile_s3: HostileS3, s3_bucket: Bucket):
    """300 bytes at 200 B/s take ~1.5 s; the per-read timeout (1 s) never fires because bytes keep
    coming, so a plain `get` has no bound on a download's total time (`Bucket.fetch` has one:
    `test_fetch_cuts_a_trickle_off_at_its_deadline`)."""
    body = bytes(300)
    s3_bucket.put("g/1", body)
    hostile_s3.behave("g/*", Behaviour(trickle_bps=200), ops={"GET"})
    got, elapsed = timed(lambda: hostile_s3.bucket(storage=FAST).get("g/1", 10_000))
    assert got == body
    assert 1.3 <= elapsed <= 4.0
    assert hostile_s3.wait_idle()
    seen = next(s for s in hostile_s3.requests if s.op == "GET")
    assert seen.headers_sent is not None and seen.body_bytes_sent == 300
    rate = 300 / (seen.finished - seen.headers_sent)
    assert 150 <= rate <= 230


@pytest.mark.parametrize("hang", ["before_headers", "after_headers"])
def test_hang_costs_attempts_times_read_timeout(hostile_s3: HostileS3, s3_bucket: Bucket, hang: str):
    """A server that never answers (or sends headers, then nothing) is given up by a plain `get` after
    each attempt's read timeout: 2 x 1 s here; with TEST_STORAGE 3 x 20 s, with the default
    StorageConfig 5 x 60 s. (A window's fetch does not wait for it: `test_hung_buckets_cost_...`.)"""
    s3_bucket.put("g/1", A)
    hostile_s3.behave("g/*", Behaviour(hang=hang), ops={"GET"})
    err, elapsed = timed(lambda: hostile_s3.bucket(storage=FAST).get("g/1", 10_000))
    assert isinstance(err, StorageUnavailable) and err.attempts == 2
    assert 1.8 <= elapsed <= 6.0
    assert hostile_s3.wait_idle()
    gets = [s for s in hostile_s3.requests if s.op == "GET"]
    assert len(gets) == 2 and all(s.body_bytes_sent == 0 for s in gets)
    assert all((s.status is None) == (hang == "before_headers") for s in gets)


def test_delay_before_answering(hostile_s3: HostileS3, s3_bucket: Bucket):
    s3_bucket.put("g/1", A)
    hostile_s3.behave("g/*", Behaviour(delay_s=0.5), ops={"HEAD"})
    info, elapsed = timed(lambda: hostile_s3.bucket().head("g/1"))
    assert info.size == len(A) and elapsed >= 0.5


def test_content_length_larger_than_body_is_an_error_not_a_short_object(
    hostile_s3: HostileS3, s3_bucket: Bucket
):
    """Declared 5 bytes more than sent, then the connection closed: botocore's streaming body raises
    IncompleteReadError inside `read_capped`, a transient error, retried, ending StorageUnavailable.
    Lying on GET alone is caught earlier: its Content-Length differs from HEAD's size (ObjectChanged)."""
    s3_bucket.put("g/1", A)
    reader = hostile_s3.bucket(storage=FAST)
    hostile_s3.behave("g/*", Behaviour(content_length_delta=5), ops={"GET"})
    with pytest.raises(ObjectChanged):
        reader.get("g/1", 10_000)

    hostile_s3.behave("g/*", Behaviour(content_length_delta=5), ops={"GET", "HEAD"})
    assert reader.head("g/1").size == len(A) + 5
    with pytest.raises(StorageUnavailable, match="IncompleteRead"):
        reader.get("g/1", 10_000)

    r = reader.client.get_object(Bucket=reader.name, Key="g/1")
    got = bytearray()
    with pytest.raises(IncompleteReadError):  # botocore's check fires inside read_capped, before its own
        read_capped(
            r["Body"],
            lambda off, c: got.extend(c),
            expected=int(r["ContentLength"]),
            limit=10_000,
            where="test",
        )
    assert len(got) <= len(A)


def test_content_length_smaller_than_body_truncates_silently(hostile_s3: HostileS3, s3_bucket: Bucket):
    """Declared 5 bytes fewer (on HEAD and GET alike): a plain `get` reads what was declared and accepts
    the truncated object, which is indistinguishable from a server storing a shorter one. The proxy
    closes the connection after the extra bytes, so they cannot leak into the next response. (A shard
    cut short fails the wire reader: `test_content_length_lies_never_yield_a_shard`.)"""
    s3_bucket.put("g/1", A)
    hostile_s3.behave("g/*", Behaviour(content_length_delta=-5), ops={"GET", "HEAD"})
    reader = hostile_s3.bucket(storage=FAST)
    assert reader.get("g/1", 10_000) == A[:-5]
    assert reader.get("g/1", 10_000) == A[:-5]  # the next request on a fresh connection is clean
    get = [s for s in hostile_s3.requests if s.op == "GET"][-1]
    assert (get.declared_length, get.body_bytes_sent) == (len(A) - 5, len(A))


@pytest.fixture
def sentinel() -> tuple[str, list[object]]:
    """A loopback listener that records every connection: the place a followed redirect would reach."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    sock.settimeout(0.2)
    hits: list[object] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, addr = sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            hits.append(addr)
            conn.close()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{sock.getsockname()[1]}/latest/meta-data/", hits
    stop.set()
    thread.join(2)
    sock.close()


@pytest.mark.parametrize("status", [301, 307])
@pytest.mark.parametrize("op", ["HEAD", "GET", "LIST"])
def test_redirect_is_not_followed(hostile_s3: HostileS3, s3_bucket: Bucket, sentinel, status: int, op: str):
    """boto3 does not follow a 301/307 with a Location to another host: the request fails at once with
    the status as its code (not retried), and the redirect target is never contacted by anyone."""
    location, hits = sentinel
    s3_bucket.put("g/1", A)
    hostile_s3.behave("g/*", Behaviour(redirect=(status, location)), ops={op})
    reader = hostile_s3.bucket(storage=FAST)
    call = {
        "HEAD": lambda: reader.head("g/1"),
        "GET": lambda: reader.get("g/1", 10_000),
        "LIST": lambda: reader.list("g/"),
    }[op]
    err, elapsed = timed(call)
    assert isinstance(err, StorageError) and err.code == str(status)
    assert elapsed < 1.0 and hits == []
    redirected = [s for s in hostile_s3.requests if s.status == status]
    assert len(redirected) == 1 and not redirected[0].upstream


def test_redirect_to_cloud_metadata_address(hostile_s3: HostileS3, s3_bucket: Bucket):
    """The classic SSRF target in Location: refused the same way (nothing here connects to it)."""
    s3_bucket.put("g/1", A)
    hostile_s3.behave(
        "g/*", Behaviour(redirect=(307, "http://169.254.169.254/latest/meta-data/")), ops={"GET"}
    )
    reader = hostile_s3.bucket(storage=FAST)  # built outside the timer: a boto3 client takes ~0.3 s on a busy box
    err, elapsed = timed(lambda: reader.get("g/1", 10_000))
    # following it would spend the 1 s connect timeout on an unroutable address, per attempt
    assert isinstance(err, StorageError) and err.code == "307" and elapsed < 1.0
    redirected = [s for s in hostile_s3.requests if s.status == 307]
    assert len(redirected) == 1 and not redirected[0].upstream  # answered once, not retried


def test_close_ends_a_hang_in_flight(s3_server: S3Server, s3_bucket: Bucket):
    """close() aborts stalled connections and joins the proxy thread within seconds: a test can fail,
    never hang the suite, even with a client waiting on a 'never answer' behaviour."""
    s3_bucket.put("g/1", A)
    proxy = HostileS3.over(s3_server, bucket_name=s3_bucket.name).start()
    proxy.behave("*", Behaviour(hang="before_headers"))
    slow = StorageConfig(connect_timeout_s=1.0, read_timeout_s=30.0, max_attempts=1)
    result: list[object] = []
    worker = threading.Thread(
        target=lambda: result.append(timed(lambda: proxy.bucket(storage=slow).head("g/1")))
    )
    worker.start()
    deadline = time.monotonic() + 5
    while not proxy.requests and time.monotonic() < deadline:  # the request is in
        time.sleep(0.02)
    started = time.monotonic()
    proxy.close()
    assert time.monotonic() - started < 5.0
    worker.join(10)
    assert not worker.is_alive()
    err, elapsed = result[0]
    assert isinstance(err, StorageError) and elapsed < 10.0


def test_upstream_must_be_loopback():
    with pytest.raises(ValueError, match="loopback"):
        HostileS3("http://10.0.0.1:9000", {})
    with pytest.raises(ValueError, match="loopback"):
        HostileS3("http://example.com:9000", {})


# --- the shard path (issue 14's defences, docs/protocol.md §5.1) is not fooled -----------------------


def test_the_shard_path_asks_for_no_time_and_one_object(hostile_s3: HostileS3, s3_bucket: Bucket):
    """Forged times everywhere: a window fetch never lists or HEADs, so no time reaches a decision."""
    upload(hostile_s3, s3_bucket, KEYS[:2])
    hostile_s3.behave("gradients/*", Behaviour(last_modified=timedelta(days=-1)))
    got = shard_source(hostile_s3, KEYS[:2]).fetch([k.ss58_address for k in KEYS[:2]])
    assert all(f.ok for f in got.values()), got
    assert hostile_s3.wait_idle()
    assert sorted(s.op for s in hostile_s3.requests) == ["GET", "GET"]


def test_a_swapped_shard_is_refused_against_its_pin(hostile_s3: HostileS3, s3_bucket: Bucket):
    """Another valid shard signed by the same key (B) in place of the one seen at the deadline (A): CHANGED."""
    key = KEYS[0]
    a = upload(hostile_s3, s3_bucket, [key])[key.ss58_address]
    b = signed_shard(key, seed=99)
    hostile_s3.behave("gradients/*", Behaviour(bodies=(b,)), ops={"GET"})
    source = shard_source(hostile_s3, [key], pinned={key.ss58_address: content_hash(a, key)})
    got = source.fetch([key.ss58_address])[key.ss58_address]
    assert not got.ok and got.reason == FetchOutcome.CHANGED, got
    unpinned = shard_source(hostile_s3, [key]).fetch([key.ss58_address])[key.ss58_address]
    assert unpinned.ok and unpinned.shard.header.content_hash == content_hash(b, key)  # B itself is valid


def test_alternating_shards_are_seen_changing_and_count_for_nothing(hostile_s3: HostileS3, s3_bucket: Bucket):
    """A and B on alternate GETs: the validator's watcher sees two content hashes for one window and pins
    the hotkey to CHANGED_PIN; its shard is then refused without another request."""
    key = KEYS[0]
    a = upload(hostile_s3, s3_bucket, [key])[key.ss58_address]
    hostile_s3.behave("gradients/*", Behaviour(bodies=(a, signed_shard(key, seed=99))), ops={"GET"})
    creds = {key.ss58_address: hostile_s3.bucket(storage=FAST).config}
    pool = warm_pool(FAST, creds[key.ss58_address])
    watcher = UploadWatcher(pool, creds, NETUID, WINDOW, RULES, object_seconds=2.0, round_seconds=1.0)
    watcher.poll([key.ss58_address])
    assert watcher.snapshot()[key.ss58_address].content_hash == content_hash(a, key)  # one look: A
    watcher.poll([key.ss58_address])
    pins = {h: s.content_hash for h, s in watcher.snapshot().items()}
    assert pins == {key.ss58_address: CHANGED_PIN} and watcher.changes == {key.ss58_address: 1}
    asked = len(hostile_s3.requests)
    got = shard_source(hostile_s3, [key], pinned=pins).fetch([key.ss58_address])[key.ss58_address]
    assert got.reason == FetchOutcome.CHANGED and len(hostile_s3.requests) == asked


def test_fetch_cuts_a_trickle_off_at_its_deadline(hostile_s3: HostileS3, s3_bucket: Bucket):
    """The same 300 bytes at 200 B/s: `Bucket.fetch` reads with read1 and stops at the deadline."""
    s3_bucket.put("g/1", bytes(300))
    hostile_s3.behave("g/*", Behaviour(trickle_bps=200), ops={"GET"})
    deadline_s, reader = 0.5, hostile_s3.bucket(storage=FAST)
    err, elapsed = timed(lambda: reader.fetch("g/1", 10_000, time.monotonic() + deadline_s))
    assert isinstance(err, DeadlineExceeded), err
    assert elapsed <= deadline_s + SLACK_S  # one 50 ms slice of the trickle past the deadline, not 1.5 s


def test_hung_buckets_cost_a_window_fetch_its_deadline_not_their_socket_timeout(
    hostile_s3: HostileS3, s3_bucket: Bucket
):
    """Three of four buckets never answer, only two downloads may run at once, and the object deadline
    is as long as the window's. A hung download gives its slot back at its deadline (its thread stays
    stuck in a socket read until the read timeout, 10 s), and that deadline is capped by a fair share
    of the window (time left × slots / hotkeys left), so the healthy fourth bucket, last in line, is
    still read; the fetch returns by the window deadline."""
    upload(hostile_s3, s3_bucket, KEYS[:4])
    for k in KEYS[:3]:
        hostile_s3.behave(gradient_key(WINDOW, k.ss58_address), Behaviour(hang="before_headers"), ops={"GET"})
    storage = FAST.model_copy(update={"read_timeout_s": 10.0, "max_concurrency": 2})
    window_s = object_s = 2.0
    source = shard_source(hostile_s3, KEYS[:4], window_s=window_s, object_s=object_s, storage=storage)
    got, elapsed = timed(lambda: source.fetch([k.ss58_address for k in KEYS[:4]]))
    assert got[KEYS[3].ss58_address].ok, got[KEYS[3].ss58_address]
    assert [got[k.ss58_address].reason for k in KEYS[:3]] == [FetchOutcome.TIMEOUT] * 3
    assert elapsed <= window_s + GIVE_UP_S + SLACK_S  # not 10 s, and not a second of grace for nothing


def test_watcher_rounds_are_bounded_and_a_hung_server_holds_one_read(hostile_s3: HostileS3, s3_bucket: Bucket):
    """A silent server misses the round instead of stretching it (that would move the deadline look),
    and is not asked again while its first read is still stuck."""
    silent, honest = KEYS[0], KEYS[1]
    upload(hostile_s3, s3_bucket, [silent, honest])
    key = gradient_key(WINDOW, silent.ss58_address)
    hostile_s3.behave(key, Behaviour(hang="before_headers"), ops={"GET"})
    storage = FAST.model_copy(update={"read_timeout_s": 10.0})
    creds = {k.ss58_address: hostile_s3.bucket(storage=storage).config for k in (silent, honest)}
    pool = warm_pool(storage, creds[honest.ss58_address])
    watcher = UploadWatcher(pool, creds, NETUID, WINDOW, RULES, object_seconds=5.0, round_seconds=0.3)
    for _ in range(3):
        _, elapsed = timed(lambda: watcher.poll([silent.ss58_address, honest.ss58_address]))
        assert elapsed <= watcher.budget + SLACK_S
    assert set(watcher.snapshot()) == {honest.ss58_address}
    assert sum(1 for s in hostile_s3.requests if s.key == key) == 1  # rounds 2 and 3 did not ask again


def test_content_length_lies_never_yield_a_shard(hostile_s3: HostileS3, s3_bucket: Bucket):
    """Declared 5 more: the short body is an error (retried, then given up). Declared 5 fewer: the
    truncated shard fails the wire reader with its reason. Neither is ever accepted."""
    key = KEYS[0]
    upload(hostile_s3, s3_bucket, [key])
    hostile_s3.behave("gradients/*", Behaviour(content_length_delta=5), ops={"GET"})
    long = shard_source(hostile_s3, [key]).fetch([key.ss58_address])[key.ss58_address]
    assert not long.ok and long.reason in (FetchOutcome.UNREACHABLE, FetchOutcome.TIMEOUT), long
    hostile_s3.behave("gradients/*", Behaviour(content_length_delta=-5), ops={"GET"})
    short = shard_source(hostile_s3, [key]).fetch([key.ss58_address])[key.ss58_address]
    assert not short.ok and short.reason in {r.value for r in RejectReason}, short
