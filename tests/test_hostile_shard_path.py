"""The shard path a node reads peers' shards with is not fooled by the hostile bucket (issue 14).

Next to each lie of tests/test_hostile_s3.py, the defence on the path a node actually reads peers' shards
with (`Bucket.fetch` under a deadline, `transport.fetch.ShardSource`, `transport.watch.UploadWatcher`;
docs/protocol.md §5.1): no time field is ever asked for, bytes must match the pinned content hash, every
download ends at its deadline, a hung server holds neither a slot nor the watcher's round.
"""

from __future__ import annotations

import time
from datetime import timedelta

from protocol.gather import FetchOutcome
from protocol.storage_keys import gradient_key
from protocol.wire import RejectReason
from tests.plugins.hostile_s3 import Behaviour, HostileS3
from tests.plugins.hostile_shards import (
    FAST,
    KEYS,
    NETUID,
    RULES,
    SLACK_S,
    WINDOW,
    content_hash,
    shard_source,
    signed_shard,
    timed,
    upload,
    warm_pool,
)
from transport.bucket import Bucket, DeadlineExceeded
from transport.fetch import CHANGED_PIN, GIVE_UP_S
from transport.watch import UploadWatcher


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
