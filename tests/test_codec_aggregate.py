"""Aggregation and the outer step: median-norm clipping, the mean, bit-identical results in any order."""

from __future__ import annotations

import math
import random

import pytest
import torch

from protocol.codec import Compressor, decode
from protocol.codec_aggregate import (
    aggregate,
    aggregate_encoded,
    apply_outer_step,
    clip_factors,
    dense_norm,
    robust_clip_norm,
    update_norm,
)
from protocol.hparams import SparseLoCoHParams

HP = SparseLoCoHParams(chunk_2d=8, chunk_1d=16, topk=4)
SHAPES = {"w": (24, 16), "b": (33,), "n": (5,)}


def make_peers(n: int, seed: int = 0) -> dict[str, dict]:
    """n peers' encoded updates at very different scales, keyed by a hotkey-like id."""
    gen = torch.Generator().manual_seed(seed)
    peers = {}
    for i in range(n):
        comp = Compressor(HP)
        scale = 10.0 ** (i - 2)
        peers[f"5Peer{i:02d}"] = comp.encode_all(
            {name: torch.randn(shape, generator=gen) * scale for name, shape in SHAPES.items()}
        )
    return peers


def shuffled(mapping: dict, seed: int) -> dict:
    keys = list(mapping)
    random.Random(seed).shuffle(keys)
    return {k: mapping[k] for k in keys}


def test_update_norm_matches_the_dense_norm():
    for encoded in make_peers(3).values():
        dense = {name: decode(enc) for name, enc in encoded.items()}
        assert math.isclose(update_norm(encoded), dense_norm(dense), rel_tol=1e-12)


def test_clip_factors_cap_every_peer_at_the_lower_median_norm():
    factors = clip_factors({"a": 1.0, "b": 2.0, "c": 3.0, "d": 100.0})
    assert factors["a"] == 1.0 and factors["b"] == 1.0  # the lower median of four is the 2nd smallest
    assert math.isclose(factors["c"] * 3.0, 2.0) and math.isclose(factors["d"] * 100.0, 2.0)
    assert clip_factors({"solo": 7.0}) == {"solo": 1.0}
    assert clip_factors({"solo": 7.0}, clip_norm=3.5) == {"solo": 0.5}  # a single shard is clipped too
    assert clip_factors({"z": 0.0, "y": 0.0}) == {"z": 1.0, "y": 1.0}
    with pytest.raises(ValueError):
        clip_factors({"a": float("nan")})


def test_aggregate_is_the_mean_of_median_clipped_updates():
    peers = make_peers(5)
    dense = {p: {n: decode(e) for n, e in enc.items()} for p, enc in peers.items()}
    norms = {p: dense_norm(u) for p, u in dense.items()}
    median = sorted(norms.values())[2]  # five peers: the lower median is the middle one
    out = aggregate(dense)
    for name, shape in SHAPES.items():
        want = sum(dense[p][name].double() * min(1.0, median / norms[p]) for p in dense) / len(dense)
        assert out[name].shape == shape and out[name].dtype == torch.float32
        assert torch.allclose(out[name].double(), want, rtol=1e-6, atol=1e-12)
    # the largest peer (100× the median) contributes no more than the median peer's norm
    big = max(norms, key=norms.get)
    clipped = {n: dense[big][n] * clip_factors(norms)[big] for n in SHAPES}
    assert math.isclose(dense_norm(clipped), median, rel_tol=1e-6)


def test_aggregation_is_bit_identical_in_any_peer_order():
    peers = make_peers(6, seed=1)
    dense = {p: {n: decode(e) for n, e in enc.items()} for p, enc in peers.items()}
    base_dense, base_enc = aggregate(dense), aggregate_encoded(peers)
    for seed in range(5):
        again_dense = aggregate(shuffled(dense, seed))
        again_enc = aggregate_encoded(shuffled(peers, seed))
        for name in SHAPES:
            assert torch.equal(again_dense[name], base_dense[name])
            assert torch.equal(again_enc[name], base_enc[name])


def test_encoded_path_equals_dense_path_bit_for_bit():
    peers = make_peers(4, seed=2)
    dense = {p: {n: decode(e) for n, e in enc.items()} for p, enc in peers.items()}
    norms = {p: update_norm(enc) for p, enc in peers.items()}
    a, b = aggregate(dense, norms=norms), aggregate_encoded(peers)
    for name in SHAPES:
        assert torch.equal(a[name], b[name])


def test_aggregate_rejects_empty_or_mismatched_peers():
    with pytest.raises(ValueError):
        aggregate({})
    with pytest.raises(ValueError):
        aggregate({"a": {"w": torch.ones(2)}, "b": {"v": torch.ones(2)}})
    with pytest.raises(ValueError):
        aggregate({"a": {"w": torch.ones(2)}, "b": {"w": torch.ones(3)}})


