"""Gauntlet stage 1: sync score (on debug samples) and copy detection."""

from __future__ import annotations

import math

import pytest
import torch

from gauntlet.filters import (
    copy_verdicts,
    overlap_matrix,
    sample_rate,
    step_change,
    sync_curve,
    sync_score,
)
from protocol.hparams import GauntletHParams, ShardHParams
from protocol.sample import debug_positions, flat_sample, gather_sample, split_sample

HP = GauntletHParams()


NUMELS = {
    "embed.weight": 64 * 32,
    "layers.0.q.weight": 32 * 32,
    "layers.0.norm.weight": 32,
    "lm_head.weight": 2048,
}


# --- sync --------------------------------------------------------------------------------------


def test_sync_curve_values_and_monotone():
    assert sync_curve(0.0, HP) == 1.0
    assert sync_curve(5.0, HP) == 0.0
    assert sync_curve(7.5, HP) == 0.0
    assert sync_curve(math.inf, HP) == 0.0
    assert sync_curve(1.0, HP) == pytest.approx(0.8**2.5)
    values = [sync_curve(x / 10, HP) for x in range(0, 80)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))
    assert all(0.0 <= v <= 1.0 for v in values)


def _trajectory(windows: int) -> list[dict[str, torch.Tensor]]:
    """Parameters over windows: each window adds a fresh random step of similar size."""
    g = torch.Generator().manual_seed(5)
    theta = {k: torch.randn(n, generator=g) for k, n in NUMELS.items()}
    out = [theta]
    for _ in range(windows):
        theta = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in theta.items()}
        out.append(theta)
    return out


def test_sync_score_counts_steps_behind_on_real_tensors():
    traj = _trajectory(8)
    now = traj[-1]
    pos = debug_positions(b"window-8", NUMELS, ShardHParams().debug_sample_size)
    own = gather_sample(now, pos)
    ref = step_change(own, gather_sample(traj[-2], pos))
    assert ref > 0
    in_sync = sync_score(own, gather_sample(now, pos), ref, HP)
    assert in_sync.steps_behind == 0.0 and in_sync.sync == 1.0 and not in_sync.penalised
    results = [sync_score(own, gather_sample(traj[-1 - k], pos), ref, HP) for k in range(1, 8)]
    xs = [r.steps_behind for r in results]
    # Random-walk steps: k windows behind is ~√k·(one step) in median, and strictly growing.
    assert all(a < b for a, b in zip(xs, xs[1:], strict=False))
    assert xs[0] == pytest.approx(1.0, rel=0.25)
    syncs = [r.sync for r in results]
    assert all(a >= b for a, b in zip(syncs, syncs[1:], strict=False))
    # A drift far beyond the window change is fully out of sync and penalised.
    stale = {k: v + 1.0 for k, v in own.items()}
    far = sync_score(own, stale, ref, HP)
    assert far.sync == 0.0 and far.penalised and far.steps_behind > HP.sync_max_steps


def test_flat_debug_sample_round_trip_in_canonical_order():
    traj = _trajectory(1)
    pos = debug_positions(b"w", NUMELS, 64)
    sample = gather_sample(traj[-1], pos)
    flat = flat_sample(sample)
    assert flat.shape == (sum(len(v) for v in pos.values()),)
    back = split_sample(flat, pos)
    assert back is not None and all(torch.equal(back[k], sample[k]) for k in sample)
    assert split_sample(flat[:-1], pos) is None
    names = sorted(pos)
    assert torch.equal(flat[: len(pos[names[0]])], traj[-1][names[0]][pos[names[0]]])


def test_sync_penalty_threshold():
    own = {"w": torch.zeros(100)}
    ref = 0.1
    assert not sync_score(own, {"w": torch.full((100,), 0.25)}, ref, HP).penalised  # 2.5 steps
    assert sync_score(own, {"w": torch.full((100,), 0.35)}, ref, HP).penalised


