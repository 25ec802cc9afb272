"""Honest miners of graded strength for the devnet: does pay follow contribution? (issue 20)

`crucible devnet run --miner-profile Q0 --miner-profile Q1 …` gives honest miner i an update QUALITY
Q_i in (0, 1] (the last value repeats): the miner trains honestly, then publishes, per tensor, the
direction Q·d̂ + (1 − Q)·n̂ (d̂ its own update's direction, n̂ a random one, fresh every window) at
its own update's norm. So every profile sends an update of the same size — the validator's
lower-median clip cannot flatten the differences — and only its usefulness changes: Q = 1 is the
honest miner, Q → 0 a noise miner. It stands for a weaker honest miner (fewer or noisier samples
per step, a worse optimiser) whose work is genuine but worth less. Devnet only: the node never
imports this module; `devnet.participant` wraps the miner's `make_update` when `--quality` is given.
"""

from __future__ import annotations

import hashlib

import torch


def degrade(delta: dict[str, torch.Tensor], quality: float, seed: bytes) -> dict[str, torch.Tensor]:
    """Each tensor's direction mixed with a random one (weight 1 − quality), at the tensor's own norm."""
    if not 0.0 < quality <= 1.0:
        raise ValueError(f"quality must be in (0, 1], got {quality}")
    if quality == 1.0:
        return dict(delta)
    gen = torch.Generator().manual_seed(int.from_bytes(hashlib.blake2b(seed, digest_size=8).digest(), "little"))
    out = {}
    for name in sorted(delta):
        d = delta[name]
        r = torch.randn(d.shape, generator=gen, dtype=torch.float32).to(device=d.device, dtype=d.dtype)
        norm = d.norm()
        mix = quality * d / norm.clamp_min(1e-12) + (1.0 - quality) * r / r.norm().clamp_min(1e-12)
        out[name] = mix * (norm / mix.norm().clamp_min(1e-12))
    return out


def apply_profile(miner, quality: float):
    """Wrap `miner.make_update` so it publishes `degrade(delta, quality)`; returns the miner."""
    if quality == 1.0:
        return miner
    inner = miner.make_update
    hotkey = getattr(getattr(miner, "node", None), "hotkey", "")

    def make_update(window: int, delta: dict[str, torch.Tensor]):
        return inner(window, degrade(delta, quality, f"profile:{hotkey}:{window}".encode()))

    miner.make_update = make_update
    return miner
