"""Gathering a window's shards into the one aggregated update every honest node applies.

Miners, validators and a node catching up all call `gather`, so all of them pick the same peers and
get the same bits: candidates are tried in the peer list's order (primaries, then reserves); a shard
counts only if its source delivered a verified `Shard` (uploaded inside the window, passing
`read_shard`), and the first `target` valid ones are aggregated with `aggregate_encoded` (sorted by
hotkey inside). How shards are downloaded is not this module's business: a `ShardSource` (see
`transport.fetch`) does it; every skipped peer is reported with its `FetchOutcome` or `RejectReason`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

import torch

from protocol.codec_aggregate import aggregate_encoded, robust_clip_norm, update_norm
from protocol.wire import Shard


class FetchOutcome(StrEnum):
    """Why a peer's shard is not there to be read (format rejections are `wire.RejectReason`)."""

    MISSING = "missing"  # no object under the window's key
    NO_CREDENTIALS = "no_credentials"  # no valid bucket commitment on chain
    UNREACHABLE = "unreachable"  # the bucket did not answer usefully
    LATE = "late"  # there now, but not seen by the deadline (validator's own observation)
    CHANGED = "changed"  # the bytes differ from the content hash pinned at the deadline or in the record
    TIMEOUT = "timeout"  # not delivered within its object or window download deadline


NOT_PRESENT = frozenset(
    {FetchOutcome.MISSING, FetchOutcome.NO_CREDENTIALS, FetchOutcome.UNREACHABLE, FetchOutcome.TIMEOUT}
)
NOT_TIMELY = frozenset({FetchOutcome.LATE, FetchOutcome.CHANGED})



@dataclass
class Fetched:
    """One peer's shard for one window: a verified Shard, or the reason there is none."""

    hotkey: str
    shard: Shard | None = None
    reason: str | None = None  # a FetchOutcome or a wire.RejectReason value
    detail: str = ""
    size: int = 0
    raw: bytes | None = field(default=None, repr=False)  # the verified bytes (a validator mirrors them)

    @property
    def ok(self) -> bool:
        return self.shard is not None


@dataclass
class GatherResult:
    window: int
    used: list[str] = field(default_factory=list)  # hotkeys aggregated, sorted
    skipped: dict[str, str] = field(default_factory=dict)  # hotkey -> reason
    aggregated: dict[str, torch.Tensor] | None = None
    clip_norm: float | None = None  # the clip norm the aggregate used (goes in the aggregate record)
    content_hashes: list[str] = field(default_factory=list)  # of `used`, same order
    fetched: dict[str, Fetched] = field(default_factory=dict, repr=False)  # every outcome looked at

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
    clip_norm: float | None = None,
    ceiling: float = math.inf,
) -> GatherResult:
    """Aggregate the first `target` valid shards among `candidates`, in order.

    Primaries are fetched first; each shortfall is filled from the next candidates, so reserves are
    downloaded only when needed. `prefetched` (a validator's stage-1 downloads) avoids fetching twice.
    The clip norm is `clip_norm` when given (a signed record's), else `robust_clip_norm(norms, ceiling)`.
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
    result.fetched = have
    if not valid:
        return result
    result.used = sorted(valid)
    shards = {h: have[h].shard.tensors for h in result.used}  # type: ignore[union-attr]
    result.content_hashes = [have[h].shard.header.content_hash for h in result.used]  # type: ignore[union-attr]
    norms = {h: update_norm(tensors) for h, tensors in shards.items()}
    result.clip_norm = clip_norm if clip_norm is not None else robust_clip_norm(norms, ceiling)
    result.aggregated = aggregate_encoded(shards, device=device, norms=norms, clip_norm=result.clip_norm)
    return result
