"""A node's local checkpoint: θ, error feedback and inner AdamW state, saved atomically each window.

A miner that crashes or restarts must continue with the same error-feedback buffers and optimizer
moments, or its next updates are worse and the lost compute is wasted. One safetensors file holds
every tensor (model parameters `model.*`, error feedback `ef.*`, AdamW moments `opt.{i}.*`) and a
JSON metadata entry (window, hparams revision, optimizer hyperparameters). It is written
through `protocol.atomic.atomic_write`, so a crash leaves the old or the new state,
never a torn one. The file is local and ours, but it is still read through safetensors, not pickle.

A sharded miner (`neurons.sharding`) holds AdamW and error feedback only as row shards, so each rank
saves its own rows to `sharded-state.rank{r}.safetensors` (`save_sharded_state`, below); θ is not in
those files (a restarted sharded miner catches θ up from the network).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save

from neurons.node_files import STATE_FILE
from protocol.atomic import atomic_write
from protocol.codec import Compressor

if TYPE_CHECKING:
    from neurons.sharding import ShardedMiner, Slot

log = logging.getLogger(__name__)

_META = "crucible.local"


@dataclass
class LocalState:
    window: int  # θ stored is the model at the START of this window
    revision: str


def save_local_state(
    folder: str | Path,
    window: int,
    revision: str,
    model: torch.nn.Module,
    compressor: Compressor | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> Path:
    tensors: dict[str, torch.Tensor] = {
        f"model.{n}": p.detach().to("cpu").contiguous() for n, p in model.named_parameters()
    }
    if compressor is not None:
        tensors.update({f"ef.{n}": t.detach().to("cpu").contiguous() for n, t in compressor.state_dict().items()})
    groups = None
    if optimizer is not None:
        opt = optimizer.state_dict()
        groups = opt["param_groups"]
        for index, slots in opt["state"].items():
            for slot, value in slots.items():
                tensors[f"opt.{index}.{slot}"] = torch.as_tensor(value).detach().to("cpu").contiguous()
    meta = {"window": window, "revision": revision, "param_groups": groups}
    return atomic_write(Path(folder) / STATE_FILE, save(tensors, metadata={_META: json.dumps(meta)}))


def load_local_state(
    folder: str | Path,
    revision: str,
    model: torch.nn.Module,
    compressor: Compressor | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> LocalState | None:
    """Restore a saved state into the given objects; None if there is none or it is unusable."""
    path = Path(folder) / STATE_FILE
    if not path.is_file():
        return None
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), "pt") as fh:
            meta = json.loads(fh.metadata()[_META])
    except (SafetensorError, OSError, KeyError, json.JSONDecodeError):
        return None
    if meta.get("revision") != revision:
        return None
    params = dict(model.named_parameters())
    if any(f"model.{n}" not in tensors or tensors[f"model.{n}"].shape != p.shape for n, p in params.items()):
        return None
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(tensors[f"model.{name}"])
    if compressor is not None:
        compressor.load_state_dict({k[3:]: v for k, v in tensors.items() if k.startswith("ef.")})
    if optimizer is not None and meta.get("param_groups"):
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            if key.startswith("opt."):
                _, index, slot = key.split(".", 2)
                state.setdefault(int(index), {})[slot] = value
        optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    return LocalState(window=int(meta["window"]), revision=revision)


# --- a sharded miner's rows (FSDP2 ranks) ---------------------------------------------------------
#
# Why: a sharded miner (`neurons.sharding`) holds its AdamW moments and SparseLoCo error feedback only
# as row shards, one per rank, so the whole-model `node-state.safetensors` (above)
# cannot hold them. Without them a restarted sharded miner starts both from zero and its next
# updates are worse (the error feedback is what it has not yet sent). So every rank writes its own
# file, `sharded-state.rank{r}.safetensors`, in the miner's state folder, through
# `protocol.atomic.atomic_write` (a crash leaves the old or the new file, never a torn one):
#
# - tensors `opt.{name}.{slot}`: this rank's rows of each AdamW slot (`exp_avg`, `exp_avg_sq`; `step`
#   is a scalar), and `ef.{name}`: the rank's error-feedback buffer (its rows for an aligned tensor,
#   the whole replicated buffer otherwise: see `ShardedCompressor`);
# - a JSON header (`crucible.sharded`): world size, rank, hparams revision, the window θ is for, and the
#   plan (every parameter's whole shape, first row, row count and aligned flag).
#
# Loading checks the header against this run's plan on every rank, and the ranks agree (one
# all-gather) before any of them installs anything: all resume, or none does. A missing, torn or
# mismatched file (another world size, another plan or revision) means every rank starts AdamW and
# error feedback from zero, said in one log line by rank 0. θ is not in these files: it is caught up
# from the network's records and checkpoints like any restarted miner's.

_SHARDED_META = "crucible.sharded"


def sharded_state_path(folder: str | Path, rank: int) -> Path:
    return Path(folder) / f"sharded-state.rank{rank}.safetensors"


def plan_header(slots: Mapping[str, Slot]) -> dict[str, list]:
    """The plan as JSON: name → [whole shape, first row, rows, aligned]."""
    return {name: [list(s.shape), s.start, s.rows, s.aligned] for name, s in slots.items()}


def state_tensors(miner: ShardedMiner) -> dict[str, torch.Tensor]:
    """This rank's AdamW rows (`opt.{name}.{slot}`) and error feedback (`ef.{name}`), on the CPU."""
    tensors: dict[str, torch.Tensor] = {}
    from neurons.sharding import local

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
    blob = save(state_tensors(miner), metadata={_SHARDED_META: json.dumps(meta)})
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
            meta = json.loads(fh.metadata()[_SHARDED_META])
    except (SafetensorError, OSError, KeyError, TypeError, json.JSONDecodeError) as exc:
        return f"rank {miner.ctx.rank}: unreadable {path.name} ({type(exc).__name__})"
    window = meta.get("window") if isinstance(meta, dict) else None
    if type(window) is not int or window < 0:  # a header that is not ours (a list, a string window): unusable
        return f"rank {miner.ctx.rank}: {path.name} has no valid header"
    if meta.get("world") != miner.ctx.world or meta.get("rank") != miner.ctx.rank:
        return f"rank {miner.ctx.rank}: saved by rank {meta.get('rank')} of {meta.get('world')} ranks, " \
               f"this run has {miner.ctx.world}"
    if meta.get("revision") != revision:
        return f"rank {miner.ctx.rank}: saved for hparams revision {str(meta.get('revision'))[:12]}"
    if meta.get("plan") != plan_header(miner.slots):
        return f"rank {miner.ctx.rank}: saved for another sharding plan"
    why = _check_shapes(tensors, miner) or _check_complete(tensors, miner)
    return why if why is not None else (tensors, meta)


