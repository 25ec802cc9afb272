"""The hostile bucket (devnet/hostile_s3.py) does each lie it is told to; what each costs a naive reader.

Every test talks to the proxy with `transport.bucket.Bucket` (boto3) and real rclone behind it. The
raw client calls (`stat`, `head`, `get`) are shown being fooled — a forged LastModified is believed, a
swapped body is returned, a trickle is read to the end, a short Content-Length truncates silently —
which pins down that the adversary works and what each lie costs a naive reader. Where a defence sits
on the same call (no redirect followed, a declared length longer than the body is an error), it is
shown here too; the shard path's defences are in tests/test_hostile_shard_path.py.
"""

from __future__ import annotations

import socket
import threading
import time
from datetime import UTC, datetime, timedelta

import pytest
from botocore.exceptions import IncompleteReadError
from pydantic import SecretStr

from devnet.s3 import S3Server
from tests.plugins.hostile_s3 import Behaviour, ClientInfo, HostileS3
from tests.plugins.hostile_shards import (
    FAST,
    A,
    B,
    timed,
)
from transport.bucket import (
    AccessDenied,
    Bucket,
    ObjectChanged,
    StorageConfig,
    StorageError,
    StorageUnavailable,
    read_capped,
)


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
