"""Hostile sharded-state folders (`neurons.local_state.load_sharded_state`) on 2 real gloo ranks.

A crash between the ranks' saves leaves rank 0's file for one window beside rank 1's for the previous
one; a hand or a bad disk leaves a header that is not what the loader expects, or a file short of a
tensor. Every rank must then start AdamW and error feedback from zero (never one rank's window with
another's, never a partial optimizer), rank 1 must not crash, and rank 0 says why in one line.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.test_distributed import _free_port

REPO = Path(__file__).resolve().parents[1]


def test_mixed_or_hostile_rank_files_start_every_rank_from_zero(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(REPO / "tests" / "sharded_state_worker.py"), str(tmp_path)]
    done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads((tmp_path / "rank0.json").read_text())
    assert seen["empty"] == {"resumed_six": True, "mixed_windows": True, "header_not_object": True,
                             "window_not_int": True, "missing_tensor": True, "truncated": True}, seen
    assert len(seen["warnings"]) == 5, seen["warnings"]
