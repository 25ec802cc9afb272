"""Aggregation of peers' SparseLoCo updates and the outer step: the consensus-critical arithmetic.

After a window's deadline every honest node (miners and validators alike) decodes the gathered
peers' updates, clips each to the window's clip norm, averages them (the SparseLoCo mean) and applies
plain outer SGD θ ← θ − α·mean. The clip norm is the LOWER median of the peers' global L2 norms,
capped by a ceiling: with up to half of the peers hostile the lower median is still an honest
peer's norm (the plain median of two would average in the attacker's), and the ceiling
(`outer.clip_growth` × the previous window's clip norm, and `outer.max_update_norm`) clips a window
whose only shard is an attacker's. The validator chooses it and writes it in the window's signed
aggregate record; every node applies the record's value, so all of them use the same number.
All of them must land on the bit-identical θ, so:

- peers are always visited in sorted order of their id (the hotkey), whatever order they arrived in;
- norms come from the encoded form (integer code counts × float32 table entries, summed with
  `math.fsum`), which no device's reduction order can change;
- the sum runs in float64 with one correctly rounded multiply and one add per element and peer, and
  only element-wise kernels touch θ, so CPU and CUDA nodes agree.

`aggregate` works on dense updates (any producer); `aggregate_encoded` is the memory-light path the
neurons use: it scatters each peer's kept values straight into the accumulator, never materialising a
dense update, and gives bit-for-bit the result of `aggregate` fed with the same norms.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping
from typing import Any

import torch

from protocol.codec import EncodedTensor

Update = Mapping[str, torch.Tensor]


def update_norm(encoded: Mapping[str, EncodedTensor]) -> float:
    """Global L2 norm of one peer's decoded update, identical on every node and device."""
    return math.sqrt(math.fsum(enc.sq_norm() for enc in encoded.values()))


def dense_norm(update: Update) -> float:
    """Global L2 norm of a dense update (float64 on the tensors' device; device-dependent last bits)."""
    return math.sqrt(math.fsum(float(t.to(torch.float64).square().sum()) for t in update.values()))


def robust_clip_norm(norms: Mapping[Any, float], ceiling: float = math.inf) -> float:
    """min(lower median of the peers' norms, ceiling): set by honest peers while they are at least half."""
    values = [norms[peer] for peer in sorted(norms)]
    if not values:
        raise ValueError("a clip norm needs at least one peer")
    if not all(math.isfinite(v) and v >= 0 for v in values) or not ceiling > 0:
        raise ValueError("peer norms must be finite and non-negative, the ceiling positive")
    return min(statistics.median_low(values), ceiling)


def clip_factors(norms: Mapping[Any, float], clip_norm: float | None = None) -> dict[Any, float]:
    """Per-peer scale min(1, clip_norm / norm), clip_norm defaulting to `robust_clip_norm(norms)`."""
    if not norms:
        return {}
    if clip_norm is None:
        clip_norm = robust_clip_norm(norms)
    if not all(math.isfinite(v) and v >= 0 for v in norms.values()):
        raise ValueError("peer norms must be finite and non-negative")
    if not (math.isfinite(clip_norm) and clip_norm >= 0):
        raise ValueError(f"clip norm must be finite and non-negative, got {clip_norm}")
    return {peer: (clip_norm / n if n > clip_norm else 1.0) for peer, n in norms.items()}


def _check_peers(names_by_peer: Mapping[str, list[str]]) -> list[str]:
    if not names_by_peer:
        raise ValueError("aggregate needs at least one peer")
    peers = sorted(names_by_peer)
    names = names_by_peer[peers[0]]
    for peer in peers[1:]:
        if names_by_peer[peer] != names:
            raise ValueError(f"peer {peer} carries different parameters than peer {peers[0]}")
    return names


