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


def test_checkpoint_folder_alone_gives_model_and_tokenizer_and_generation_stops_at_eos(tmp_path, tiny_hp,
                                                                                      tiny_dataset):
    """With the dataset's tokenizer, a checkpoint is self-contained: AutoTokenizer and AutoModelForCausalLM load
    from the folder alone, and generate() ends at the end-of-text token the folder names."""
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from protocol.data import EOT, PageStore
    from protocol.model import checkpoint_files

    store = PageStore(tiny_dataset.path, tiny_hp)
    source = Tokenizer.from_file(str(store.tokenizer_path))
    prompt, eot = "def main():", source.token_to_id(EOT)
    ids = source.encode(prompt).ids
    model = build_model(tiny_hp)
    # teach the model that the prompt is a whole document (prompt, EOT, prompt, EOT, ...)
    seq = torch.tensor((ids + [eot]) * (tiny_hp.model.seq_len // (len(ids) + 1))).view(1, -1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(40):
        model(input_ids=seq, labels=seq).loss.backward()
        opt.step()
        opt.zero_grad()
    folder = save_checkpoint(model, tmp_path / "ckpt", tiny_hp, tokenizer=store.tokenizer_path)
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json",
            "config.json", "model.safetensors", "crucible.json"} <= set(checkpoint_files(folder))

    tokenizer = AutoTokenizer.from_pretrained(folder)
    hf = AutoModelForCausalLM.from_pretrained(folder)
    assert tokenizer.eos_token == tokenizer.bos_token == EOT and tokenizer.eos_token_id == eot
    assert hf.config.eos_token_id == hf.config.bos_token_id == hf.generation_config.eos_token_id == eot
    inputs = tokenizer(prompt, return_tensors="pt")
    assert inputs["input_ids"][0].tolist() == ids  # the same tokens as the pages were made of
    out = hf.generate(**inputs, max_new_tokens=24, do_sample=False)[0].tolist()
    new = out[len(ids):]
    assert new and new[-1] == eot and len(new) < 24, new  # stopped at eos, not at the length cap
    assert tokenizer.decode(out, skip_special_tokens=True) == prompt + tokenizer.decode(new, skip_special_tokens=True)
    with pytest.raises(CheckpointError, match="tokenizer"):
        save_checkpoint(model, tmp_path / "bad", tiny_hp, tokenizer=tmp_path / "no-tokenizer.json")
