"""Where a devnet chain keeps its state on disk: one JSON file, replaced atomically.

`crucible devnet init` writes the genesis state here and `crucible devnet chain` loads it, appends
blocks and saves it again; a crash between saves loses at most the last unsaved empty blocks, never
half a file (tmp file + fsync + os.replace, then an fsync of the directory).
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import ValidationError

from devnet.chain_state import STATE_VERSION, ChainState

STATE_FILE = "chain_state.json"


class ChainStoreError(RuntimeError):
    """The state folder holds no usable chain state; the message says why and what to run."""


def state_path(state_dir: str | Path) -> Path:
    return Path(state_dir) / STATE_FILE


def save_state(state_dir: str | Path, state: ChainState) -> Path:
    path = state_path(state_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    data = state.model_dump_json().encode()
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def load_state(state_dir: str | Path) -> ChainState:
    path = state_path(state_dir)
    if not path.is_file():
        raise ChainStoreError(f"no chain state at {path}; create one with `crucible devnet init --state {state_dir}`")
    try:
        state = ChainState.model_validate_json(path.read_bytes())
    except ValidationError as exc:
        raise ChainStoreError(f"{path}: not a valid devnet chain state: {exc.errors()[0]['msg']}") from None
    if state.version != STATE_VERSION:
        raise ChainStoreError(f"{path}: state version {state.version}, this code reads {STATE_VERSION}")
    return state
