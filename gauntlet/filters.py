"""Gauntlet stage 1: the cheap checks every miner's shard goes through before any evaluation.

* Timeliness is the validator's own observation (`transport.watch`); a late or changed shard
  reaches this module only as a reason.
* Sync: each shard carries a debug sample of the miner's parameters at positions drawn from the
  window's seed (`protocol.sample`), so a lazy miner cannot track a fixed handful of scalars (the
  anchor compares two fixed values per tensor). The validator compares them with its own values:
  x = median|θ_val − θ_miner| / (its own recent per-window change of the same values) is "how many
  windows behind" the miner is; sync = max(0, 1 − min(x, max)/max)^exponent.
* Copies: two honest miners' top-k index sets overlap about as much as random sets (≈ the top-k
  density, 1.6 %); a re-uploaded shard overlaps almost fully. Of a pair with a large overlap, the
  one the validator saw LATER is named the copier and its positive score is halved or zeroed.

Shard format rejections come from the wire module (a `RejectReason` str enum); they are carried as
plain strings in `FilterResult.reject_reason`. Everything here is pure: tensors and floats in,
typed records out, and malformed untrusted input gives a record with a reason, never an exception.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import UTC, datetime

import torch

from gauntlet.records import CopyVerdict, SyncResult
from protocol.hparams import GauntletHParams

Time = float | int | datetime


def to_posix(t: Time) -> float:
    """POSIX seconds of a float or a datetime; a naive datetime is taken as UTC."""
    if isinstance(t, datetime):
        return (t if t.tzinfo is not None else t.replace(tzinfo=UTC)).timestamp()
    return float(t)


def _flatten_sample(sample: Mapping[str, torch.Tensor], names: list[str]) -> torch.Tensor:
    return torch.cat([sample[k].detach().reshape(-1).to("cpu", torch.float64) for k in names])


def step_change(current: Mapping[str, torch.Tensor], previous: Mapping[str, torch.Tensor]) -> float:
    """median|θ_w − θ_{w−1}| over a sample: the validator's own per-window change of those values."""
    names = sorted(current)
    if sorted(previous) != names:
        raise ValueError("current and previous samples must cover the same parameters")
    if not names:
        return 0.0
    return float((_flatten_sample(current, names) - _flatten_sample(previous, names)).abs().median())


def sync_curve(steps_behind: float, hp: GauntletHParams) -> float:
    """max(0, 1 − min(x, max)/max)^exponent: 1 at 0 steps, 0 at sync_max_steps and beyond."""
    if not math.isfinite(steps_behind):
        return 0.0
    x = min(max(steps_behind, 0.0), hp.sync_max_steps)
    return max(0.0, 1.0 - x / hp.sync_max_steps) ** hp.sync_exponent


def _out_of_sync(reason: str) -> SyncResult:
    return SyncResult(steps_behind=math.inf, sync=0.0, penalised=True, reason=reason)


def sync_score(
    own: Mapping[str, torch.Tensor],
    miner: Mapping[str, torch.Tensor],
    reference_change: float | None,
    hp: GauntletHParams,
) -> SyncResult:
    """Compare the miner's debug sample with the validator's own values at the same positions.

    `reference_change` is the validator's recent per-window change of parameter values (see
    `step_change`). When it is missing or zero (no window has changed the model yet), identical
    samples count as 0 steps behind and any difference as fully out of sync.
    """
    names = sorted(own)
    if sorted(miner) != names:
        return _out_of_sync("debug sample covers different parameters than the window's positions")
    for k in names:
        if miner[k].numel() != own[k].numel():
            return _out_of_sync(
                f"debug sample for {k} has {miner[k].numel()} values, expected {own[k].numel()}"
            )
        if not miner[k].is_floating_point():
            return _out_of_sync(f"debug sample for {k} is not floating point")
    if not names:
        return _out_of_sync("empty debug sample")
    theirs = _flatten_sample(miner, names)
    if not torch.isfinite(theirs).all():
        return _out_of_sync("debug sample has non-finite values")
    gap = float((_flatten_sample(own, names) - theirs).abs().median())
    if reference_change is not None and math.isfinite(reference_change) and reference_change > 0:
        x = gap / reference_change
    else:
        x = 0.0 if gap == 0.0 else math.inf
    return SyncResult(steps_behind=x, sync=sync_curve(x, hp), penalised=x > hp.sync_penalty_steps)


