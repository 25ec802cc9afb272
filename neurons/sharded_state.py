"""Each FSDP2 rank's own rows of AdamW and error feedback, saved with the miner's local state.

Why: a sharded miner (`neurons.sharding`) holds its AdamW moments and SparseLoCo error feedback only
as row shards, one per rank, so the whole-model `node-state.safetensors` (`neurons.local_state`)
cannot hold them. Without them a restarted sharded miner starts both from zero and its next
updates are worse (the error feedback is what it has not yet sent). So every rank writes its own
file, `sharded-state.rank{r}.safetensors`, in the miner's state folder, through
`protocol.atomic.atomic_write` (a crash leaves the old or the new file, never a torn one):

- tensors `opt.{name}.{slot}`: this rank's rows of each AdamW slot (`exp_avg`, `exp_avg_sq`; `step`
  is a scalar), and `ef.{name}`: the rank's error-feedback buffer (its rows for an aligned tensor,
  the whole replicated buffer otherwise: see `ShardedCompressor`);
- a JSON header (`crucible.sharded`): world size, rank, hparams revision, the window θ is for, and the
  plan (every parameter's whole shape, first row, row count and aligned flag).

Loading checks the header against this run's plan on every rank, and the ranks agree (one
all-gather) before any of them installs anything: all resume, or none does. A missing, torn or
mismatched file (another world size, another plan or revision) means every rank starts AdamW and
error feedback from zero, said in one log line by rank 0. θ is not in these files: it is caught up
from the network's records and checkpoints like any restarted miner's.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save

from neurons.sharding import Slot, local
from protocol.atomic import atomic_write

if TYPE_CHECKING:
    from neurons.sharding import ShardedMiner

log = logging.getLogger(__name__)

_META = "crucible.sharded"


def sharded_state_path(folder: str | Path, rank: int) -> Path:
    return Path(folder) / f"sharded-state.rank{rank}.safetensors"


def plan_header(slots: Mapping[str, Slot]) -> dict[str, list]:
    """The plan as JSON: name → [whole shape, first row, rows, aligned]."""
    return {name: [list(s.shape), s.start, s.rows, s.aligned] for name, s in slots.items()}


def state_tensors(miner: ShardedMiner) -> dict[str, torch.Tensor]:
    """This rank's AdamW rows (`opt.{name}.{slot}`) and error feedback (`ef.{name}`), on the CPU."""
    tensors: dict[str, torch.Tensor] = {}
    for name, p in miner.model.named_parameters():
        for slot, value in miner.optimizer.state.get(p, {}).items():
            tensors[f"opt.{name}.{slot}"] = local(torch.as_tensor(value)).detach().to("cpu").contiguous()
    for name, error in miner.compressor.inner.state_dict().items():
        tensors[f"ef.{name}"] = error.detach().to("cpu").contiguous()
    return tensors


def save_sharded_state(folder: str | Path, window: int, revision: str, miner: ShardedMiner) -> Path:
    """Write this rank's file (no collective: every rank writes its own)."""
    meta = {"world": miner.ctx.world, "rank": miner.ctx.rank, "revision": revision, "window": window,
            "plan": plan_header(miner.slots)}
    blob = save(state_tensors(miner), metadata={_META: json.dumps(meta)})
    return atomic_write(sharded_state_path(folder, miner.ctx.rank), blob)


def read_sharded_state(folder: str | Path, revision: str, miner: ShardedMiner
                       ) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | str:
    """This rank's saved tensors and header, or why they cannot be used here (a short reason)."""
    path = sharded_state_path(folder, miner.ctx.rank)
    if not path.is_file():
        return f"rank {miner.ctx.rank}: no {path.name}"
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), "pt") as fh:
            meta = json.loads(fh.metadata()[_META])
    except (SafetensorError, OSError, KeyError, TypeError, json.JSONDecodeError) as exc:
        return f"rank {miner.ctx.rank}: unreadable {path.name} ({type(exc).__name__})"
    if meta.get("world") != miner.ctx.world or meta.get("rank") != miner.ctx.rank:
        return f"rank {miner.ctx.rank}: saved by rank {meta.get('rank')} of {meta.get('world')} ranks, " \
               f"this run has {miner.ctx.world}"
    if meta.get("revision") != revision:
        return f"rank {miner.ctx.rank}: saved for hparams revision {str(meta.get('revision'))[:12]}"
    if meta.get("plan") != plan_header(miner.slots):
        return f"rank {miner.ctx.rank}: saved for another sharding plan"
    why = _check_shapes(tensors, miner)
    return why if why is not None else (tensors, meta)


def _check_shapes(tensors: Mapping[str, torch.Tensor], miner: ShardedMiner) -> str | None:
    params = dict(miner.model.named_parameters())
    for key, value in tensors.items():
        kind, rest = key.split(".", 1)
        if kind == "opt":
            name, slot = rest.rsplit(".", 1)
            want = () if value.dim() == 0 else tuple(local(params[name]).shape) if name in params else None
        elif kind == "ef" and rest in miner.slots:
            s = miner.slots[rest]
            want = (s.rows, *s.shape[1:]) if s.aligned else s.shape
        else:
            want = None
        if want is None or tuple(value.shape) != tuple(want):
            return f"rank {miner.ctx.rank}: {key} does not fit this plan"
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return f"rank {miner.ctx.rank}: {key} is not finite"
    return None


def install_state(miner: ShardedMiner, tensors: Mapping[str, torch.Tensor]) -> None:
    """Put saved rows into the optimizer (as DTensors sharded like their parameters) and the compressor."""
    params = dict(miner.model.named_parameters())
    state: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            name, slot = key[4:].rsplit(".", 1)
            state.setdefault(name, {})[slot] = value
    with torch.no_grad():
        for name, slots in state.items():
            p, entry = params[name], {}
            for slot, value in slots.items():
                if value.dim() == 0:  # AdamW's step: a scalar tensor where torch keeps it (CPU unless capturable)
                    entry[slot] = value.clone()
                else:
                    entry[slot] = torch.zeros_like(p)  # a DTensor with p's placement; fill this rank's rows
                    local(entry[slot]).copy_(value)
            miner.optimizer.state[p] = entry
    miner.compressor.inner.load_state_dict(
        {key[3:]: value.to(miner.device) for key, value in tensors.items() if key.startswith("ef.")})


def load_sharded_state(folder: str | Path, revision: str, miner: ShardedMiner) -> int | None:
    """Resume this rank's rows if every rank can (a collective); returns the saved window, or None (zeros)."""
    found = read_sharded_state(folder, revision, miner)
    reason = found if isinstance(found, str) else None
    reasons: list[str | None] = [reason]
    if miner.ctx.active and dist.is_initialized():
        reasons = [None] * miner.ctx.world
        dist.all_gather_object(reasons, reason, group=miner.ctx.control)
    bad = [r for r in reasons if r is not None]
    if bad:
        if miner.ctx.is_main:
            log.warning("sharded AdamW and error feedback start from zero (%s)", "; ".join(bad))
        return None
    tensors, meta = found  # type: ignore[misc]
    install_state(miner, tensors)
    return int(meta["window"])
