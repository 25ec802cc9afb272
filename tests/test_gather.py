"""Timeliness of an upload, and `gather`'s choice of peers from a shard source."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import torch

from protocol.codec import Compressor
from protocol.gather import Fetched, FetchOutcome, gather, upload_timeliness
from protocol.hparams import SparseLoCoHParams
from protocol.wire import Shard

START = datetime(2026, 1, 1, 12, 0, 0, 500_000, tzinfo=UTC)
DEADLINE = START + timedelta(seconds=10)


def test_upload_timeliness_bounds():
    assert upload_timeliness(START, START, DEADLINE) is None
    assert upload_timeliness(DEADLINE, START, DEADLINE) is None  # inclusive at both ends
    late = upload_timeliness(DEADLINE + timedelta(milliseconds=1), START, DEADLINE)
    assert late is not None and late[0] == FetchOutcome.LATE and "after" in late[1]
    # the start is compared at whole seconds: listings may report second-resolution times
    assert upload_timeliness(START.replace(microsecond=0), START, DEADLINE) is None
    early = upload_timeliness(START - timedelta(seconds=1), START, DEADLINE)
    assert early is not None and early[0] == FetchOutcome.EARLY
    # an unknown bound is not checked
    assert upload_timeliness(DEADLINE + timedelta(days=1), START, None) is None
    assert upload_timeliness(START - timedelta(days=1), None, DEADLINE) is None


class _Source:
    """A shard source over shards held in memory; records what it was asked for."""

    def __init__(self, shards: dict[str, Fetched]):
        self.shards, self.asked = shards, []

    def fetch(self, hotkeys: list[str]) -> dict[str, Fetched]:
        self.asked.append(list(hotkeys))
        return {h: self.shards.get(h, Fetched(h, reason=FetchOutcome.MISSING)) for h in hotkeys}


def _shard(seed: int) -> Shard:
    gen = torch.Generator().manual_seed(seed)
    tensors = Compressor(SparseLoCoHParams()).encode_all({"w": torch.randn(64, 64, generator=gen)})
    return Shard(header=None, tensors=tensors, debug_values=torch.zeros(1), debug_positions=None, size=0)


def test_gather_takes_the_first_valid_in_order_and_fills_from_reserves():
    good = {h: Fetched(h, shard=_shard(i)) for i, h in enumerate(["a", "c", "d"])}
    source = _Source(good)
    result = gather(7, ["a", "b", "c", "d"], target=2, source=source)
    assert result.used == ["a", "c"] and result.skipped == {"b": FetchOutcome.MISSING}
    assert source.asked == [["a", "b"], ["c"]]  # the reserve "d" was never downloaded
    prefetched = {"a": good["a"]}
    again = _Source(good)
    assert gather(7, ["a", "c"], 2, again, prefetched=prefetched).used == ["a", "c"]
    assert again.asked == [["c"]]  # nothing fetched twice


def test_gather_with_nothing_valid_leaves_no_aggregate():
    result = gather(3, ["x", "y"], target=2, source=_Source({}))
    assert result.aggregated is None and not result.ok and set(result.skipped) == {"x", "y"}
