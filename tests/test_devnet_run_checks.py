"""`crucible devnet run/init` values refused before anything starts (stakes, kills, a reused chain): `--validator-stake inf` (or
1e300) passed the config and died in bootstrap with an OverflowError traceback, `nan` as "cannot convert
float NaN to integer", stakes beyond the validators were silently ignored, and `crucible devnet init`
printed a pydantic traceback for --netuid 0 / --tempo 0 / a negative stake."""

import argparse
import json

import pytest

from devnet.bootstrap import BootstrapConfig, add_cli, run_cli
from devnet.launch_plan import DevnetConfig


@pytest.mark.parametrize("tao", [float("inf"), float("nan"), 1e300, -5.0])
def test_a_genesis_stake_that_is_not_a_finite_amount_is_refused_by_the_config(tao):
    with pytest.raises(ValueError, match="validator_stakes"):
        DevnetConfig(validators=1, validator_stakes=[tao])
    with pytest.raises(ValueError, match="validator_stakes_tao"):
        BootstrapConfig(validators=1, validator_stakes_tao=[tao])


def test_more_stakes_than_validators_is_refused_not_ignored():
    with pytest.raises(ValueError, match="3 stakes for 1 validator"):
        DevnetConfig(validators=1, validator_stakes=[5000, 6000, 7000])
    assert DevnetConfig(validators=2, validator_stakes=[5000, 6000]).validator_stakes == [5000, 6000]


@pytest.mark.parametrize("flags, names", [(["--netuid", "0"], "--netuid"), (["--tempo", "0"], "--tempo"),
                                          (["--validator-stake", "-5"], "--validator-stake"),
                                          (["--validator-stake", "inf"], "--validator-stake"),
                                          (["--miners", "-1"], "--miners")])
def test_devnet_init_refuses_a_bad_value_in_one_line(tmp_path, capsys, flags, names):
    args = add_cli(argparse.ArgumentParser()).parse_args(["--state", str(tmp_path / "s"), *flags])
    assert run_cli(args) == 2
    out = json.loads(capsys.readouterr().out.strip())
    assert out["event"] == "devnet_init_error" and out["error"].startswith(names), out
    assert not (tmp_path / "s").exists()


def test_a_kill_window_int_cannot_read_is_refused_before_the_run():
    # '²'.isdigit() is True but int('²') fails: it passed the check and crashed the launcher's kill_due mid-run
    with pytest.raises(ValueError, match="expected NAME@WINDOW"):
        DevnetConfig(kill=["miner-0@²"])
    assert DevnetConfig(kill=["miner-0@3"]).kill == ["miner-0@3"]


def test_genesis_stakes_on_a_reused_chain_are_refused_not_ignored(tmp_path):
    from devnet.launch_plan import prepare_state
    from protocol.hparams import load_hparams

    hp = load_hparams("tiny")
    cfg = DevnetConfig(miners=1, validators=1, state=tmp_path / "s")
    prepare_state(cfg, hp)  # a new chain
    again = DevnetConfig(miners=1, validators=1, state=tmp_path / "s", validator_stakes=[5000])
    with pytest.raises(ValueError, match="--validator-stake sets the stakes of a new chain"):
        prepare_state(again, hp)  # before: returned the old chain, its stakes unchanged, and said nothing
    prepare_state(again.model_copy(update={"fresh": True}), hp)


def test_killing_every_validator_is_refused_before_the_run():
    # with no validator left nothing scores or steps, and the run could only end at its window cap
    with pytest.raises(ValueError, match="every validator would be killed"):
        DevnetConfig(validators=1, kill=["validator-0@3"])
    with pytest.raises(ValueError, match="every validator would be killed"):
        DevnetConfig(validators=2, kill=["validator-0@3", "validator-1@5"])
    assert DevnetConfig(validators=2, kill=["validator-0@3"]).kill == ["validator-0@3"]
