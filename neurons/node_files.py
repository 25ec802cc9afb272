"""Every file a node keeps in its state folder, named once, with the reader of its per-window record.

A miner or validator owns one folder (`--state-dir`, default `~/.crucible/HOTKEY`):

| file | written by | what |
| --- | --- | --- |
| `node-state.safetensors` | both (`local_state.py`) | θ, error feedback, AdamW state and the window θ is for |
| `scores.json` | validator (`gauntlet.state`) | ratings, moving averages and per-window entries |
| `secret.bin` | validator | the local secret that seeds its unpredictable draws (mode 0600) |
| `metrics.jsonl` | miner | one JSON object per window: `MinerReport`'s numbers |

Other programs (the devnet's scoreboard and report, `crucible explain`) import these names and
`read_metrics` instead of copying them, and never parse logs. This module imports nothing heavy.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

STATE_FILE = "node-state.safetensors"
SCORES_FILE = "scores.json"
SECRET_FILE = "secret.bin"
METRICS_FILE = "metrics.jsonl"


def local_secret(folder: Path) -> bytes:
    """The validator's local secret (`secret.bin`, 32 random bytes, mode 0600), made on first use."""
    path = folder / SECRET_FILE
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(32))
        path.chmod(0o600)
    return path.read_bytes()


def append_metrics(folder: Path, record: Mapping[str, Any]) -> None:
    """Append one window's numbers (JSON-able values) as a line of `metrics.jsonl`."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / METRICS_FILE, "a") as fh:
        fh.write(json.dumps(dict(record)) + "\n")


def read_metrics(folder: Path) -> list[dict[str, Any]]:
    """Every well-formed line of `metrics.jsonl` with an int `window` and finite numbers ([] if none).

    A torn last line (a crash mid-write) or a line with NaN/inf values is skipped, not fatal.
    """
    path = folder / METRICS_FILE
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            raw = json.loads(line)
        except ValueError:
            continue
        if not isinstance(raw, dict) or not isinstance(raw.get("window"), int):
            continue
        if any(isinstance(v, float) and not math.isfinite(v) for v in raw.values()):
            continue
        out.append(raw)
    return out
