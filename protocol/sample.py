"""The sync debug sample: which parameter values a shard carries, and in what order.

Every shard carries the miner's θ_w at a few positions drawn from the window's seed, so validators
can tell how far behind the global model a miner is (`gauntlet.filters.sync_score`) while no miner
can predict which values will be checked. The miner builds the sample and every validator checks it
with these same functions; the sample's length is `hparams.shard.debug_sample_size`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import numpy as np
import torch


def debug_positions(window_seed: bytes, param_numels: Mapping[str, int], n: int) -> dict[str, torch.Tensor]:
    """Up to `n` positions, uniform over all parameter values, drawn from the window seed.

    The miner (to build its debug sample) and every validator (to check it) call this with the same
    arguments and get the same positions; without the seed they cannot be predicted. Positions are
    drawn with SHAKE-256 over the seed (no RNG library whose stream could change between versions),
    placed on the parameters concatenated in sorted-name order, de-duplicated and sorted. Only
    parameters that received at least one position appear in the result (int64 local flat indices).
    """
    if n < 1:
        raise ValueError(f"n must be ≥ 1, got {n}")
    names = sorted(param_numels)
    numels = [int(param_numels[k]) for k in names]
    if any(m < 0 for m in numels):
        raise ValueError("parameter sizes must be ≥ 0")
    total = sum(numels)
    if total == 0:
        return {}
    stream = hashlib.shake_256(b"crucible/debug-positions/v1\x00" + bytes(window_seed)).digest(8 * n)
    draws = np.frombuffer(stream, dtype="<u8") % np.uint64(total)  # bias < total / 2^64: negligible
    flat = torch.from_numpy(np.unique(draws).astype(np.int64))
    ends = torch.tensor(np.cumsum(numels), dtype=torch.int64)
    owner = torch.searchsorted(ends, flat, right=True)
    starts = ends - torch.tensor(numels, dtype=torch.int64)
    out: dict[str, torch.Tensor] = {}
    for i in torch.unique(owner).tolist():
        sel = flat[owner == i]
        out[names[i]] = sel - starts[i]
    return out


def gather_sample(
    params: Mapping[str, torch.Tensor], positions: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Values of `params` at `positions` (float32, CPU): a debug sample, or the validator's own."""
    return {
        name: params[name].detach().reshape(-1)[idx.to(params[name].device)].to("cpu", torch.float32)
        for name, idx in positions.items()
    }


def flat_sample(sample: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """A debug sample as one float32 vector in canonical order: names sorted, positions ascending.

    This is the order of `debug_positions`; a shard's `debug.values` tensor holds exactly this.
    """
    if not sample:
        return torch.empty(0, dtype=torch.float32)
    return torch.cat([sample[k].detach().reshape(-1).to("cpu", torch.float32) for k in sorted(sample)])


def split_sample(
    values: torch.Tensor, positions: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor] | None:
    """Inverse of `flat_sample` for the window's positions; None if the length does not match."""
    names = sorted(positions)
    counts = [len(positions[k]) for k in names]
    flat = values.reshape(-1)
    if flat.numel() != sum(counts):
        return None
    return dict(zip(names, torch.split(flat, counts), strict=True))