def _plan(
    by_peer: Mapping[str, Mapping[str, Any]], norms: Mapping[str, float] | None, norm_of: Callable[[Any], float],
    clip_norm: float | None,
) -> tuple[list[str], list[str], dict[str, float]]:
    """Tensor names (the same for every peer), peers in sorted order and each peer's clip factor."""
    names = _check_peers({peer: sorted(tensors) for peer, tensors in by_peer.items()})
    peers = sorted(by_peer)
    if norms is None:
        norms = {peer: norm_of(by_peer[peer]) for peer in peers}
    return names, peers, clip_factors({peer: norms[peer] for peer in peers}, clip_norm)


@torch.no_grad()
def aggregate(
    updates: Mapping[str, Update], norms: Mapping[str, float] | None = None, clip_norm: float | None = None
) -> dict[str, torch.Tensor]:
    """Median-norm-clipped mean of dense updates, keyed by peer id; float32, on the first peer's device.

    Pass `norms` (e.g. from `update_norm`) for a result that is identical across devices; by default
    they are computed from the dense tensors.
    """
    names, peers, factors = _plan(updates, norms, dense_norm, clip_norm)
    out: dict[str, torch.Tensor] = {}
    for name in names:
        first = updates[peers[0]][name]
        acc = torch.zeros(first.shape, dtype=torch.float64, device=first.device)
        for peer in peers:
            tensor = updates[peer][name]
            if tensor.shape != first.shape:
                raise ValueError(f"peer {peer}: {name} has shape {tuple(tensor.shape)}, want {tuple(first.shape)}")
            acc += tensor.to(device=acc.device, dtype=torch.float64) * factors[peer]
        out[name] = (acc / len(peers)).to(torch.float32)
    return out


@torch.no_grad()
def aggregate_encoded(
    shards: Mapping[str, Mapping[str, EncodedTensor]],
    device: torch.device | str = "cpu",
    norms: Mapping[str, float] | None = None,
    clip_norm: float | None = None,
) -> dict[str, torch.Tensor]:
    """Clipped mean of encoded updates keyed by peer id, as dense float32 on `device`.

    Each peer is scaled by min(1, clip_norm / its norm); clip_norm defaults to the lower median.

    Indices must be unique within each chunk (read_shard guarantees it for downloaded shards).
    """
    names, peers, factors = _plan(shards, norms, update_norm, clip_norm)
    out: dict[str, torch.Tensor] = {}
    largest = max((shards[peers[0]][name].layout.numel for name in names), default=0)
    buffer = torch.empty(largest, dtype=torch.float64, device=device)  # one float64 accumulator, reused
    for name in names:
        layout = shards[peers[0]][name].layout
        acc = buffer[: layout.numel].zero_()
        for peer in peers:
            enc = shards[peer][name]
            if enc.layout != layout:
                raise ValueError(f"peer {peer}: {name} was encoded with a different layout")
            enc = enc.to(device)
            # value·factor for each of the 4 table entries is the same correctly rounded float64 product
            # as per element; positions are unique per peer, so one index_add_ adds each exactly once.
            table = enc.lookup.to(torch.float64) * factors[peer]
            acc.index_add_(0, enc.positions().reshape(-1), table[enc.code_values()])
        out[name] = acc.div_(len(peers)).to(torch.float32).reshape(layout.shape)
    return out


@torch.no_grad()
def apply_outer_step(
    target: torch.nn.Module | Mapping[str, torch.Tensor], aggregated: Update, lr: float
) -> None:
    """Outer SGD in place: θ ← θ − lr·aggregated, for every parameter (names must match exactly)."""
    params = dict(target.named_parameters()) if isinstance(target, torch.nn.Module) else dict(target)
    if set(params) != set(aggregated):
        missing = sorted(set(params) - set(aggregated))[:3]
        extra = sorted(set(aggregated) - set(params))[:3]
        raise ValueError(f"outer step: parameter names differ (missing {missing}, unexpected {extra})")
    for name in sorted(params):
        param = params[name]
        step = aggregated[name]
        if step.shape != param.shape:
            raise ValueError(f"outer step: {name} has shape {tuple(step.shape)}, want {tuple(param.shape)}")
        step = step.to(device=param.device, dtype=torch.float32)
        if lr != 1.0:
            step = step * lr  # a separate kernel: no fused multiply-add, same bits on every device
        param.sub_(step.to(param.dtype))