def test_sync_score_malformed_samples_give_reasons_not_crashes():
    own = {"a": torch.zeros(4), "b": torch.zeros(2)}
    cases = [
        {"a": torch.zeros(4)},  # missing parameter
        {"a": torch.zeros(3), "b": torch.zeros(2)},  # wrong length
        {"a": torch.tensor([0.0, math.nan, 0.0, 0.0]), "b": torch.zeros(2)},  # non-finite
        {"a": torch.zeros(4, dtype=torch.int64), "b": torch.zeros(2)},  # not float
    ]
    for miner in cases:
        r = sync_score(own, miner, 0.1, HP)
        assert r.sync == 0.0 and r.penalised and r.reason


def test_sync_score_zero_reference_change():
    own = {"a": torch.ones(8)}
    assert sync_score(own, {"a": torch.ones(8)}, 0.0, HP).sync == 1.0
    assert sync_score(own, {"a": torch.ones(8)}, None, HP).sync == 1.0
    assert sync_score(own, {"a": torch.ones(8) * 1.001}, 0.0, HP).sync == 0.0


# --- copies ------------------------------------------------------------------------------------


def _topk_positions(seed: int, chunks: int = 64, chunk: int = 4096, k: int = 64) -> torch.Tensor:
    """Global flat positions of a chunked top-k of a random tensor (what a miner's shard encodes)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(chunks, chunk, generator=g)
    idx = x.abs().topk(k, dim=1).indices
    return (idx + torch.arange(chunks)[:, None] * chunk).reshape(-1)


def test_honest_miners_overlap_like_random():
    sets = {uid: _topk_positions(uid) for uid in range(6)}
    uids, ov = overlap_matrix(sets)
    off = ov[~torch.eye(len(uids), dtype=torch.bool)]
    assert float(off.mean()) == pytest.approx(64 / 4096, abs=0.005)  # ≈ 1.6 %
    verdicts = copy_verdicts(sets, {u: 1000.0 + u for u in sets}, HP)
    assert all(v.factor == 1.0 for v in verdicts.values())


def test_copy_is_caught_and_later_uploader_punished():
    original = _topk_positions(1)
    sets = {3: original, 5: _topk_positions(2), 7: original.clone(), 9: _topk_positions(3)}
    times = {3: 100.0, 5: 101.0, 7: 150.0, 9: 90.0}
    v = copy_verdicts(sets, times, HP)
    assert v[7].factor == 0.0 and v[7].copied_from == 3 and v[7].overlap == pytest.approx(1.0)
    assert v[3].factor == 1.0  # the original uploader is not punished
    assert v[5].factor == 1.0 and v[9].factor == 1.0
    # If the copy had been uploaded first, the other one would be named the copier.
    v2 = copy_verdicts(sets, {**times, 7: 50.0}, HP)
    assert v2[3].factor == 0.0 and v2[3].copied_from == 7 and v2[7].factor == 1.0
    # First seen in the same poll round: no order, so nobody is named the copier (never the original).
    v3 = copy_verdicts(sets, {**times, 7: 100.0}, HP)
    assert v3[7].factor == 1.0 and v3[3].factor == 1.0 and 3 not in (v3[7].copied_from, v3[3].copied_from)
    # ...but the pair is named twins either way, so stage 2 keeps each out of the other's memory control
    for verdicts in (v, v2, v3):
        assert verdicts[3].twins == [7] and verdicts[7].twins == [3]
        assert verdicts[5].twins == [] and verdicts[9].twins == []


def test_partial_copy_halves_and_per_param_dicts():
    a = _topk_positions(11)
    b = _topk_positions(12)
    n = len(a)
    mixed = torch.cat([a[: int(0.45 * n)], b[int(0.45 * n) :]])  # 45 % of a's positions
    v = copy_verdicts({0: a, 1: mixed}, {0: 1.0, 1: 2.0}, HP)
    assert v[1].factor == 0.5 and 0.4 <= v[1].overlap < 0.5
    assert v[0].twins == [1] and v[1].twins == [0]  # a partial copy (≥ copy_halve_overlap) is a twin too
    # The same sets given per parameter give the same verdicts; equal positions in DIFFERENT
    # parameters are not an overlap.
    half = n // 2
    as_dict = {0: {"p": a[:half], "q": a[half:]}, 1: {"p": mixed[:half], "q": mixed[half:]}}
    vd = copy_verdicts(as_dict, {0: 1.0, 1: 2.0}, HP)
    assert vd[1].factor == 0.5 and vd[1].overlap == pytest.approx(v[1].overlap)
    crossed = copy_verdicts({0: {"p": a}, 1: {"q": a.clone()}}, {0: 1.0, 1: 2.0}, HP)
    assert crossed[1].factor == 1.0 and crossed[1].overlap == 0.0


def test_copy_verdicts_edge_cases():
    assert copy_verdicts({}, {}, HP) == {}
    single = copy_verdicts({4: torch.arange(10)}, {4: 0.0}, HP)
    assert single[4].factor == 1.0 and single[4].copied_from is None and single[4].twins == []
    with pytest.raises(ValueError):
        copy_verdicts({1: torch.arange(3), 2: torch.arange(3)}, {1: 0.0}, HP)
    with pytest.raises(ValueError):
        copy_verdicts({1: torch.rand(3), 2: torch.arange(3)}, {1: 0.0, 2: 1.0}, HP)


# --- streamed overlap on encoded shards (issue 19) ---------------------------------------------


def _reference_overlap_matrix(index_sets):
    """The pre-issue-19 implementation (all positions as int64 at once), kept as the reference."""
    uids = sorted(index_sets)
    m = len(uids)
    sets = []
    for u in uids:
        ix = index_sets[u]
        ix = {"": ix} if isinstance(ix, torch.Tensor) else ix
        sets.append({k: torch.unique(v.reshape(-1).to(torch.int64)) for k, v in ix.items()})
    sizes = torch.tensor([sum(len(v) for v in s.values()) for s in sets], dtype=torch.float64)
    common = torch.zeros(m * m, dtype=torch.float64)
    for name in sorted({k for s in sets for k in s}):
        held = [(i, s[name]) for i, s in enumerate(sets) if name in s and len(s[name])]
        if len(held) < 2:
            continue
        keys = torch.cat([idx for _, idx in held])
        owner = torch.repeat_interleave(torch.tensor([i for i, _ in held]), torch.tensor([len(x) for _, x in held]))
        keys, order = torch.sort(keys, stable=True)
        owner = owner[order]
        group = int(torch.unique_consecutive(keys, return_counts=True)[1].max())
        for d in range(1, group):
            same = keys[:-d] == keys[d:]
            a, b = owner[:-d][same], owner[d:][same]
            common += torch.bincount(torch.cat([a * m + b, b * m + a]), minlength=m * m).to(torch.float64)
    overlap = common.reshape(m, m) / torch.minimum(sizes[:, None], sizes[None, :]).clamp_min(1.0)
    overlap.fill_diagonal_(0.0)
    return uids, overlap


def _encoded_miners(n: int, seed: int = 0):
    from protocol.codec import Compressor
    from protocol.hparams import SparseLoCoHParams

    hp = SparseLoCoHParams(chunk_2d=16, chunk_1d=64, topk=5)
    g = torch.Generator().manual_seed(seed)
    shapes = {"a.weight": (48, 80), "b.bias": (192,), "c.weight": (33, 17)}
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    shards = {}
    for uid in range(n):
        # correlated miners: a shared component plus their own, so positions overlap in varied amounts
        mix = 0.2 + 0.6 * (uid % 4) / 3
        delta = {k: mix * base[k] + torch.randn(s, generator=g) for k, s in shapes.items()}
        shards[uid] = Compressor(hp).encode_all(delta)
    shards[n] = dict(shards[1])  # an exact copy
    return shards


@pytest.mark.parametrize("slab", [1 << 23, 40, 7])
def test_encoded_overlap_streamed_equals_reference(monkeypatch, slab):
    import gauntlet.filters as filters

    monkeypatch.setattr(filters, "SLAB_ENTRIES", slab)
    shards = _encoded_miners(9)
    positions = {u: {k: e.positions().reshape(-1) for k, e in s.items()} for u, s in shards.items()}
    uids, ov = overlap_matrix(shards)
    ref_uids, ref = _reference_overlap_matrix(positions)
    assert uids == ref_uids and torch.equal(ov, ref)
    assert torch.equal(overlap_matrix(positions)[1], ref)
    times = {u: float(u) for u in shards}
    assert copy_verdicts(shards, times, HP) == copy_verdicts(positions, times, HP)
    assert copy_verdicts(shards, times, HP)[9].factor == 0.0


def test_encoded_overlap_with_dense_runs_equals_reference(monkeypatch):
    """Every shared position counted as a dense XᵀX block (the path sybil floods take): same counts."""
    import gauntlet.filters as filters

    monkeypatch.setattr(filters, "LONG_RUN_MIN", 2)
    monkeypatch.setattr(filters, "_DENSE_CELLS", 50)
    shards = _encoded_miners(9, seed=1)
    positions = {u: {k: e.positions().reshape(-1) for k, e in s.items()} for u, s in shards.items()}
    assert torch.equal(overlap_matrix(shards)[1], _reference_overlap_matrix(positions)[1])
    assert torch.equal(overlap_matrix(positions)[1], _reference_overlap_matrix(positions)[1])


def test_plain_overlap_equals_reference_on_random_sets():
    g = torch.Generator().manual_seed(3)
    sets = {u: {"p": torch.randint(0, 500, (60,), generator=g), "q": torch.randint(0, 90, (30,), generator=g)}
            for u in range(12)}
    sets[12] = {"p": sets[3]["p"].clone()}
    sets[13] = torch.randint(0, 50, (0,))
    assert torch.equal(overlap_matrix(sets)[1], _reference_overlap_matrix(sets)[1])


def test_beyond_16_miners_overlaps_are_estimated_on_a_secret_sample_within_their_error_bound():
    """40 miners: overlaps read on a hashed position sample (rate 16/40) stay within 3 standard errors of
    the exact ones, a copier is still caught whatever the salt, and the sample depends on the salt."""
    gen = torch.Generator().manual_seed(7)
    space, k = 1 << 18, 4096
    sets = {u: torch.randperm(space, generator=gen)[:k].sort().values for u in range(38)}
    sets[38] = sets[3].clone()  # a full copy of uid 3
    half = torch.cat([sets[5][: k // 2], torch.randperm(space, generator=gen)[: k // 2]])
    sets[39] = torch.unique(half)  # half of uid 5, half its own
    rate = sample_rate(len(sets))
    assert rate == pytest.approx(16 / 40)
    exact = {(a, b): len(set(sets[a].tolist()) & set(sets[b].tolist())) / min(len(sets[a]), len(sets[b]))
             for a, b in ((38, 3), (39, 5), (1, 2), (10, 20))}
    for salt in (1, 2**40 + 12345):
        uids, ov = overlap_matrix(sets, salt)
        for (a, b), p in exact.items():
            n = rate * min(len(sets[a]), len(sets[b]))
            assert abs(float(ov[a, b]) - p) <= 3 * math.sqrt(max(p * (1 - p), 1e-4) / n) + 1e-9, (a, b, p, ov[a, b])
        v = copy_verdicts(sets, {u: float(u) for u in sets}, HP, salt)
        assert v[38].factor == 0.0 and v[38].copied_from == 3 and v[3].factor == 1.0
        assert all(v[u].factor == 1.0 for u in range(38))  # honest overlaps (≈ 1.6 %) stay far from any threshold
    assert not torch.equal(overlap_matrix(sets, 1)[1], overlap_matrix(sets, 2)[1])  # another salt, another sample
    small = {u: sets[u] for u in range(16)}  # up to 16 miners: exact, whatever the salt
    assert torch.equal(overlap_matrix(small, 1)[1], overlap_matrix(small, 99)[1])
