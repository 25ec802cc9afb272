"""Yuma-style consensus for the devnet chain: how validators' weights become miners' incentive.

This is the part of subtensor's epoch that Crucible's incentive design depends on, reduced to what a
one-machine network needs and kept readable:

1. active stake `S`: stake of neurons holding a validator permit (and active within the activity
   cutoff), normalised to sum 1;
2. weights `W`: each permitted validator's row, self-weight removed, weights set before the target
   uid was (re-)registered masked out, rows normalised;
3. consensus `C_j`: the stake-weighted kappa-quantile of column j (kappa = 0.5 → stake median), i.e.
   the largest weight that validators holding at least kappa of the stake give to j;
4. clipping `W̄ = min(W, C)`: a validator cannot push a miner above what the majority agrees on;
5. rank `R = Sᵀ W̄`, incentive `I = R / ΣR`, trust `T = R / (Sᵀ W)`;
6. dividends: instantaneous bonds `B_ij = S_i W̄_ij / Σ_k S_k W̄_kj`, `D_i = Σ_j B_ij I_j`, normalised.

7. validator trust `VT_i = Σ_j W̄_ij`: the part of validator i's normalised row that survived the clip
   (subtensor's `ValidatorTrust`); 1 when a validator agrees with consensus, lower the more of its
   weight went where the stake majority did not follow. A validator holding more than kappa of the
   stake is the consensus on its own, so its vtrust is 1.

Simplifications (said out loud), against subtensor's `epoch/run_epoch.rs`: bonds are instantaneous, not
an EMA (no `BondsMovingAverage`, no liquid alpha, no Yuma3 bond penalty); no mechanisms (one weight
matrix); emission is a fixed amount per block split by `validator_share`, not the alpha/TAO pool flow;
weights of deregistered validators and the owner's hotkey get no special treatment.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class YumaResult:
    consensus: np.ndarray
    rank: np.ndarray
    trust: np.ndarray
    incentive: np.ndarray
    dividends: np.ndarray
    validator_trust: np.ndarray


def _normalise(x: np.ndarray) -> np.ndarray:
    total = float(x.sum())
    return x / total if total > 0 else np.zeros_like(x)


def weighted_quantile_columns(stake: np.ndarray, weights: np.ndarray, kappa: float) -> np.ndarray:
    """Per column j, the largest w such that Σ{S_i : W_ij ≥ w} ≥ kappa·ΣS (0 if nobody reaches it)."""
    n_rows, n_cols = weights.shape
    out = np.zeros(n_cols)
    total = float(stake.sum())
    if total <= 0 or n_rows == 0:
        return out
    need = kappa * total
    for j in range(n_cols):
        order = np.argsort(-weights[:, j], kind="stable")
        support = np.cumsum(stake[order])
        reached = np.nonzero(support >= need - 1e-12)[0]
        if reached.size:
            out[j] = weights[order[reached[0]], j]
    return out


def yuma(
    stake: np.ndarray,
    permits: np.ndarray,
    active: np.ndarray,
    weights: np.ndarray,
    weights_set_at: np.ndarray,
    registered_at: np.ndarray,
    kappa: float,
) -> YumaResult:
    """One epoch of consensus over n neurons.

    `weights` is the n×n raw weight matrix (any non-negative scale), `weights_set_at[i]` the block
    validator i last set weights, `registered_at[j]` the block uid j was registered.
    """
    n = stake.shape[0]
    s = _normalise(np.where(permits & active, stake.astype(float), 0.0))
    w = weights.astype(float).copy()
    np.fill_diagonal(w, 0.0)
    # A weight set before the target uid was (re-)registered scored the previous owner: drop it.
    w[weights_set_at[:, None] <= registered_at[None, :]] = 0.0
    w[s == 0] = 0.0
    row_sums = w.sum(axis=1, keepdims=True)
    w = np.divide(w, row_sums, out=np.zeros_like(w), where=row_sums > 0)

    consensus = weighted_quantile_columns(s, w, kappa)
    clipped = np.minimum(w, consensus[None, :])
    rank = s @ clipped
    preranks = s @ w
    trust = np.divide(rank, preranks, out=np.zeros(n), where=preranks > 0)
    incentive = _normalise(rank)

    bond_delta = s[:, None] * clipped
    col = bond_delta.sum(axis=0, keepdims=True)
    bonds = np.divide(bond_delta, col, out=np.zeros_like(bond_delta), where=col > 0)
    dividends = _normalise(bonds @ incentive)
    return YumaResult(
        consensus=consensus,
        rank=rank,
        trust=trust,
        incentive=incentive,
        dividends=dividends,
        validator_trust=clipped.sum(axis=1),
    )
