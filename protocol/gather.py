"""Gathering a window's shards into the one aggregated update every honest node applies.

Miners, validators and a node catching up all call `gather`, so all of them pick the same peers and
get the same bits: candidates are tried in the peer list's order (primaries, then reserves); a shard
counts only if its source delivered a verified `Shard` (uploaded inside the window, passing
`read_shard`), and the first `target` valid ones are aggregated with `aggregate_encoded` (sorted by
hotkey inside). How shards are downloaded is not this module's business: a `ShardSource` (see
`transport.fetch`) does it; every skipped peer is reported with its `FetchOutcome` or `RejectReason`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Protocol

import torch

from protocol.codec_aggregate import aggregate_encoded
from protocol.wire import Shard


class FetchOutcome(StrEnum):
    """Why a peer's shard is not there to be read (format rejections are `wire.RejectReason`)."""

    MISSING = "missing"  # no object under the window's key
    NO_CREDENTIALS = "no_credentials"  # no valid bucket commitment on chain
    UNREACHABLE = "unreachable"  # the bucket did not answer usefully
    LATE = "late"  # uploaded after the window's deadline
    EARLY = "early"  # uploaded before the window started


NOT_PRESENT = frozenset({FetchOutcome.MISSING, FetchOutcome.NO_CREDENTIALS, FetchOutcome.UNREACHABLE})
NOT_TIMELY = frozenset({FetchOutcome.LATE, FetchOutcome.EARLY})


def upload_timeliness(
    upload_time: datetime, window_start: datetime | None, deadline: datetime | None
) -> tuple[FetchOutcome, str] | None:
    """None if an upload at `upload_time` counts for its window, else (LATE or EARLY, why).

    On time means window start ≤ upload_time ≤ deadline, both bounds from chain block timestamps
    (None: that bound is not known yet and not checked). The start is compared at whole seconds,
    since some listings report upload times at second resolution.
    """
    if deadline is not None and upload_time > deadline:
        return FetchOutcome.LATE, f"uploaded {upload_time.isoformat()} after {deadline.isoformat()}"
    if window_start is not None and upload_time < window_start.replace(microsecond=0):
        return FetchOutcome.EARLY, f"uploaded {upload_time.isoformat()} before the window"
    return None


@dataclass
class Fetched:
    """One peer's shard for one window: a verified Shard, or the reason there is none."""

    hotkey: str
    shard: Shard | None = None
    reason: str | None = None  # a FetchOutcome or a wire.RejectReason value
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


class ShardSource(Protocol):
    """Anything that fetches and verifies a window's shards by hotkey (never raises)."""

    def fetch(self, hotkeys: list[str]) -> dict[str, Fetched]: ...


def gather(
    window: int,
    candidates: list[str],
    target: int,
    source: ShardSource,
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
        have.update(source.fetch(missing))
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