def test_apply_outer_step_on_a_module_and_on_a_dict():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    step = {n: torch.randn(p.shape) for n, p in model.named_parameters()}
    apply_outer_step(model, step, lr=1.0)
    for name, param in model.named_parameters():
        assert torch.equal(param.detach(), before[name] - step[name])
    params = {n: t.clone() for n, t in before.items()}
    apply_outer_step(params, step, lr=0.5)
    for name in params:
        assert torch.equal(params[name], before[name] - step[name] * 0.5)
    with pytest.raises(ValueError):
        apply_outer_step(model, {"weight": step["weight"]}, lr=1.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_and_cpu_nodes_compute_the_same_theta():
    peers = make_peers(5, seed=3)
    cpu = aggregate_encoded(peers, device="cpu")
    gpu = aggregate_encoded(peers, device="cuda")
    theta = {n: torch.randn(s, generator=torch.Generator().manual_seed(9)) for n, s in SHAPES.items()}
    theta_gpu = {n: t.cuda() for n, t in theta.items()}
    apply_outer_step(theta, cpu, lr=0.7)
    apply_outer_step(theta_gpu, gpu, lr=0.7)
    for name in SHAPES:
        assert torch.equal(gpu[name].cpu(), cpu[name])
        assert torch.equal(theta_gpu[name].cpu(), theta[name])


def test_attackers_at_half_the_peers_cannot_set_the_clip_norm():
    """Two huge-norm shards (scales near the float32 limit) among four: the aggregate stays honest-sized."""
    honest = make_peers(2, seed=3)
    attackers = {}
    for i, (name, enc) in enumerate(make_peers(2, seed=4).items()):
        attackers[f"zz-attacker-{i}-{name}"] = {
            n: type(e)(e.idx, e.codes, torch.full_like(e.lookup, 3.4e38) * torch.tensor([-1.0, -0.5, 0.5, 1.0]), e.layout)
            for n, e in enc.items()
        }
    shards = {**honest, **attackers}
    norms = {p: update_norm(enc) for p, enc in shards.items()}
    clip = robust_clip_norm(norms)
    assert clip == max(norms[p] for p in honest)  # the lower median of 4 is the larger honest norm
    out = aggregate_encoded(shards, norms=norms, clip_norm=clip)
    total = math.sqrt(sum(float(t.double().square().sum()) for t in out.values()))
    assert math.isfinite(total) and total <= clip * (1 + 1e-6)
    # one attacker alone: the ceiling (growth over the last clip norm) still bounds it
    solo = {"zz": attackers[next(iter(attackers))]}
    capped = robust_clip_norm({"zz": update_norm(solo["zz"])}, ceiling=2 * clip)
    assert capped == 2 * clip
    with pytest.raises(ValueError):
        robust_clip_norm({})


# --- issue 19: the one-pass gather equals the original scatter, digest for digest ----------------


def _reference_aggregate_encoded(shards, norms=None, clip_norm=None):
    """The pre-issue-19 gather: a float64 gather + add + scatter per peer, then divide and cast."""
    peers = sorted(shards)
    names = sorted(shards[peers[0]])
    if norms is None:
        norms = {p: update_norm(shards[p]) for p in peers}
    factors = clip_factors({p: norms[p] for p in peers}, clip_norm)
    out = {}
    for name in names:
        layout = shards[peers[0]][name].layout
        acc = torch.zeros(layout.numel, dtype=torch.float64)
        for peer in peers:
            enc = shards[peer][name]
            pos = enc.positions().reshape(-1)
            acc[pos] = acc[pos] + enc.values().reshape(-1).to(torch.float64) * factors[peer]
        out[name] = (acc / len(peers)).to(torch.float32).reshape(layout.shape)
    return out


def _digest(tensors) -> str:
    import hashlib

    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("n,seed", [(1, 0), (2, 1), (5, 2), (20, 3)])
def test_aggregate_encoded_digest_equals_the_old_gather(n, seed):
    hp = SparseLoCoHParams(chunk_2d=16, chunk_1d=64, topk=9)
    gen = torch.Generator().manual_seed(seed)
    shapes = {"emb": (64, 48), "bias": (130,), "w3": (4, 8, 12)}
    shards = {}
    for i in range(n):
        scale = float(10 ** torch.empty(1).uniform_(-3, 1, generator=gen))
        base = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
        shards[f"peer-{i:02d}"] = Compressor(hp).encode_all({k: v * scale for k, v in base.items()})
    ref = _reference_aggregate_encoded(shards)
    got = aggregate_encoded(shards)
    assert _digest(got) == _digest(ref)
    assert _digest(aggregate_encoded(shards, clip_norm=0.5)) == _digest(_reference_aggregate_encoded(shards, clip_norm=0.5))
    # the θ an outer step lands on is the same too
    theta = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
    theta_ref = {k: v.clone() for k, v in theta.items()}
    apply_outer_step(theta, got, 0.7)
    apply_outer_step(theta_ref, ref, 0.7)
    assert _digest(theta) == _digest(theta_ref)


def test_aggregate_encoded_of_peers_without_tensors_is_empty_like_aggregate():
    """The reused-accumulator path sized its buffer with max() over no tensors and raised; the dense path
    and the pre-buffer code return an empty update."""
    assert aggregate({"a": {}, "b": {}}) == {}
    assert aggregate_encoded({"a": {}, "b": {}}) == {}
