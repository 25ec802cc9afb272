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
from collections.abc import Awaitable, Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from typing import TypeVar

from protocol.gather import Fetched, FetchOutcome, upload_timeliness
from protocol.storage_config import BucketConfig
from protocol.storage_keys import gradient_key
from protocol.wire import Rejection, ShardExpectation, ShardRules, check_size, read_shard
from transport.bucket import Bucket, ObjectNotFound, StorageError
from transport.bucket_config import StorageConfig
from transport.chain import MetagraphSnapshot

log = logging.getLogger(__name__)
T = TypeVar("T")


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
    bucket: Bucket, expected: ShardExpectation, window_start: datetime | None, deadline: datetime | None
) -> Fetched:
    """Download and verify one shard; its size and upload time are checked before the body is read."""
    got = Fetched(expected.hotkey)
    key = gradient_key(expected.window, expected.hotkey)
    try:
        info = bucket.stat(key)
        got.upload_time, got.size = info.last_modified, info.size
        if (too_big := check_size(info.size, expected)) is not None:
            got.reason, got.detail = too_big.reason.value, too_big.detail
            return got
        if (untimely := upload_timeliness(info.last_modified, window_start, deadline)) is not None:
            got.reason, got.detail = untimely
            return got
        data = bucket.get(key, max_bytes=expected.max_bytes)
    except ObjectNotFound:
        got.reason, got.detail = FetchOutcome.MISSING, f"no {key}"
        return got
    except StorageError as exc:
        got.reason, got.detail = FetchOutcome.UNREACHABLE, str(exc)
        return got
    result = read_shard(data, expected)
    if isinstance(result, Rejection):
        got.reason, got.detail = result.reason.value, result.detail
    else:
        got.shard = result
    return got


@dataclass(frozen=True)
class ShardSource:
    """Where and how one window's shards are read: credentials, chain-time bounds, expectations.

    Built once per window (`neurons.node.WindowContext.shards`); `fetch` is blocking (threads).
    """

    pool: BucketPool
    credentials: Mapping[str, BucketConfig]
    netuid: int
    window: int
    rules: ShardRules
    window_start: datetime | None
    deadline: datetime | None

    def expectation(self, hotkey: str) -> ShardExpectation:
        return ShardExpectation(netuid=self.netuid, window=self.window, hotkey=hotkey, rules=self.rules)

    def fetch(self, hotkeys: list[str]) -> dict[str, Fetched]:
        """These hotkeys' shards, downloaded and verified in parallel; never raises."""
        if not hotkeys:
            return {}
        workers = max(1, min(self.pool.storage.max_concurrency, len(hotkeys)))
        with ThreadPoolExecutor(max_workers=workers) as executor:
            return dict(zip(hotkeys, executor.map(self._one, hotkeys), strict=True))

    def _one(self, hotkey: str) -> Fetched:
        config = self.credentials.get(hotkey)
        if config is None:
            return Fetched(hotkey, reason=FetchOutcome.NO_CREDENTIALS, detail="no valid bucket commitment on chain")
        try:
            return fetch_shard(self.pool.get(config), self.expectation(hotkey), self.window_start, self.deadline)
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
) -> T | None:
    """The first non-None `read(uid, hotkey, bucket)` over the validators by stake.

    A validator with no bucket commitment is skipped. `ObjectNotFound` means "ask the next one";
    a `StorageError` or one of `errors` (a parse error) is logged with `what` and the next one is asked.
    """
    caught = (StorageError, *errors)
    for uid, hotkey in validators_by_stake(graph):
        config = credentials.get(hotkey)
        if config is None:
            continue
        try:
            found = await read(uid, hotkey, pool.get(config))
        except ObjectNotFound:
            continue
        except caught as exc:
            log.warning("%s of validator uid %d unusable: %s", what, uid, exc)
            continue
        if found is not None:
            return found
    return None