def _check_complete(tensors: Mapping[str, torch.Tensor], miner: ShardedMiner) -> str | None:
    """Every parameter has the same AdamW slots and an error-feedback buffer (a file short of a tensor
    would resume part of the optimizer beside zeros elsewhere)."""
    slots: dict[str, set[str]] = {name: set() for name in miner.slots}
    for key in tensors:
        if key.startswith("opt."):
            name, slot = key[4:].rsplit(".", 1)
            slots.setdefault(name, set()).add(slot)
    kinds = {frozenset(s) for s in slots.values()}
    if len(kinds) != 1 or not next(iter(kinds)) or any(f"ef.{name}" not in tensors for name in miner.slots):
        return f"rank {miner.ctx.rank}: {sharded_state_path('', miner.ctx.rank).name} is missing tensors"
    return None


def _check_shapes(tensors: Mapping[str, torch.Tensor], miner: ShardedMiner) -> str | None:
    from neurons.sharding import local

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
    from neurons.sharding import local

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
    try:
        found = read_sharded_state(folder, revision, miner)
    except Exception as exc:  # noqa: BLE001 - a rank that raised here would leave the others in the all-gather
        found = f"rank {miner.ctx.rank}: unreadable state ({type(exc).__name__})"
    # every rank's verdict and, when usable, its window and tensor names: all resume the same save or none
    mine = (found, None, None) if isinstance(found, str) else (None, found[1]["window"], sorted(found[0]))
    views: list[tuple] = [mine]
    if miner.ctx.active and dist.is_initialized():
        views = [()] * miner.ctx.world
        dist.all_gather_object(views, mine, group=miner.ctx.control)
    bad = [v[0] for v in views if v[0] is not None]
    if not bad and len({v[1] for v in views}) > 1:
        bad = [f"the ranks saved different windows ({', '.join(str(v[1]) for v in views)}): a save was cut short"]
    elif not bad and len({tuple(v[2]) for v in views}) > 1:
        bad = ["the ranks' files hold different tensors"]
    if bad:
        if miner.ctx.is_main:
            log.warning("sharded AdamW and error feedback start from zero (%s)", "; ".join(bad))
        return None
    tensors, meta = found  # type: ignore[misc]
    install_state(miner, tensors)
    return int(meta["window"])
