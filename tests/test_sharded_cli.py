"""`crucible miner/validator --fsdp` refused in one line when there is nothing to shard over (no torchrun).

A single process with --fsdp used to run unsharded without a word: an operator who forgot torchrun
believed θ split over ranks while one process held it whole (and ran out of memory at scale).
"""

import os

import pytest


@pytest.mark.parametrize("role", ["miner", "validator"])
def test_fsdp_without_torchrun_is_one_line_and_exit_2(role, tmp_path, capsys, monkeypatch):
    from neurons.cli import main

    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert main([role, "--fsdp", "--netuid", "1", "--network", "local", "--state-dir", str(tmp_path)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "--fsdp" in lines[0] and "torchrun" in lines[0], lines


def test_a_failed_start_under_torchrun_releases_the_followers(tmp_path):
    """Rank 0 cannot start (no bucket): its one line, exit 1, and the followers told to stop, not left to
    die in the control group's broadcast with a gloo traceback ("Connection closed by peer") per rank.
    (The validator's CLI already released them; the miner's did not.)"""
    from tests.conftest import torchrun

    env = {k: v for k, v in os.environ.items() if not k.startswith("CRUCIBLE_BUCKET")}
    done = torchrun(["-m", "neurons.cli", "miner", "--fsdp", "--netuid", "1", "--network", "local", "--state-dir",
                     str(tmp_path)], tmp_path / "torchrun", env=env, timeout=120)
    assert done.returncode != 0, done.report()
    assert "bucket not configured" in done.stderr[0], done.report()
    assert "[rank1]" not in done.output and "Connection closed" not in done.output, done.report()
