"""The model: bit-identical θ_0 everywhere, and checkpoints that transformers loads."""

import pytest
import torch
from transformers import LlamaForCausalLM

from protocol.hparams import load_hparams
from protocol.model import (
    CheckpointError,
    build_model,
    load_checkpoint,
    param_digest,
    param_shapes,
    save_checkpoint,
)


def test_two_builds_are_bit_identical_and_leave_global_rng_alone(tiny_hp):
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a = build_model(tiny_hp)
    after = torch.rand(1)
    b = build_model(tiny_hp)
    assert torch.equal(after, expected_next)
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert na == nb and torch.equal(pa, pb)
    assert param_digest(a) == param_digest(b)


def test_init_seed_changes_theta0(tiny_hp):
    other = load_hparams("tiny", ["init_seed=1"])
    assert param_digest(build_model(tiny_hp)) != param_digest(build_model(other))


def test_param_shapes_match_the_model(tiny_hp):
    model = build_model(tiny_hp)
    assert param_shapes(tiny_hp) == {n: p.shape for n, p in model.named_parameters()}


def test_checkpoint_round_trip_through_transformers(tmp_path, tiny_hp):
    model = build_model(tiny_hp)
    with torch.no_grad():
        model.model.embed_tokens.weight[0, 0] += 1.0
    save_checkpoint(model, tmp_path / "ckpt", tiny_hp)
    assert (tmp_path / "ckpt" / "config.json").is_file()
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "ckpt")
    ours = load_checkpoint(tmp_path / "ckpt", tiny_hp)
    assert param_digest(hf) == param_digest(model) == param_digest(ours)
    ids = torch.arange(16).view(1, 16)
    assert torch.allclose(hf(input_ids=ids).logits, model(input_ids=ids).logits)


def test_checkpoint_of_another_shape_is_refused(tmp_path, tiny_hp):
    other = load_hparams("tiny", ["model.hidden_size=128"])
    save_checkpoint(build_model(other), tmp_path / "other", other)
    with pytest.raises(CheckpointError, match="shape"):
        load_checkpoint(tmp_path / "other", tiny_hp)
    with pytest.raises(CheckpointError, match="missing model.safetensors"):
        load_checkpoint(tmp_path / "nothing", tiny_hp)
