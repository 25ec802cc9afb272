"""`gather`'s choice of peers from a shard source, and the clip norm it records."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from protocol.codec import Compressor
from protocol.gather import Fetched, FetchOutcome, gather
from protocol.hparams import SparseLoCoHParams
from protocol.wire import Shard


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
    header = SimpleNamespace(content_hash=f"{seed:064x}")
    return Shard(header=header, tensors=tensors, debug_values=torch.zeros(1), debug_positions=None, size=0)


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


def test_gather_records_hashes_and_a_robust_clip_norm():
    good = {h: Fetched(h, shard=_shard(i + 1)) for i, h in enumerate(["a", "b", "c"])}
    result = gather(1, ["a", "b", "c"], target=3, source=_Source(good))
    assert result.content_hashes == [f"{i:064x}" for i in (1, 2, 3)]
    capped = gather(1, ["a", "b", "c"], target=3, source=_Source(good), ceiling=1e-3)
    assert capped.clip_norm == 1e-3  # the ceiling wins over the lower median
    fixed = gather(1, ["a", "b", "c"], target=3, source=_Source(good), clip_norm=0.5)
    assert fixed.clip_norm == 0.5  # a record's clip norm is used as it is
