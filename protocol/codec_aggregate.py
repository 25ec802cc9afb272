"""Aggregation of peers' SparseLoCo updates and the outer step: the consensus-critical arithmetic.

After a window's deadline every honest node (miners and validators alike) decodes the gathered
peers' updates, clips each to the median of the peers' global L2 norms, averages them (the SparseLoCo
mean) and applies plain outer SGD θ ← θ − α·mean. All of them must land on the bit-identical θ, so:

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


def clip_factors(norms: Mapping[str, float]) -> dict[str, float]:
    """Per-peer scale min(1, median / norm): no peer weighs more than the median peer."""
    if not norms:
        return {}
    values = [norms[peer] for peer in sorted(norms)]
    if not all(math.isfinite(v) and v >= 0 for v in values):
        raise ValueError("peer norms must be finite and non-negative")
    median = statistics.median(values)
    return {peer: (median / n if n > median else 1.0) for peer, n in norms.items()}


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
    by_peer: Mapping[str, Mapping[str, Any]], norms: Mapping[str, float] | None, norm_of: Callable[[Any], float]
) -> tuple[list[str], list[str], dict[str, float]]:
    """Tensor names (the same for every peer), peers in sorted order and each peer's clip factor."""
    names = _check_peers({peer: sorted(tensors) for peer, tensors in by_peer.items()})
    peers = sorted(by_peer)
    if norms is None:
        norms = {peer: norm_of(by_peer[peer]) for peer in peers}
    return names, peers, clip_factors({peer: norms[peer] for peer in peers})


@torch.no_grad()
def aggregate(updates: Mapping[str, Update], norms: Mapping[str, float] | None = None) -> dict[str, torch.Tensor]:
    """Median-norm-clipped mean of dense updates, keyed by peer id; float32, on the first peer's device.

    Pass `norms` (e.g. from `update_norm`) for a result that is identical across devices; by default
    they are computed from the dense tensors.
    """
    names, peers, factors = _plan(updates, norms, dense_norm)
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
) -> dict[str, torch.Tensor]:
    """Median-norm-clipped mean of encoded updates keyed by peer id, as dense float32 on `device`.

    Indices must be unique within each chunk (read_shard guarantees it for downloaded shards).
    """
    names, peers, factors = _plan(shards, norms, update_norm)
    out: dict[str, torch.Tensor] = {}
    for name in names:
        layout = shards[peers[0]][name].layout
        acc = torch.zeros(layout.numel, dtype=torch.float64, device=device)
        for peer in peers:
            enc = shards[peer][name]
            if enc.layout != layout:
                raise ValueError(f"peer {peer}: {name} was encoded with a different layout")
            enc = enc.to(device)
            pos = enc.positions().reshape(-1)
            acc[pos] = acc[pos] + enc.values().reshape(-1).to(torch.float64) * factors[peer]
        out[name] = (acc / len(peers)).to(torch.float32).reshape(layout.shape)
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
