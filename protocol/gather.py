"""Gathering a window's shards and turning them into the one aggregated update everybody applies.

Miners, validators and a node catching up all call this, so all of them pick the same peers and get
the same bits: candidates are tried in the peer list's order (primaries, then reserves), a shard
counts only if it was uploaded inside the window (object time between the window's start and its
deadline, both from chain timestamps) and passes `read_shard`, and the first `target` valid ones
are aggregated with `aggregate_encoded` (sorted by hotkey inside). Downloads run in parallel threads
with bounded concurrency; every skipped peer is reported with its reason, nothing raises.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime

import torch

from protocol.codec_aggregate import aggregate_encoded
from protocol.storage import Bucket, ObjectNotFound, StorageError, gradient_key
from protocol.storage_config import BucketConfig, StorageConfig
from protocol.wire import Rejection, Shard, ShardExpectation, check_size, read_shard

log = logging.getLogger(__name__)


@dataclass
class Fetched:
    """One peer's shard for one window: a verified Shard, or the reason there is none."""

    hotkey: str
    shard: Shard | None = None
    reason: str | None = None  # a RejectReason value, or missing / late / early / no_credentials / unreachable
    detail: str = ""
    upload_time: datetime | None = None
    size: int = 0

    @property
    def ok(self) -> bool:
        return self.shard is not None


@dataclass
class GatherResult:
    window: int
    used: list[str] = field(default_factory=list)  # hotkeys aggregated, sorted
    skipped: dict[str, str] = field(default_factory=dict)  # hotkey -> reason
    aggregated: dict[str, torch.Tensor] | None = None

    @property
    def ok(self) -> bool:
        return self.aggregated is not None


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
    """Download and verify one shard; sizes are checked before the body is read."""
    got = Fetched(expected.hotkey)
    key = gradient_key(expected.window, expected.hotkey)
    try:
        info = bucket.stat(key)
        got.upload_time, got.size = info.last_modified, info.size
        if (too_big := check_size(info.size, expected)) is not None:
            got.reason, got.detail = too_big.reason.value, too_big.detail
            return got
        if deadline is not None and info.last_modified > deadline:
            got.reason, got.detail = "late", f"uploaded {info.last_modified.isoformat()} after {deadline.isoformat()}"
            return got
        if window_start is not None and info.last_modified < window_start.replace(microsecond=0):
            got.reason, got.detail = "early", f"uploaded {info.last_modified.isoformat()} before the window"
            return got
        data = bucket.get(key, max_bytes=expected.max_bytes)
    except ObjectNotFound:
        got.reason, got.detail = "missing", f"no {key}"
        return got
    except StorageError as exc:
        got.reason, got.detail = "unreachable", str(exc)
        return got
    result = read_shard(data, expected)
    if isinstance(result, Rejection):
        got.reason, got.detail = result.reason.value, result.detail
    else:
        got.shard = result
    return got


def fetch_many(
    hotkeys: list[str],
    credentials: Mapping[str, BucketConfig],
    expectation: Callable[[str], ShardExpectation],
    pool: BucketPool,
    window_start: datetime | None,
    deadline: datetime | None,
    max_workers: int = 8,
) -> dict[str, Fetched]:
    """Fetch several peers' shards in parallel; never raises."""

    def one(hotkey: str) -> Fetched:
        config = credentials.get(hotkey)
        if config is None:
            return Fetched(hotkey, reason="no_credentials", detail="no valid bucket commitment on chain")
        try:
            return fetch_shard(pool.get(config), expectation(hotkey), window_start, deadline)
        except Exception as exc:  # a peer must never stop the node
            log.warning("fetching %s failed unexpectedly: %s", hotkey, exc)
            return Fetched(hotkey, reason="unreachable", detail=f"{type(exc).__name__}: {exc}")

    if not hotkeys:
        return {}
    with ThreadPoolExecutor(max_workers=max(1, min(max_workers, len(hotkeys)))) as executor:
        return dict(zip(hotkeys, executor.map(one, hotkeys), strict=True))


def gather(
    window: int,
    candidates: list[str],
    target: int,
    fetch: Callable[[list[str]], dict[str, Fetched]],
    device: torch.device | str = "cpu",
    prefetched: Mapping[str, Fetched] | None = None,
) -> GatherResult:
    """Aggregate the first `target` valid shards among `candidates`, in order.

    Primaries are fetched first; each shortfall is filled from the next candidates, so reserves are
    downloaded only when needed. `prefetched` (a validator's stage-1 downloads) avoids fetching twice.
    """
    result = GatherResult(window)
    have: dict[str, Fetched] = dict(prefetched or {})
    valid: list[str] = []
    cursor = 0
    while len(valid) < target and cursor < len(candidates):
        batch = candidates[cursor : cursor + target - len(valid)]
        cursor += len(batch)
        missing = [h for h in batch if h not in have]
        have.update(fetch(missing))
        for hotkey in batch:
            got = have[hotkey]
            if got.ok:
                valid.append(hotkey)
            else:
                result.skipped[hotkey] = got.reason or "invalid"
    if not valid:
        return result
    result.used = sorted(valid)
    shards = {h: have[h].shard.tensors for h in result.used}  # type: ignore[union-attr]
    result.aggregated = aggregate_encoded(shards, device=device)
    return result
