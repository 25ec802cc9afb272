"""`crucible explain --uid U [--window W]`: every component of a uid's score, from the validator's state."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gauntlet.state import StateError, explain, load_state
from neurons.node_files import SCORES_FILE


def add_cli(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--uid", type=int, required=True, help="uid to explain")
    parser.add_argument("--window", type=int, default=None, help="window (default: the last scored)")
    parser.add_argument("--state-dir", type=Path, required=True, help="the validator's --state-dir")


def run_cli(args: argparse.Namespace) -> int:
    path = args.state_dir / SCORES_FILE
    if not path.is_file():
        print(f"crucible explain: no validator state at {path}", file=sys.stderr)
        return 1
    try:
        state = load_state(path)
    except StateError as exc:
        print(f"crucible explain: {exc}", file=sys.stderr)
        return 1
    window = args.window if args.window is not None else state.last_window
    if window is None:
        print("crucible explain: the validator has not scored a window yet", file=sys.stderr)
        return 1
    if state.entry(args.uid, window) is None:  # explain() would say so on stdout; a script needs the exit code
        print(f"crucible explain: {explain(state, args.uid, window)}", file=sys.stderr)
        return 1
    print(explain(state, args.uid, window))
    return 0
