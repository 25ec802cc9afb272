"""A node's local checkpoint: θ, error feedback and inner AdamW state, saved atomically each window.

A miner that crashes or restarts must continue with the same error-feedback buffers and optimizer
moments, or its next updates are worse and the lost compute is wasted. One safetensors file holds
every tensor (model parameters `model.*`, error feedback `ef.*`, AdamW moments `opt.{i}.*`) and a
JSON metadata entry (window, hparams revision, optimizer hyperparameters). It is written
through `protocol.atomic.atomic_write`, so a crash leaves the old or the new state,
never a torn one. The file is local and ours, but it is still read through safetensors, not pickle.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save

from neurons.node_files import STATE_FILE
from protocol.atomic import atomic_write
from protocol.codec import Compressor

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
