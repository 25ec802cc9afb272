"""Where a devnet chain keeps its state on disk: one JSON file, replaced atomically.

`crucible devnet init` writes the genesis state here and `crucible devnet chain` loads it, appends
blocks and saves it again; a crash between saves loses at most the last unsaved empty blocks, never
half a file (tmp file + fsync + os.replace, then an fsync of the directory).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import ValidationError

from devnet.chain_state import STATE_VERSION, ChainState
from protocol.atomic import atomic_write

STATE_FILE = "chain_state.json"


class ChainStoreError(RuntimeError):
    """The state folder holds no usable chain state; the message says why and what to run."""


def state_path(state_dir: str | Path) -> Path:
    return Path(state_dir) / STATE_FILE


def save_state(state_dir: str | Path, state: ChainState) -> Path:
    return atomic_write(state_path(state_dir), state.model_dump_json().encode())


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
