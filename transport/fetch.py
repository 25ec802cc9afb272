"""Downloading and verifying other participants' objects: shards, and what validators publish.

`ShardSource` is the one way a node reads peers' shards for a window: it holds the window's
read credentials (from chain commitments), its chain-time bounds and a pool of bucket clients, and
`fetch(hotkeys)` downloads and verifies shards in parallel threads. Every outcome is a `Fetched`
(a verified shard or a `FetchOutcome` with its detail); a peer can never make it raise.

`first_from_validators` is the one rule for what validators publish (peer lists, aggregate records,
checkpoints): ask the validators in order of stake, skip those with no bucket commitment, take the
first object that parses; a broken object is logged and the next validator is asked.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import TypeVar

from protocol.gather import Fetched, FetchOutcome
from protocol.storage_config import BucketConfig
from protocol.storage_keys import gradient_key, mirror_key
from protocol.wire import Rejection, ShardExpectation, ShardRules, read_shard
from transport.bucket import Bucket, DeadlineExceeded, ObjectNotFound, StorageError
from transport.bucket_config import StorageConfig
from transport.chain import MetagraphSnapshot

log = logging.getLogger(__name__)
T = TypeVar("T")
# How long past its download deadline `ShardSource.fetch` still waits for a shard whose bytes all arrived
# in time: verifying it (hash, signature, content) is the reader's work, not the sender's delay. A download
# still in progress at its deadline is given up then; its thread (stuck on a silent server, or about to
# notice the deadline between two reads of a trickle) is abandoned, never waited for.
COLLECT_GRACE_S = 1.0
# A download not finished at its deadline is given up this long after it (scheduling jitter), not a grace.
GIVE_UP_S = 0.05
# A pin no bytes can match: the validator saw the hotkey stand behind two different shards during the
# window's upload phase (`transport.watch`), so none of its bytes count (CHANGED, without downloading).
CHANGED_PIN = "changed"


class BucketPool:
    """One `Bucket` (boto3 client) per distinct read configuration, created on first use."""

    def __init__(self, storage: StorageConfig | None = None):
        self.storage = storage or StorageConfig()
        self._buckets: dict[str, Bucket] = {}

    def get(self, config: BucketConfig) -> Bucket:
        key = f"{config.endpoint_url}|{config.region}|{config.bucket}|{config.access_key_id}"
        if key not in self._buckets:
            self._buckets[key] = Bucket(config, self.storage)
        return self._buckets[key]

    def all(self) -> list[Bucket]:
        return list(self._buckets.values())


def fetch_shard(
    bucket: Bucket, key: str, expected: ShardExpectation, deadline: float, pinned: str | None,
    arrived: Callable[[], None] = lambda: None,
) -> Fetched:
    """Download (one GET, capped, by `deadline`) and verify one shard.

    `pinned` is the content hash this node already holds for the shard (seen at the deadline, or
    named by the window's signed record): other bytes are refused as CHANGED, whatever they are;
    `CHANGED_PIN` refuses the shard without asking the server. `arrived()` is called once the bytes are
    in, before they are verified.
    """
    got = Fetched(expected.hotkey)
    if pinned == CHANGED_PIN:
        got.reason, got.detail = FetchOutcome.CHANGED, "showed different shards for this window while it was watched"
        return got
    try:
        data = bucket.fetch(key, expected.max_bytes, deadline)
    except ObjectNotFound:
        got.reason, got.detail = FetchOutcome.MISSING, f"no {key}"
        return got
    except DeadlineExceeded as exc:
        got.reason, got.detail = FetchOutcome.TIMEOUT, str(exc)
        return got
    except StorageError as exc:
        got.reason, got.detail = FetchOutcome.UNREACHABLE, str(exc)
        return got
    arrived()
    got.size = len(data)
    result = read_shard(data, expected)
    if isinstance(result, Rejection):
        got.reason, got.detail = result.reason.value, result.detail
    elif pinned is not None and result.header.content_hash != pinned:
        got.reason = FetchOutcome.CHANGED
        got.detail = f"content hash {result.header.content_hash[:16]}… is not the pinned {pinned[:16]}…"
    else:
        got.shard, got.raw = result, data
    return got


@dataclass(frozen=True)
class ShardSource:
    """Where and how one window's shards are read, and which bytes count. Built once per window.

    `pinned` (hotkey → content hash) is what this node accepts: a validator's deadline snapshot, or
    the hashes of the window's signed aggregate record. A shard whose hotkey is not pinned counts
    as LATE (it was not there when it had to be) when `pinned` is given. `mirror` is the record
    publisher's bucket, tried first for every shard it mirrored (`protocol.storage_keys.mirror_key`),
    so a miner's server that answers some nodes differently cannot split the network.
    `fetch` never takes longer than `window_seconds`, nor one object longer than `object_seconds`.
    """

    pool: BucketPool
    credentials: Mapping[str, BucketConfig]
    netuid: int
    window: int
    rules: ShardRules
    object_seconds: float
    window_seconds: float
    pinned: Mapping[str, str] | None = None
    mirror: BucketConfig | None = None

    def expectation(self, hotkey: str) -> ShardExpectation:
        return ShardExpectation(netuid=self.netuid, window=self.window, hotkey=hotkey, rules=self.rules)

    def fetch(self, hotkeys: list[str]) -> dict[str, Fetched]:
        """These hotkeys' shards, downloaded and verified in parallel by the window's deadline; never raises.

        At most `max_concurrency` downloads hold a slot at once, and a download holds its slot only
        until its own deadline: a server that never answers keeps its thread stuck in a socket read
        until the read timeout, but not its slot, so the next hotkey starts (a silent bucket costs one
        slot for one deadline, like a trickling one, whatever the socket timeout). A download's deadline
        is the object deadline, capped by a fair share of the window's time left (that time × slots /
        hotkeys not yet done), so however many buckets are slow or silent, every hotkey gets its turn
        before the window deadline. A shard whose bytes are not all in by its deadline is TIMEOUT at
        that moment (+`GIVE_UP_S`); one whose bytes are in gets `COLLECT_GRACE_S` more to be verified.
        So `fetch` returns within `window_seconds` (+ that grace when a shard arrived at the last
        moment), and nothing waits for a stuck thread.
        """
        if not hotkeys:
            return {}
        unique = list(dict.fromkeys(hotkeys))
        stop = time.monotonic() + self.window_seconds
        slots = max(1, min(self.pool.storage.max_concurrency, len(unique)))
        per_hotkey = self.object_seconds * (2 if self.mirror is not None else 1)  # the mirror, then the miner
        queue = deque(unique)
        running: dict[Future[Fetched], tuple[str, float]] = {}  # → (hotkey, its download deadline)
        arrived: set[str] = set()  # bytes all in, being verified
        out: dict[str, Fetched] = {}

        def give_up_at(hotkey: str, deadline: float) -> float:
            return deadline + (COLLECT_GRACE_S if hotkey in arrived else GIVE_UP_S)

        executor = ThreadPoolExecutor(max_workers=len(unique))  # threads start on demand, one per slot in use
        try:
            while True:
                now = time.monotonic()
                for future in [f for f in running if f.done()]:
                    out[running.pop(future)[0]] = future.result()
                holding = sum(1 for _, deadline in running.values() if now < deadline)
                while queue and holding < slots and now < stop:
                    hotkey = queue.popleft()
                    # a fair share of the time left: even if every download from now on hangs, each of the
                    # remaining hotkeys still gets a slot before the window deadline
                    share = min(stop, now + (stop - now) * slots / (len(queue) + 1 + holding))
                    future = executor.submit(self._one, hotkey, share, lambda h=hotkey: arrived.add(h))
                    running[future] = (hotkey, min(share, now + per_hotkey))
                    holding += 1
                ends = [give_up_at(h, deadline) for h, deadline in running.values()]
                if (not queue or now >= stop) and all(now >= end for end in ends):
                    break  # nothing left to start; whatever is still out has had its time
                wake = [t for (_, deadline), end in zip(running.values(), ends, strict=True)
                        for t in (deadline, end) if t > now]
                wait(list(running), timeout=min(wake, default=now + GIVE_UP_S) - now, return_when=FIRST_COMPLETED)
            for future, (hotkey, _) in running.items():
                out[hotkey] = future.result() if future.done() else Fetched(
                    hotkey, reason=FetchOutcome.TIMEOUT, detail="not delivered by its download deadline")
            for hotkey in queue:
                out[hotkey] = Fetched(hotkey, reason=FetchOutcome.TIMEOUT, detail="window download deadline passed")
            return out
        finally:  # threads still waiting on a hostile server end at their socket timeout; nobody waits
            executor.shutdown(wait=False, cancel_futures=True)

    def _one(self, hotkey: str, stop: float, arrived: Callable[[], None] = lambda: None) -> Fetched:
        """One hotkey's shard, every request by `stop` (mirror first when the record named it)."""
        try:
            pinned = None if self.pinned is None else self.pinned.get(hotkey)
            expected = self.expectation(hotkey)
            if self.mirror is not None and pinned is not None:
                deadline = min(stop, time.monotonic() + self.object_seconds)
                got = fetch_shard(self.pool.get(self.mirror), mirror_key(self.window, hotkey), expected, deadline,
                                  pinned, arrived)
                if got.ok:
                    return got
            config = self.credentials.get(hotkey)
            if config is None:
                return Fetched(hotkey, reason=FetchOutcome.NO_CREDENTIALS, detail="no valid bucket commitment on chain")
            deadline = min(stop, time.monotonic() + self.object_seconds)
            got = fetch_shard(self.pool.get(config), gradient_key(self.window, hotkey), expected, deadline, pinned,
                              arrived)
            if self.pinned is not None and pinned is None and got.ok:
                return Fetched(hotkey, reason=FetchOutcome.LATE, detail="not seen by the deadline", size=got.size)
            return got
        except Exception as exc:  # a peer must never stop the node
            log.warning("fetching %s failed unexpectedly: %s", hotkey, exc)
            return Fetched(hotkey, reason=FetchOutcome.UNREACHABLE, detail=f"{type(exc).__name__}: {exc}")


