"""The two ways operators run nodes outside Docker: a systemd template unit and a PM2 ecosystem file
(deploy/). Both must turn deploy/crucible.env.example, once filled in, into a command line the CLI accepts,
keep bucket keys off that command line, and not restart on a bad setting (exit code 2)."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from neurons.cli import USAGE_ERROR, build_parser
from neurons.node_config import NODE_FLAGS

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
# PRESET: the subnet's hparams file (a preset plus the pinned dataset; deploy/hparams/network.example.toml)
FILLED = {"NETUID": "7", "PRESET": str(ROOT / "tests" / "assets" / "hparams" / "network-150m.toml"), "DATA": "/srv/crucible/data/150m",
          "CRUCIBLE_BUCKET_ENDPOINT": "https://account.r2.cloudflarestorage.com",
          "CRUCIBLE_BUCKET_NAME": "my-crucible-bucket", "CRUCIBLE_BUCKET_READ_KEY": "R" * 20,
          "CRUCIBLE_BUCKET_READ_SECRET": "r" * 40, "CRUCIBLE_BUCKET_WRITE_KEY": "W" * 20,
          "CRUCIBLE_BUCKET_WRITE_SECRET": "w" * 40}


def example() -> dict[str, str]:
    out = {}
    for line in (DEPLOY / "crucible.env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def filled_env(tmp_path: Path) -> Path:
    path = tmp_path / "node.env"
    path.write_text("".join(f"{k}={v}\n" for k, v in {**example(), **FILLED}.items()))
    return path


def node_config(argv: list[str]):
    """The NodeConfig `crucible ARGV` would run with (after the CLI parsed and validated every flag)."""
    args = build_parser().parse_args(argv)
    assert args.command in ("miner", "validator")
    return NODE_FLAGS.parse(args)


def test_example_leaves_empty_only_what_an_operator_must_choose():
    empty = {k for k, v in example().items() if v == ""}
    assert empty == set(FILLED)  # no demo preset or data folder is assumed on a real subnet
    assert {k for k in example() if k.startswith("CRUCIBLE_BUCKET_")} == set(NODE_FLAGS.env.values())


def systemd_argv(role: str, env: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """ExecStart of crucible@ROLE with the EnvironmentFile's values, as systemd expands it."""
    unit = (DEPLOY / "systemd" / "crucible@.service").read_text()
    settings = {}
    for line in unit.replace("\\\n", " ").splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), value.strip())
    command = settings["ExecStart"].replace("%i", role)
    words = [re.sub(r"\$\{(\w+)\}", lambda m: env[m.group(1)], w) for w in shlex.split(command)]
    return words, settings


@pytest.mark.parametrize("role", ["miner", "validator"])
def test_systemd_unit_runs_a_command_the_cli_accepts(role):
    env = {**example(), **FILLED}
    argv, settings = systemd_argv(role, env)
    assert argv[0] == "/opt/crucible/.venv/bin/crucible" and argv[1] == role
    cfg = node_config(argv[1:])
    assert (cfg.chain.netuid, cfg.preset, str(cfg.data)) == (7, FILLED["PRESET"], "/srv/crucible/data/150m")
    assert cfg.hparams().data.manifest_hash == "ab" * 32  # the pinned dataset came with it
    assert cfg.state_dir == Path(os.path.expanduser(f"~/.crucible/state/{role}"))  # one state folder per role
    assert not any("SECRET" in w or FILLED["CRUCIBLE_BUCKET_WRITE_SECRET"] in w for w in argv)  # keys: env only
    assert settings["EnvironmentFile"] == "/etc/crucible/%i.env"
    assert settings["RestartPreventExitStatus"] == str(USAGE_ERROR) and settings["Restart"] == "on-failure"
    assert settings["KillSignal"] == "SIGINT"


@pytest.mark.skipif(shutil.which("node") is None, reason="node (PM2's runtime) is not installed")
def test_pm2_ecosystem_runs_commands_the_cli_accepts_with_keys_in_the_environment(tmp_path):
    env_file = filled_env(tmp_path)
    script = f"console.log(JSON.stringify(require({str(DEPLOY / 'pm2' / 'ecosystem.config.js')!r}).apps))"
    run = subprocess.run(["node", "-e", script], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "CRUCIBLE_MINER_ENV": str(env_file),
                              "CRUCIBLE_VALIDATOR_ENV": str(tmp_path / "absent.env")})
    assert run.returncode == 0, run.stderr
    apps = json.loads(run.stdout)
    assert [a["name"] for a in apps] == ["crucible-miner"]  # a role without its env file is left out
    app = apps[0]
    assert app["script"] == str(ROOT / ".venv" / "bin" / "crucible") and app["interpreter"] == "none"
    cfg = node_config(app["args"])
    assert (cfg.chain.network, cfg.chain.netuid, cfg.preset, cfg.metrics.port) == ("finney", 7, FILLED["PRESET"], 9100)
    assert cfg.chain.wallet_path == os.path.expanduser("~/.bittensor/wallets")
    assert set(app["env"]) == set(NODE_FLAGS.env.values()) | {"PYTHONUNBUFFERED"}
    assert not any(FILLED["CRUCIBLE_BUCKET_READ_SECRET"] in a for a in app["args"])
    assert app["stop_exit_codes"] == [USAGE_ERROR] and app["kill_signal"] == "SIGINT"

    incomplete = tmp_path / "incomplete.env"
    incomplete.write_text("NETWORK=finney\nNETUID=7\n")
    run = subprocess.run(["node", "-e", script], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "CRUCIBLE_MINER_ENV": str(incomplete)})
    assert run.returncode != 0 and "set PRESET, DATA" in run.stderr
