"""The command line: six subcommands loaded lazily, flags generated from the configs, one-line errors,
a working `data prepare`/`data train`, and the devnet plugged in only through `crucible devnet miner|validator`."""

import argparse
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from gauntlet.state import load_state
from neurons.cli import COMMANDS, main
from neurons.flags import FlagError
from neurons.node_config import NODE_FLAGS
from neurons.node_files import SCORES_FILE
from protocol.hparams import HParamsError, load_hparams
from tests.plugins.network import NET_OVERRIDES

REPO = Path(__file__).resolve().parents[1]

HELP_IMPORTS = """
import sys
from neurons.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
heavy = sorted(m for m in ("torch", "bittensor", "neurons.node", "devnet.adversaries") if m in sys.modules)
print("IMPORTED", ",".join(heavy))
"""


def imported_by(*argv: str) -> tuple[str, list[str]]:
    """(help text, heavy modules imported) of `crucible ARGV` in a fresh interpreter."""
    out = subprocess.run([sys.executable, "-c", HELP_IMPORTS, *argv], capture_output=True, text=True, check=True)
    text, _, heavy = out.stdout.rpartition("IMPORTED ")
    return text, [m for m in heavy.strip().split(",") if m]


def test_help_lists_the_six_subcommands_and_imports_none_of_them():
    text, heavy = imported_by("--help")
    for name in ("miner", "validator", "devnet", "data", "bench", "explain"):
        assert name in text
    assert set(COMMANDS) == {"miner", "validator", "devnet", "data", "bench", "explain"}
    assert heavy == []  # no command is imported to list them


def test_node_flags_come_from_node_config_and_the_adversary_only_from_the_devnet():
    text, heavy = imported_by("miner", "--help")
    for flag in ("--netuid", "--network", "--subtensor.network", "--wallet.name", "--wallet.hotkey", "--wallet.path",
                 "--preset", "--hparams", "--set", "--data", "--state-dir", "--device", "--windows", "--log-level",
                 "--metrics.port", "--metrics.addr", "--bucket.endpoint", "--bucket.read-key", "--bucket.write-secret"):
        assert flag in text, flag
    assert "(default: data/tiny on local" in text and "[$CRUCIBLE_BUCKET_WRITE_SECRET]" in text
    for alias in ("--subtensor.chain_endpoint", "--logging.debug", "--logging.trace"):  # bittensor's spellings
        assert alias in text, alias
    assert "--adversary" not in text
    assert "torch" not in heavy and "neurons.node" not in heavy  # building the parser builds no node
    devnet_text, _ = imported_by("devnet", "miner", "--help")
    assert "--adversary KIND" in devnet_text and "--wallet.name" in devnet_text
    assert "--adversary" not in imported_by("devnet", "validator", "--help")[0]


def test_flags_round_trip_through_the_config():
    """What the devnet launcher writes (`NODE_FLAGS.argv`) parses back to the same NodeConfig."""
    parser = NODE_FLAGS.add_to(argparse.ArgumentParser())
    args = parser.parse_args(["--netuid", "7", "--wallet.name", "v", "--subtensor.network", "test", "--set",
                              "inner.steps=2", "--set=inner.lr=0.001", "--windows", "3", "--metrics.port", "9100",
                              "--bucket.name", "b", "--log-level", "debug", "--preset", "150m", "--data", "d",
                              "--set", "data.manifest_hash=" + "0f" * 32])
    cfg = NODE_FLAGS.parse(args)
    assert (cfg.chain.netuid, cfg.chain.network, cfg.chain.wallet_name, cfg.chain.wallet_hotkey) == (7, "test", "v",
                                                                                                    "default")
    assert cfg.overrides[:2] == ["inner.steps=2", "inner.lr=0.001"] and cfg.windows == 3 and cfg.log_level == "DEBUG"
    assert cfg.metrics.port == 9100 and cfg.bucket.name == "b" and cfg.bucket.region == "auto"
    assert NODE_FLAGS.parse(parser.parse_args(NODE_FLAGS.argv(cfg))) == cfg