def validators_by_stake(graph: MetagraphSnapshot) -> list[tuple[int, str]]:
    """(uid, hotkey) of every validator-permit holder, highest stake first, ties by uid."""
    uids = sorted(graph.validators(), key=lambda uid: (-graph.stake[uid], uid))
    return [(uid, graph.hotkeys[uid]) for uid in uids]


async def first_from_validators(
    graph: MetagraphSnapshot,
    credentials: Mapping[str, BucketConfig],
    pool: BucketPool,
    read: Callable[[int, str, Bucket], Awaitable[T | None]],
    what: str,
    errors: Iterable[type[Exception]] = (),
    among: int | None = None,
    unreadable_raises: bool = False,
) -> T | None:
    """The first non-None `read(uid, hotkey, bucket)` over the validators by stake.

    A validator with no bucket commitment is skipped; `among` asks only the first that many with one.
    `ObjectNotFound` means "ask the next one"; one of `errors` (a parse error) is logged with `what` and
    the next one is asked, and so is any other `StorageError` unless `unreadable_raises`: then it
    propagates, for a caller that must not take a lower-stake answer when a higher one may exist.
    """
    asked = 0
    for uid, hotkey in validators_by_stake(graph):
        config = credentials.get(hotkey)
        if config is None:
            continue
        if among is not None and asked >= among:
            break
        asked += 1
        try:
            found = await read(uid, hotkey, pool.get(config))
        except ObjectNotFound:
            continue
        except StorageError as exc:
            if unreadable_raises:
                raise
            log.warning("%s of validator uid %d unusable: %s", what, uid, exc)
            continue
        except tuple(errors) as exc:
            log.warning("%s of validator uid %d unusable: %s", what, uid, exc)
            continue
        if found is not None:
            return found
    return None

