"""`crucible miner/validator --fsdp` refused in one line when there is nothing to shard over (no torchrun).

A single process with --fsdp used to run unsharded without a word: an operator who forgot torchrun
believed θ split over ranks while one process held it whole (and ran out of memory at scale).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("role", ["miner", "validator"])
def test_fsdp_without_torchrun_is_one_line_and_exit_2(role, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    done = subprocess.run([sys.executable, "-m", "neurons.cli", role, "--fsdp", "--netuid", "1", "--network",
                           "local", "--state-dir", str(tmp_path)], env=dict(env, PYTHONPATH=str(REPO)), cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "--fsdp" in lines[0] and "torchrun" in lines[0], lines
