"""The network's model: a `transformers` LlamaForCausalLM built from hparams.

Every node must start from the bit-identical θ_0, so the model is always initialised on the CPU in
float32 under a private RNG seeded from `hparams.init_seed` (the global RNG is left untouched), and
only then moved to the training device. Checkpoints are plain `save_pretrained` folders
(`config.json` + `model.safetensors`), loadable by `LlamaForCausalLM.from_pretrained` and
lm-eval-harness; loading goes through safetensors only, never pickle, and a checkpoint is untrusted
input (any validator publishes one): every way its file can be wrong, garbage, truncated, another
dtype than float32 or a non-finite value, is a `CheckpointError`, never a crash. Given the dataset's tokenizer,
a checkpoint also carries it (`tokenizer.json`, `tokenizer_config.json`)
and names its end-of-text token as bos/eos/pad id in `config.json` and `generation_config.json`, so
`AutoTokenizer` + `AutoModelForCausalLM.from_pretrained(folder)` need nothing else and `generate()`
stops at the end of a document.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError, safe_open

from protocol.data import EOT
from protocol.hparams import HParams

if TYPE_CHECKING:  # imported where a model or config is built: importing transformers takes seconds, and a
    # command that fails on its flags, its bucket or its chain before building a model should not wait for it
    from transformers import LlamaConfig, LlamaForCausalLM


class CheckpointError(ValueError):
    """A checkpoint folder that does not match the network's model."""


def llama_config(hp: HParams) -> LlamaConfig:
    from transformers import LlamaConfig

    m = hp.model
    return LlamaConfig(
        vocab_size=m.vocab_size,
        hidden_size=m.hidden_size,
        intermediate_size=m.intermediate_size,
        num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_heads,
        num_key_value_heads=m.num_kv_heads,
        max_position_embeddings=m.seq_len,
        rope_theta=m.rope_theta,
        tie_word_embeddings=m.tie_embeddings,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
        use_cache=False,
    )


def build_model(hp: HParams, device: str | torch.device = "cpu") -> LlamaForCausalLM:
    """θ_0: the network's deterministic initialisation, identical on every node."""
    from transformers import LlamaForCausalLM

    config = llama_config(hp)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(hp.init_seed)
        with torch.device("cpu"):
            model = LlamaForCausalLM(config)
    model = model.to(dtype=torch.float32)
    return model.to(device)


def param_shapes(hp: HParams) -> dict[str, torch.Size]:
    """Parameter names and shapes of the network's model, without allocating it."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(llama_config(hp))
    return {name: p.shape for name, p in model.named_parameters()}


def param_digest(model: torch.nn.Module) -> str:
    """blake2b over every parameter's bytes in name order: equal digests ⇔ identical models."""
    h = hashlib.blake2b(digest_size=16)
    for name, p in sorted(model.named_parameters()):
        h.update(name.encode())
        h.update(p.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def save_checkpoint(model: LlamaForCausalLM, out_dir: str | Path, hp: HParams,
                    tokenizer: str | Path | None = None) -> Path:
    """Write config.json + model.safetensors (+ crucible.json naming the hparams revision) and, with the
    dataset's `tokenizer` (its tokenizer.json), the tokenizer files and the end-of-text token ids.

    Every file the folder holds is part of the checkpoint (`checkpoint_files` lists them)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    if tokenizer is not None:
        _save_tokenizer(Path(tokenizer), out, hp)
    (out / "crucible.json").write_text(json.dumps({"revision": hp.revision(), "preset": hp.name}))
    return out


def checkpoint_files(folder: str | Path) -> list[str]:
    """The names of a saved checkpoint's files, in a stable order (what a validator uploads)."""
    return sorted(p.name for p in Path(folder).iterdir() if p.is_file())


def _save_tokenizer(source: Path, out: Path, hp: HParams) -> None:
    """The dataset's tokenizer as transformers files; its end-of-text token as bos, eos and pad in the configs."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    try:
        raw = Tokenizer.from_file(str(source))
    except Exception as exc:  # tokenizers raises a bare Exception for a missing or malformed file
        raise CheckpointError(f"tokenizer {source}: cannot load ({exc})") from None
    eot_id = raw.token_to_id(EOT)
    if eot_id is None or raw.get_vocab_size() > hp.model.vocab_size:
        raise CheckpointError(f"tokenizer {source}: no {EOT} token or more than {hp.model.vocab_size} tokens")
    fast = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token=EOT, eos_token=EOT, pad_token=EOT,
                                   model_max_length=hp.model.seq_len)
    fast.save_pretrained(out)
    ids = {"bos_token_id": eot_id, "eos_token_id": eot_id, "pad_token_id": eot_id}
    for name in ("config.json", "generation_config.json"):
        path = out / name
        config = json.loads(path.read_text()) if path.is_file() else {}
        path.write_text(json.dumps({**config, **ids}, indent=2, sort_keys=True) + "\n")


def load_checkpoint(path: str | Path, hp: HParams, device: str | torch.device = "cpu") -> LlamaForCausalLM:
    """Load a checkpoint folder into a fresh network model, checking every name, dtype, shape and value.

    Raises CheckpointError for a missing or unparsable model.safetensors (garbage, truncated,
    unreadable), a tensor that is not float32, missing, extra or of the wrong shape, or a non-finite value.
    """
    folder = Path(path)
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise CheckpointError(f"checkpoint {folder}: missing model.safetensors")
    state = _read_float32_tensors(weights, folder)
    expected = param_shapes(hp)
    model = build_model(hp)
    own = model.state_dict()
    for name, shape in expected.items():
        if name not in state:
            if hp.model.tie_embeddings and name == "lm_head.weight":
                continue
            raise CheckpointError(f"checkpoint {folder}: missing tensor {name}")
        if state[name].shape != shape:
            raise CheckpointError(f"checkpoint {folder}: {name} has shape {tuple(state[name].shape)}, want {tuple(shape)}")
        if not torch.isfinite(state[name]).all():  # on the float32 values θ takes: nothing is cast after this
            raise CheckpointError(f"checkpoint {folder}: {name} has non-finite values")
    extra = set(state) - set(own)
    if extra:
        raise CheckpointError(f"checkpoint {folder}: unexpected tensors {sorted(extra)[:3]}")
    model.load_state_dict(state, strict=False)
    return model.to(device)


def _read_float32_tensors(weights: Path, folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an untrusted model.safetensors; each must be float32 (F32), as `save_checkpoint` writes θ.

    The dtypes are read from the header before any tensor is: another dtype would be cast on loading
    (a float64 1e300 becomes inf in float32, an int64 loads at all). Raises CheckpointError naming the
    tensor and its dtype, or for a file safetensors cannot parse or read.
    """
    try:
        with safe_open(str(weights), framework="pt", device="cpu") as f:
            names = list(f.keys())
            for name in names:
                dtype = f.get_slice(name).get_dtype()
                if dtype != "F32":
                    raise CheckpointError(f"checkpoint {folder}: tensor {name} is {dtype}, only F32 (float32) "
                                          "is accepted")
            return {name: f.get_tensor(name) for name in names}
    except (SafetensorError, OSError) as exc:  # garbage, a truncated file, a bad header, an unreadable file
        raise CheckpointError(f"checkpoint {folder}: model.safetensors is not a readable safetensors file "
                              f"({exc})") from None


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
