"""Hyperparameters: presets are valid, bad values are refused with the field named."""

import json

import pytest

from protocol.hparams import PRESETS, HParamsError, load_hparams


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_validates(name):
    hp = load_hparams(name)
    assert hp.name == name
    assert hp.model.hidden_size % hp.model.num_heads == 0


def test_anchor_defaults_are_fields():
    hp = load_hparams("72b")
    assert hp.sparseloco.topk == 64 and hp.sparseloco.chunk_2d == 64 and hp.sparseloco.error_decay == 0.95
    assert hp.inner.steps == 30 and hp.inner.lr == pytest.approx(1.3e-4)
    assert hp.peers.primary == 20 and hp.peers.reserve == 10
    assert hp.gauntlet.openskill_beta == 7 and hp.gauntlet.missing_penalty == 0.75


@pytest.mark.parametrize(
    "override, field",
    [
        ("inner.lr=-1", "inner.lr"),
        ("sparseloco.topk=5000", "sparseloco"),
        ("sparseloco.chunk_2d=128", "sparseloco"),
        ("model.num_heads=3", "model"),
        ("gauntlet.copy_zero_overlap=0.1", "gauntlet"),
        ("windows.blocks_per_window=0", "windows.blocks_per_window"),
        ("inner.nonsense=1", "inner.nonsense"),
        ("gauntlet.weight_mode=cubic", "gauntlet.weight_mode"),
        ("checkpoints.retention_windows=6", "checkpoints"),  # tiny checkpoints every 5: replay needs 7
    ],
)
def test_bad_values_name_the_field(override, field):
    with pytest.raises(HParamsError) as info:
        load_hparams("tiny", [override])
    message = str(info.value)
    assert message.startswith(f"hparams: {field}")
    assert "\n" not in message


def test_retention_must_cover_a_replay_from_the_latest_checkpoint():
    assert load_hparams("tiny", ["checkpoints.retention_windows=7"]).checkpoints.retention_windows == 7
    with pytest.raises(HParamsError, match=r"retention_windows \(6\) must be at least every_windows \+ 2 \(7\)"):
        load_hparams("tiny", ["checkpoints.retention_windows=6"])


def test_overrides_apply_and_change_revision():
    base = load_hparams("tiny")
    changed = load_hparams("tiny", ["inner.steps=3", "outer.lr=0.5"])
    assert changed.inner.steps == 3 and changed.outer.lr == 0.5
    assert changed.revision() != base.revision()
    assert load_hparams("tiny").revision() == base.revision()


def test_toml_file_with_base_preset(tmp_path):
    path = tmp_path / "net.toml"
    path.write_text('preset = "tiny"\n[inner]\nsteps = 2\n')
    hp = load_hparams(str(path))
    assert hp.inner.steps == 2 and hp.model.hidden_size == load_hparams("tiny").model.hidden_size
    assert hp.name == "tiny"  # inherited from the preset


def test_json_file_and_bad_files(tmp_path):
    good = tmp_path / "h.json"
    good.write_text(json.dumps({"model": {"seq_len": 64}}))
    assert load_hparams(str(good)).model.seq_len == 64
    broken = tmp_path / "broken.toml"
    broken.write_text("[inner\n")
    with pytest.raises(HParamsError, match="cannot parse"):
        load_hparams(str(broken))
    with pytest.raises(HParamsError, match="not found"):
        load_hparams(str(tmp_path / "missing.toml"))
    unknown = tmp_path / "u.toml"
    unknown.write_text('preset = "huge"\n')
    with pytest.raises(HParamsError, match="unknown preset"):
        load_hparams(str(unknown))