def test_bittensor_aliases_and_demo_defaults_only_off_the_public_networks():
    parser = NODE_FLAGS.add_to(argparse.ArgumentParser())
    cfg = NODE_FLAGS.parse(parser.parse_args(["--netuid", "1", "--subtensor.chain_endpoint", "ws://10.0.0.1:9944",
                                              "--logging.trace"]))
    assert cfg.chain.network == "ws://10.0.0.1:9944" and cfg.log_level == "TRACE" and cfg.python_log_level() == 10
    assert (cfg.preset, str(cfg.data)) == ("tiny", "data/tiny")  # a private chain: the demo defaults apply
    assert NODE_FLAGS.parse(parser.parse_args(["--netuid", "1", "--network", "local", "--logging.debug"])).log_level == "DEBUG"
    for network in ("finney", "test", "archive", "wss://entrypoint-finney.opentensor.ai:443"):  # a real subnet
        with pytest.raises(FlagError, match=f"--preset: required on network {network}"):
            NODE_FLAGS.parse(parser.parse_args(["--netuid", "1", "--network", network, "--data", "d"]))
        with pytest.raises(FlagError, match=f"--data: required on network {network}"):
            NODE_FLAGS.parse(parser.parse_args(["--netuid", "1", "--network", network, "--preset", "1b"]))
        with pytest.raises(FlagError, match="must pin the network's dataset"):  # a folder, but which dataset?
            NODE_FLAGS.parse(parser.parse_args(["--netuid", "1", "--network", network, "--preset", "1b", "--data", "d"]))
        pinned = ["--set", "data.manifest_hash=" + "ab" * 32]
        cfg = NODE_FLAGS.parse(parser.parse_args(["--netuid", "1", "--network", network, "--preset", "1b",
                                                  "--data", "d", *pinned]))
        assert str(cfg.data) == "d"  # the folder is checked against the pinned hash when the node opens
        bucket = [*pinned, "--set", "data.bucket=pages", "--set", "data.endpoint=https://data.example.org",
                  "--set", "data.read_key=read-key-0123456789", "--set", "data.read_secret=read-secret-0123456789"]
        cfg = NODE_FLAGS.parse(parser.parse_args(["--netuid", "1", "--network", network, "--preset", "1b", *bucket]))
        assert cfg.data is None  # pages come from the pinned bucket: no folder needed, none read


def test_bucket_settings_fall_back_to_the_environment_and_secrets_stay_off_argv(monkeypatch):
    parser = NODE_FLAGS.add_to(argparse.ArgumentParser())
    monkeypatch.setenv("CRUCIBLE_BUCKET_NAME", "from-env")
    monkeypatch.setenv("CRUCIBLE_BUCKET_REGION", "")  # compose's ${VAR:-} leaves an empty value: unset
    monkeypatch.setenv("CRUCIBLE_BUCKET_WRITE_SECRET", "s3cr3t-value")
    cfg = NODE_FLAGS.parse(parser.parse_args(["--netuid", "1", "--network", "local"]))
    assert cfg.bucket.name == "from-env" and cfg.bucket.region == "auto"
    assert cfg.bucket.write_secret.get_secret_value() == "s3cr3t-value" and "s3cr3t" not in repr(cfg)
    assert "s3cr3t-value" not in NODE_FLAGS.argv(cfg)  # the launcher passes secrets through the environment
    flagged = NODE_FLAGS.parse(parser.parse_args(["--netuid", "1", "--network", "local", "--bucket.name", "from-flag"]))
    assert flagged.bucket.name == "from-flag"  # a flag beats the environment


@pytest.mark.parametrize("argv, message", [
    (["miner"], "crucible miner: --netuid: Field required"),
    (["validator", "--netuid", "x"], "crucible validator: --netuid: Input should be a valid integer"),
    (["miner", "--netuid", "1", "--windows", "0"], "crucible miner: --windows: Input should be greater than"),
    (["miner", "--netuid", "1", "--network", "mainnet"], "crucible miner: --network: unknown network 'mainnet'"),
    (["devnet", "miner", "--netuid", "1", "--network", "test", "--preset", "tiny", "--data", "d",
      "--set", "data.manifest_hash=" + "ab" * 32],
     "crucible devnet miner: --network: not a devnet URL"),
    (["devnet", "miner", "--netuid", "1", "--network", "devnet://127.0.0.1:9", "--adversary", "sybil"],
     "crucible devnet miner: --adversary: unknown kind 'sybil'"),
    (["devnet", "--miners", "0", "--adversary", "bogus"], "crucible devnet run: unknown adversary kind 'bogus'"),
    (["devnet", "--miners", "x"], "crucible devnet run: --miners: Input should be a valid integer"),
])
def test_a_bad_setting_is_one_line_naming_the_flag_and_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1


