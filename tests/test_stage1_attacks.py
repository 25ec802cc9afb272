"""Hostile miners against stage-1 copy detection (issue 19's streamed, sampled overlap counting).

Every crafted shard here is one the wire accepts (strictly ascending in-chunk indices, a finite table):
one of each kind goes through write_shard / read_shard with a real keypair, the rest are built the
same way without the signature round trip.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from bittensor.sp_core import Keypair

import gauntlet.filters as filters
from gauntlet.filters import _pair_counts, copy_verdicts, overlap_matrix, sample_rate
from protocol.codec import ChunkLayout, EncodedTensor, pack2, pack12
from protocol.hparams import GauntletHParams, SparseLoCoHParams
from protocol.wire import ShardExpectation, ShardRules, read_shard, write_shard

HP = GauntletHParams()
SPARSE = SparseLoCoHParams()
SHAPES = {"w": (256, 512)}  # 32 chunks of 64×64, k = 64: 2048 kept positions per miner
LAYOUT = ChunkLayout.for_shape(SHAPES["w"], SPARSE)
TABLE = torch.tensor([-1.0, -0.25, 0.25, 1.0])


def _encoded(idx: torch.Tensor, table: torch.Tensor = TABLE) -> EncodedTensor:
    """A wire-valid encoded tensor from in-chunk indices [n_chunks, k] (sorted here)."""
    codes = pack2(torch.zeros(LAYOUT.n_values, dtype=torch.uint8))
    return EncodedTensor(pack12(idx.sort(dim=1).values), codes, table, LAYOUT)


def _random_idx(gen: torch.Generator) -> torch.Tensor:
    return torch.rand(LAYOUT.n_chunks, LAYOUT.chunk_size, generator=gen).topk(LAYOUT.k, dim=1).indices


def _through_wire(enc: EncodedTensor, uri: str) -> EncodedTensor:
    """Sign with a real keypair and read back as a validator would: the crafted shard is accepted."""
    hp = SparseLoCoHParams()
    rules = ShardRules(hp, 4, "abc123", SHAPES)
    key = Keypair.create_from_uri(uri)
    blob = write_shard({"w": enc}, keypair=key, netuid=1, window=3, revision="abc123", data_digest="d" * 32,
                       debug_values=torch.zeros(4))
    shard = read_shard(blob, ShardExpectation(1, 3, key.ss58_address, rules))
    assert hasattr(shard, "tensors"), shard  # a Rejection would mean the attack is not even reachable
    return shard.tensors["w"]


# --- cost: sybils sharing their positions ------------------------------------------------------


def _keys(holders: list[list[int]], m: int) -> tuple[np.ndarray, int]:
    bits = max(1, (m - 1).bit_length())
    keys = [(p << bits) | o for p, owners in enumerate(holders) for o in owners]
    return np.array(keys, dtype=np.int64), bits


def _naive_pairs(holders: list[list[int]], m: int) -> np.ndarray:
    common = np.zeros((m, m), dtype=np.int64)
    for owners in holders:
        o = np.array(sorted(owners))
        if o.size:
            common[np.ix_(o, o)] += 1
    return np.triu(common, 1).reshape(-1)


def test_sybils_sharing_every_position_cost_no_quadratic_pair_enumeration():
    """256 miners holding the same 600 positions (one shard uploaded by 256 sybils, or strongly correlated
    miners) gave 600·256·255/2 ≈ 19.6M enumerated pairs (~15x the pair-counting time of 256 independent
    miners, ~100 s per window at 150m): now the work per entry is bounded and the counts stay exact."""
    m, rng = 256, np.random.default_rng(1)
    holders = [list(range(m)) for _ in range(600)]  # the sybils' shared positions
    holders += [sorted(rng.choice(m, size=int(rng.integers(0, 6)), replace=False).tolist()) for _ in range(3000)]
    holders += [sorted(rng.choice(m, size=filters._long_run(m) - 1, replace=False).tolist()) for _ in range(200)]
    keys, bits = _keys(holders, m)
    common = np.zeros(m * m, dtype=np.int64)
    enumerated = _pair_counts(keys.copy(), bits, m, common)
    assert np.array_equal(common, _naive_pairs(holders, m))
    # fewer than _long_run(m) / 2 enumerated pairs per entry, whatever the miners sent
    assert enumerated <= keys.size * filters._long_run(m) / 2, enumerated
    assert enumerated < 600 * m  # the old count was 600·m(m−1)/2 + the rest


@pytest.mark.parametrize("long_run", [2, 3, 8, 10**9])
def test_dense_and_enumerated_pair_counts_agree(monkeypatch, long_run):
    """Whatever the split between dense (XᵀX) and enumerated runs, the counts are the same exact integers."""
    monkeypatch.setattr(filters, "LONG_RUN_MIN", long_run)
    monkeypatch.setattr(filters, "_DENSE_CELLS", 64)  # several dense blocks
    rng = np.random.default_rng(long_run % 1000)
    for m in (2, 5, 16, 40):
        holders = [sorted(rng.choice(m, size=int(rng.integers(0, m + 1)), replace=False).tolist())
                   for _ in range(300)]
        keys, bits = _keys(holders, m)
        common = np.zeros(m * m, dtype=np.int64)
        _pair_counts(keys, bits, m, common)
        assert np.array_equal(common, _naive_pairs(holders, m)), m


def test_sybil_flood_through_the_wire_is_exact_and_names_the_later_copies():
    """40 miners, 30 of them sybils re-uploading one honest shard (read back through the wire): the
    estimates of the copies are exactly 1 (a copy shares every sampled position) and every later
    sybil is zeroed; the honest miners are untouched."""
    gen = torch.Generator().manual_seed(4)
    victim = _through_wire(_encoded(_random_idx(gen)), "//stage1-victim")
    sybil = _through_wire(_encoded(victim.indices()), "//stage1-sybil")
    sets = {u: {"w": _encoded(_random_idx(gen))} for u in range(10)}
    sets[0] = {"w": victim}
    sets.update({u: {"w": sybil} for u in range(10, 40)})
    times = {u: float(u) for u in sets}
    for salt in (1, 2):
        uids, ov = overlap_matrix(sets, salt)
        assert torch.all(ov[10:, 0] == 1.0) and float(ov[1:10, 0].max()) < 0.1
        v = copy_verdicts(sets, times, HP, salt)
        assert all(v[u].factor == 0.0 for u in range(10, 40))
        assert all(v[u].factor == 1.0 for u in range(10))


# --- secrecy: the sample must not be learnable across windows ----------------------------------


def _probe_window(space: int, probes: list[int], m: int, fill: int) -> dict:
    """One window of a probing attacker: uid 0 holds every position; uids 1.. hold one probe position
    each (overlap with uid 0 is 1 iff the probe is in the sample, else 0)."""
    sets: dict[int, dict[str, torch.Tensor]] = {0: {"w": torch.arange(space)}}
    for u in range(1, m):
        x = probes[u - 1] if u - 1 < len(probes) else space + fill * m + u  # spare uids: a position of their own
        sets[u] = {"w": torch.tensor([x])}
    return sets


def test_a_sample_learned_by_probing_earlier_windows_does_not_let_a_copier_through():
    """The attack the fixed per-validator salt allowed: over a few windows, sybils holding one position
    each read (from the overlap, or the copy factor their weights reveal) whether that position is in the
    validator's sample; the sample was the same every window, so a copier then copied its victim only
    on unsampled positions and read as a 0 % overlap while sharing 75 %. The sample is now drawn afresh
    for every window (keyed by the secret and the window's shards), so what was learned is worthless."""
    m, space = 64, 512
    rate = sample_rate(m)
    for salt in (11, 12, 13):
        sampled: set[int] = set()
        known: set[int] = set()
        for w in range(0, space, m - 1):  # ~9 probing windows of 63 single-position sybils
            probes = list(range(w, min(w + m - 1, space)))
            _, ov = overlap_matrix(_probe_window(space, probes, m, w), salt)
            for u, x in enumerate(probes, start=1):
                known.add(x)
                if float(ov[u, 0]) == 1.0:
                    sampled.add(x)
        assert len(known) == space and 0.1 < len(sampled) / space < 0.4  # the probes read a rate-1/4 sample
        unsampled = sorted(known - sampled)
        gen = torch.Generator().manual_seed(salt)
        victim = torch.tensor(sorted(torch.randperm(space, generator=gen)[:128].tolist()))
        copied = [x for x in victim.tolist() if x not in sampled]  # ~96 of 128: only where nobody looks
        filler = [x for x in sorted(sampled) if x not in set(victim.tolist())][: 128 - len(copied)]
        copier = torch.tensor(sorted(copied + filler))
        true = len(set(copied)) / 128
        assert true > 0.6 and len(unsampled) > 0
        sets = {0: {"w": victim}, 1: {"w": copier}}
        sets.update({u: {"w": torch.tensor([space + 1000 + u])} for u in range(2, m)})
        _, ov = overlap_matrix(sets, salt)
        n = rate * 128
        sigma = math.sqrt(true * (1 - true) / n)
        assert abs(float(ov[1, 0]) - true) < 5 * sigma, (float(ov[1, 0]), true)
        v = copy_verdicts(sets, {u: float(u) for u in sets}, HP, salt)
        assert v[1].factor == 0.0 and v[1].copied_from == 0


def test_the_sample_is_fresh_each_window_and_deterministic_within_one():
    """Same positions, another window's tables (every honest shard changes every window): another sample;
    the very same shards: the very same counts (a validator's verdicts are reproducible)."""
    gen = torch.Generator().manual_seed(9)
    idx = [_random_idx(gen) for _ in range(20)]
    sets_w1 = {u: {"w": _encoded(ix)} for u, ix in enumerate(idx)}
    sets_w2 = {u: {"w": _encoded(ix, TABLE * 1.01)} for u, ix in enumerate(idx)}
    sets_w2[19] = {"w": _encoded(idx[19])}  # even one unchanged miner cannot pin the sample
    a, b = overlap_matrix(sets_w1, 5)[1], overlap_matrix(sets_w2, 5)[1]
    assert not torch.equal(a, b)
    assert torch.equal(a, overlap_matrix(dict(sets_w1), 5)[1])


# --- the statistical bound of the sampled mode --------------------------------------------------


@pytest.mark.parametrize("pattern", ["random", "blocks", "stride"])
def test_sampled_estimate_error_within_its_stated_bound_for_crafted_copy_patterns(pattern):
    """A copier shares p = 60 % of its victim's positions, picked at random, in contiguous blocks, or on
    every other position (the multiply-shift sample is a rotation, so structured sets are the ones to try).
    Over 150 windows (fresh samples) the estimate's mean is p up to the stated ratio bias (the smaller of
    two sampled sizes in the denominator: relative √((1 − p)(1 − r)/(π n))), its spread within 1.25x the
    stated σ = √(p(1 − p)(1 − r)/n), and the Chebyshev tail bound P(|p̂ − p| ≥ t) ≤ σ²/t² holds."""
    m, size, space = 64, 2000, 1 << 16
    rate = sample_rate(m)
    gen = torch.Generator().manual_seed(21)
    perm = torch.randperm(space, generator=gen)
    victim = perm[:size].sort().values
    fresh = perm[size : 2 * size]
    if pattern == "random":
        keep = torch.randperm(size, generator=gen)[: int(0.6 * size)]
    elif pattern == "blocks":
        keep = torch.arange(int(0.6 * size))
    else:
        keep = torch.cat([torch.arange(0, size, 2), torch.arange(1, size, 10)])[: int(0.6 * size)]
    copier = torch.unique(torch.cat([victim[keep], fresh[: size - keep.numel()]]))
    p = keep.numel() / size
    others = {u: {"w": torch.tensor([space + u])} for u in range(2, m - 1)}
    est = []
    for window in range(150):
        sets = {0: {"w": victim}, 1: {"w": copier}, m - 1: {"w": torch.tensor([space + m + window])}, **others}
        est.append(float(overlap_matrix(sets, 77)[1][1, 0]))
    est_t = torch.tensor(est, dtype=torch.float64)
    n = rate * size
    sigma = math.sqrt(p * (1 - p) * (1 - rate) / n)
    bias = p * math.sqrt((1 - p) * (1 - rate) / (math.pi * n))
    assert abs(float(est_t.mean()) - (p + bias)) < 4 * sigma / math.sqrt(len(est)), (float(est_t.mean()), p, bias)
    assert float(est_t.std()) < 1.25 * sigma
    for t in (2 * sigma, 3 * sigma):
        assert float(((est_t - p).abs() >= t).double().mean()) <= sigma**2 / t**2


def test_a_parameter_only_one_miner_holds_is_sampled_like_the_others():
    """Sampled mode: a parameter held by a single miner entered its size unsampled (1/r times too large),
    so its overlaps read low (0.2 for a true 0.5 at r = 1/4). Shards through the wire all carry the same
    parameters, but overlap_matrix takes any dicts."""
    gen = torch.Generator().manual_seed(2)
    w = _encoded(_random_idx(gen))
    sets = {0: {"w": w, "x0": _encoded(_random_idx(gen))}, 1: {"w": w, "x1": _encoded(_random_idx(gen))}}
    sets.update({u: {"w": _encoded(_random_idx(gen))} for u in range(2, 64)})
    _, ov = overlap_matrix(sets, 3)
    n = sample_rate(64) * 2 * LAYOUT.n_values
    assert abs(float(ov[1, 0]) - 0.5) < 5 * math.sqrt(0.25 / n), float(ov[1, 0])


def test_sampled_estimate_on_encoded_shards_copying_whole_chunks():
    """The encoded path (chunk-order keys, hashed per slab with its offset): a copier taking its victim's
    indices in 60 % of the chunks (whole blocks of a layer) and its own elsewhere is read within the
    stated σ over 60 windows, unbiased up to the stated ratio bias, and zeroed in every window."""
    m = 64
    rate = sample_rate(m)
    gen = torch.Generator().manual_seed(8)
    victim_idx, own = _random_idx(gen), _random_idx(gen)
    chunks = torch.randperm(LAYOUT.n_chunks, generator=gen)[: int(0.6 * LAYOUT.n_chunks)]
    copier_idx = own.clone()
    copier_idx[chunks] = victim_idx[chunks]
    victim, copier = _encoded(victim_idx), _encoded(copier_idx)
    p = len(set(victim.positions().reshape(-1).tolist()) & set(copier.positions().reshape(-1).tolist())) / LAYOUT.n_values
    fillers = [_encoded(_random_idx(gen)) for _ in range(4)]
    last = _random_idx(gen)  # its table changes every window, as an honest miner's does
    est = []
    for window in range(60):
        sets = {0: {"w": victim}, 1: {"w": copier}}
        sets.update({u: {"w": fillers[u % 4]} for u in range(2, m)})
        sets[m - 1] = {"w": _encoded(last, TABLE + window)}
        est.append(float(overlap_matrix(sets, 5)[1][1, 0]))
        if window < 3:
            assert copy_verdicts(sets, {u: float(u) for u in sets}, HP, 5)[1].factor == 0.0
    est_t = torch.tensor(est, dtype=torch.float64)
    n = rate * LAYOUT.n_values
    sigma = math.sqrt(p * (1 - p) * (1 - rate) / n)
    bias = p * math.sqrt((1 - p) * (1 - rate) / (math.pi * n))
    assert abs(float(est_t.mean()) - (p + bias)) < 4 * sigma / math.sqrt(len(est)), (float(est_t.mean()), p, bias)
    assert float(est_t.std()) < 1.3 * sigma and float(est_t.min()) > HP.copy_zero_overlap