IndexSet = torch.Tensor | Mapping[str, torch.Tensor]


def _per_param(indices: IndexSet) -> dict[str, torch.Tensor]:
    """One miner's top-k positions per parameter (a flat tensor is one unnamed parameter), unique."""
    if isinstance(indices, torch.Tensor):
        indices = {"": indices}
    out = {}
    for name, idx in indices.items():
        if idx.is_floating_point() or idx.is_complex():
            raise ValueError(f"indices for {name!r} must be an integer tensor")
        out[name] = torch.unique(idx.reshape(-1).to(torch.int64))
    return out


def overlap_matrix(index_sets: Mapping[int, IndexSet]) -> tuple[list[int], torch.Tensor]:
    """Pairwise overlap |A ∩ B| / min(|A|, |B|) of the miners' top-k index sets (uids ascending).

    Index sets are 1-D tensors of global flat positions or {param name: positions} dicts (equal
    positions in different parameters do not overlap). Per parameter, all miners' positions are
    sorted together; the miners sharing a position then sit next to each other, and comparing the
    sorted array with itself shifted by 1, 2, … (up to the largest group) yields every sharing pair.
    Memory stays O(indices of one parameter) and time O(total indices × largest group).
    """
    uids = sorted(index_sets)
    m = len(uids)
    sets = [_per_param(index_sets[u]) for u in uids]
    sizes = torch.tensor([sum(len(v) for v in s.values()) for s in sets], dtype=torch.float64)
    common = torch.zeros(m * m, dtype=torch.float64)
    for name in sorted({k for s in sets for k in s}):
        held = [(i, s[name]) for i, s in enumerate(sets) if name in s and len(s[name])]
        if len(held) < 2:
            continue
        keys = torch.cat([idx for _, idx in held])
        device = keys.device
        owner = torch.repeat_interleave(
            torch.tensor([i for i, _ in held], device=device),
            torch.tensor([len(idx) for _, idx in held], device=device),
        )
        keys, order = torch.sort(keys, stable=True)
        owner = owner[order]
        group = int(torch.unique_consecutive(keys, return_counts=True)[1].max())
        for d in range(1, group):
            same = keys[:-d] == keys[d:]
            a, b = owner[:-d][same], owner[d:][same]
            common += torch.bincount(torch.cat([a * m + b, b * m + a]), minlength=m * m).to(
                "cpu", torch.float64
            )
    overlap = common.reshape(m, m) / torch.minimum(sizes[:, None], sizes[None, :]).clamp_min(1.0)
    overlap.fill_diagonal_(0.0)
    return uids, overlap


def copy_verdicts(
    index_sets: Mapping[int, IndexSet], first_seen: Mapping[int, Time], hp: GauntletHParams
) -> dict[int, CopyVerdict]:
    """Name the later of every heavily overlapping pair as the copier.

    "Later" is by `first_seen` (when the validator itself first saw the shard: a poll round or a
    time of its own clock, never the miner's). Two shards first seen at the same time cannot be
    ordered, and then neither is named the copier: punishing the original is worse than missing a
    copier, whose update still fails the assigned-vs-random test on its own data.
    Overlap ≥ copy_zero_overlap zeroes the copier's positive score, ≥ copy_halve_overlap halves it.
    """
    missing = set(index_sets) - set(first_seen)
    if missing:
        raise ValueError(f"first-seen times missing for uids {sorted(missing)}")
    uids, overlap = overlap_matrix(index_sets)
    t = torch.tensor([to_posix(first_seen[u]) for u in uids], dtype=torch.float64)
    later = t[:, None] > t[None, :]
    best, source = (overlap * later).max(dim=1) if uids else (torch.zeros(0), torch.zeros(0))
    verdicts: dict[int, CopyVerdict] = {}
    for i, uid in enumerate(uids):
        b = float(best[i])
        factor = 0.0 if b >= hp.copy_zero_overlap else 0.5 if b >= hp.copy_halve_overlap else 1.0
        copied_from = uids[int(source[i])] if b > 0 else None
        verdicts[uid] = CopyVerdict(overlap=min(b, 1.0), copied_from=copied_from, factor=factor)
    return verdicts
