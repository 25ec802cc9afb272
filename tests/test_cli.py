"""The command line: six subcommands, clear exit codes, a working `data prepare`/`data train`."""

import subprocess
import sys

from neurons.cli import COMMANDS, main


def test_help_lists_the_six_subcommands():
    out = subprocess.run([sys.executable, "-m", "neurons.cli", "--help"], capture_output=True, text=True, check=True)
    for name in ("miner", "validator", "devnet", "data", "bench", "explain"):
        assert name in out.stdout
    assert set(COMMANDS) == {"miner", "validator", "devnet", "data", "bench", "explain"}


def test_bad_hparams_is_one_line_and_exit_2(capsys, tmp_path):
    code = main(["data", "prepare", "--out", str(tmp_path), "--set", "inner.lr=-3"])
    assert code == 2
    assert capsys.readouterr().err.strip().startswith("error: hparams: inner.lr")


def test_prepare_then_train(tmp_path, capsys):
    out = tmp_path / "d"
    assert main(["data", "prepare", "--out", str(out), "--max-chars", "400000"]) == 0
    text = capsys.readouterr().out
    assert "tokens" in text and (out / "index.json").is_file()
    assert main(["data", "train", "--data", str(out), "--windows", "2"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "held-out loss" in ln]
    losses = [float(ln.split("held-out loss")[1].split()[0]) for ln in lines]
    assert len(losses) == 3 and losses[-1] < losses[0]


def test_prepare_reports_missing_input(tmp_path, capsys):
    assert main(["data", "prepare", "--out", str(tmp_path), "--input", str(tmp_path / "none.txt")]) == 1
    assert "input not found" in capsys.readouterr().out


def test_devnet_without_a_part_means_run(capsys):
    """The issue's spelling `crucible devnet --miners …` reaches `devnet run` and its config checks."""
    code = main(["devnet", "--miners", "0", "--adversary", "bogus"])
    assert code == 2
    assert "unknown adversary kind 'bogus'" in capsys.readouterr().err