def test_bad_hparams_is_one_line_and_exit_2(capsys, tmp_path):
    code = main(["data", "prepare", "--out", str(tmp_path), "--set", "inner.lr=-3"])
    assert code == 2
    assert capsys.readouterr().err.strip().startswith("crucible data: hparams: inner.lr")


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
    assert "input not found" in capsys.readouterr().err


def node_flags(chain, s3_server, wallet: str, data, monkeypatch) -> list[str]:
    """The node flags of `wallet` on a test devnet chain, its bucket's keys in CRUCIBLE_BUCKET_* (as the launcher)."""
    bucket = f"cli-{wallet}"
    s3_server.ensure_bucket(bucket)
    creds = s3_server.credentials(bucket)
    for side, pair in (("READ", creds.read), ("WRITE", creds.write)):
        monkeypatch.setenv(f"CRUCIBLE_BUCKET_{side}_KEY", pair.access_key_id)
        monkeypatch.setenv(f"CRUCIBLE_BUCKET_{side}_SECRET", pair.secret_access_key.get_secret_value())
    return ["--network", chain.url, "--netuid", str(chain.manifest.netuid), "--wallet.path",
            chain.manifest.wallet_path, "--wallet.name", wallet, "--data", str(data), "--device", "cpu",
            "--bucket.endpoint", creds.read.endpoint_url, "--bucket.region", creds.read.region, "--bucket.name", bucket]


def test_devnet_nodes_reach_the_devnet_chain_and_production_nodes_refuse_it(chain_factory, s3_server, tmp_path,
                                                                            monkeypatch, capsys):
    """The same flags: `crucible devnet miner` connects through the devnet client, reads the metagraph, finds
    the miner registered and the bucket (keys from CRUCIBLE_BUCKET_*) reachable, and stops only at the
    missing dataset; `crucible miner` refuses the devnet:// network before dialing anything."""
    chain = chain_factory()
    flags = node_flags(chain, s3_server, "miner-0", tmp_path / "no-data", monkeypatch)
    assert main(["devnet", "miner", *flags]) == 1
    err = capsys.readouterr().err
    assert err.startswith("crucible devnet miner: dataset:") and err.count("\n") == 1, err
    assert main(["devnet", "miner", *flags, "--wallet.name", "validator-9"]) == 1
    assert "crucible devnet miner: wallet 'validator-9/default' not usable" in capsys.readouterr().err
    assert main(["miner", *flags]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"crucible miner: {chain.url} is a devnet chain") and "crucible devnet miner" in err


def test_devnet_validator_runs_one_window_and_serves_its_metrics(network_factory, s3_server, tiny_dataset, tmp_path,
                                                                 monkeypatch):
    """`run_node` end to end on the real devnet chain and S3 server: open, build, metrics, one window, close."""
    net = network_factory(miners=1, validators=1)
    flags = node_flags(net.chain, s3_server, "validator-0", tiny_dataset.path, monkeypatch)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    state = tmp_path / "validator"
    argv = ["devnet", "validator", *flags, "--state-dir", str(state), "--windows", "1", "--metrics.port", str(port),
            *(f"--set={o}" for o in NET_OVERRIDES)]
    assert main(argv) == 0
    scored = load_state(state / SCORES_FILE).last_window  # the validator scored its window into --state-dir
    page = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert scored is not None and f"crucible_window {float(scored)}" in page  # observed after the window
    assert "crucible_miners_evaluated" in page  # the validator's gauges: metrics were built for its role


def test_the_subnet_hparams_template_pins_a_dataset_once_filled(tmp_path):
    """deploy/hparams/network.example.toml: refused as shipped (placeholders), a public node's config once filled."""
    template = REPO / "deploy" / "hparams" / "network.example.toml"
    parser = NODE_FLAGS.add_to(argparse.ArgumentParser())
    with pytest.raises(HParamsError, match="data.manifest_hash"):
        load_hparams(str(template))
    text = template.read_text().replace("REPLACE-ME: the 64-hex manifest hash printed by crucible data publish",
                                        "cd" * 32).replace("REPLACE-ME", "pages-0123456789abcdef")
    filled = tmp_path / "network.toml"
    filled.write_text(text)
    hp = load_hparams(str(filled))
    assert hp.model.hidden_size == 768 and hp.data.manifest_hash == "cd" * 32 and hp.data.bucket is not None
    cfg = NODE_FLAGS.parse(parser.parse_args(["--netuid", "3", "--network", "finney", "--preset", str(filled)]))
    assert cfg.data is None and cfg.hparams().data.manifest_hash == "cd" * 32
