"""Stage 2's memory control, wired through `Scorer`: the control pass runs for every evaluated miner, and
copies named by stage 1 (`CopyVerdict.twins`) are counted out of each other's control."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from gauntlet.records import CopyVerdict, FilterResult
from neurons.scoring import Scorer
from protocol.codec import Compressor
from protocol.model import build_model


def _encoded(model: torch.nn.Module, hp, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    compressor = Compressor(hp.sparseloco)
    return {n: compressor.encode(n, torch.randn(p.shape, generator=g) * 1e-3) for n, p in model.named_parameters()}


def test_every_evaluation_carries_its_control_and_copies_are_counted_out(tiny_hp, tiny_store):
    torch.manual_seed(0)
    model = build_model(tiny_hp)
    miners = {1: "hk-one", 2: "hk-two", 3: "hk-copy", 4: "hk-late"}
    shards = {1: _encoded(model, tiny_hp, 1), 2: _encoded(model, tiny_hp, 2)}
    shards[3] = shards[1]  # uid 3 uploaded uid 1's update (same poll round: not slashed, but twins)
    fetched = {miners[u]: SimpleNamespace(shard=SimpleNamespace(tensors=t)) for u, t in shards.items()}
    twins = {1: [3], 2: [], 3: [1], 4: [1]}  # uid 4 also overlaps uid 1, but is not eligible (late)
    filters = {
        u: FilterResult(uid=u, hotkey=miners[u], present=True, timely=u != 4, first_seen=1,
                        copy_verdict=CopyVerdict(overlap=1.0 if twins[u] else 0.0, factor=1.0, twins=twins[u]))
        for u in miners
    }
    ctx = SimpleNamespace(window=0, seed=b"w0-seed")
    results = Scorer(model, tiny_store, tiny_hp, b"secret").evaluate_window(ctx, miners, filters, fetched)
    assert sorted(results) == [1, 2, 3]
    for r in results.values():
        assert r.reference_count == 3 and r.reference_score is not None
        assert r.loss_after_assigned_reference is not None  # the control pass ran
    assert (results[1].reference_twins, results[2].reference_twins, results[3].reference_twins) == (1, 0, 1)
