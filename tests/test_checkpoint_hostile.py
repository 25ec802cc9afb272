"""Checkpoints are untrusted input: a validator's garbage, wrong dtype or half-published checkpoint never
crashes a node, never puts inf into θ, and never costs a bucket its last loadable checkpoint.

Real safetensors files, real torch models and the real S3 server (tests/plugins/s3.py); the hostile proxy
(tests/plugins/hostile_s3.py) makes one upload fail.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from neurons.catchup import load_latest_checkpoint
from neurons.node import Node
from neurons.publisher import upload_checkpoint
from protocol.model import CheckpointError, build_model, load_checkpoint, param_digest, save_checkpoint
from protocol.storage_keys import CHECKPOINT_CONFIG_FILE, CHECKPOINT_MODEL_FILE, checkpoint_key
from tests.plugins.hostile_s3 import Behaviour
from transport.bucket import Bucket
from transport.chain import MetagraphSnapshot


def _state(hp) -> dict[str, torch.Tensor]:
    return {k: v.clone().contiguous() for k, v in build_model(hp).state_dict().items()}


def _changed_model(hp, delta: float = 1.0) -> torch.nn.Module:
    model = build_model(hp)
    with torch.no_grad():
        model.model.embed_tokens.weight[0, 0] += delta
    return model


# --- load_checkpoint: every parse or read failure is a CheckpointError ---------------------------------


@pytest.mark.parametrize("content", [
    pytest.param(b"\xff" * 64, id="0xff-garbage"),  # header length 2^64-1: "header too large"
    pytest.param(b"", id="empty"),
    pytest.param(struct.pack("<Q", 40) + b"{not json at all, not json at all!!!!!!", id="bad-json-header"),
])
def test_garbage_model_file_is_a_checkpoint_error(tmp_path, tiny_hp, content):
    (tmp_path / CHECKPOINT_MODEL_FILE).write_bytes(content)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_checkpoint(tmp_path, tiny_hp)


def test_truncated_checkpoint_is_a_checkpoint_error(tmp_path, tiny_hp):
    folder = save_checkpoint(build_model(tiny_hp), tmp_path / "ckpt", tiny_hp)
    weights = folder / CHECKPOINT_MODEL_FILE
    weights.write_bytes(weights.read_bytes()[:-1000])  # an upload or download cut short
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_checkpoint(folder, tiny_hp)


# --- load_checkpoint: float32 only, finite after loading ------------------------------------------------


def test_float64_checkpoint_is_refused_not_cast_to_inf(tmp_path, tiny_hp):
    state = _state(tiny_hp)
    name = next(iter(state))
    state[name] = state[name].double()
    state[name].view(-1)[0] = 1e300  # finite in float64, inf in float32
    save_file(state, str(tmp_path / CHECKPOINT_MODEL_FILE))
    with pytest.raises(CheckpointError, match=rf"tensor {name} is F64, only F32"):
        load_checkpoint(tmp_path, tiny_hp)


@pytest.mark.parametrize("dtype, code", [(torch.int64, "I64"), (torch.bfloat16, "BF16"), (torch.float16, "F16")])
def test_other_dtypes_are_refused_naming_tensor_and_dtype(tmp_path, tiny_hp, dtype, code):
    state = _state(tiny_hp)
    name = sorted(state)[-1]
    state[name] = state[name].to(dtype)
    save_file(state, str(tmp_path / CHECKPOINT_MODEL_FILE))
    with pytest.raises(CheckpointError, match=rf"tensor {name} is {code}"):
        load_checkpoint(tmp_path, tiny_hp)


def test_float32_inf_is_still_refused(tmp_path, tiny_hp):
    state = _state(tiny_hp)
    name = next(iter(state))
    state[name].view(-1)[0] = float("inf")
    save_file(state, str(tmp_path / CHECKPOINT_MODEL_FILE))
    with pytest.raises(CheckpointError, match="non-finite"):
        load_checkpoint(tmp_path, tiny_hp)


# --- load_latest_checkpoint: an unusable checkpoint is skipped, the next older one loads ---------------


def _directory(s3_server, bucket_name: str) -> tuple[MetagraphSnapshot, dict]:
    """One validator (uid 0, "val") whose bucket is `bucket_name`, read with the published read key."""
    graph = MetagraphSnapshot(netuid=1, block=0, tempo=10, hotkeys=("val",), coldkeys=("c",), stake=(1000.0,),
                              incentive=(0.0,), dividends=(0.0,), consensus=(0.0,), validator_permit=(True,),
                              last_update=(0,), registered_at=(0,))
    return graph, {"val": s3_server.credentials(bucket_name).read}


def _publish(bucket: Bucket, window: int, folder: Path) -> None:
    for name in (CHECKPOINT_CONFIG_FILE, CHECKPOINT_MODEL_FILE):
        bucket.put_file(checkpoint_key(window, name), folder / name)


async def test_newest_checkpoint_garbage_falls_back_to_the_older_good_one(s3_server, s3_bucket, s3_bucket_name,
                                                                          tiny_hp, tmp_path, caplog):
    good = _changed_model(tiny_hp)
    _publish(s3_bucket, 4, save_checkpoint(good, tmp_path / "good", tiny_hp))
    s3_bucket.put(checkpoint_key(8, CHECKPOINT_MODEL_FILE), b"\xff" * 64)  # a hostile or broken validator
    s3_bucket.put(checkpoint_key(8, CHECKPOINT_CONFIG_FILE), b"{}")
    node = Node(tiny_hp, None, s3_bucket, None, build_model(tiny_hp))
    assert await load_latest_checkpoint(node, 10, _directory(s3_server, s3_bucket_name)) == 4
    assert param_digest(node.model) == param_digest(good)
    assert "checkpoint 8 of validator uid 0 unusable" in caplog.text and "header too large" in caplog.text


async def test_newest_checkpoint_that_cannot_be_downloaded_is_skipped(s3_server, s3_bucket, s3_bucket_name, tiny_hp,
                                                                     tmp_path, caplog):
    good = _changed_model(tiny_hp)
    _publish(s3_bucket, 4, save_checkpoint(good, tmp_path / "good", tiny_hp))
    newer = save_checkpoint(_changed_model(tiny_hp, 2.0), tmp_path / "newer", tiny_hp)
    s3_bucket.put_file(checkpoint_key(8), newer / CHECKPOINT_MODEL_FILE)  # its config.json is missing
    big = _state(tiny_hp)
    big["padding"] = torch.zeros(sum(v.numel() for v in big.values()) + (1 << 18))  # > float32 θ + 1 MiB
    save_file(big, str(tmp_path / "big.safetensors"))
    s3_bucket.put_file(checkpoint_key(9), tmp_path / "big.safetensors")  # over the download size cap
    s3_bucket.put(checkpoint_key(9, CHECKPOINT_CONFIG_FILE), b"{}")
    node = Node(tiny_hp, None, s3_bucket, None, build_model(tiny_hp))
    assert await load_latest_checkpoint(node, 10, _directory(s3_server, s3_bucket_name)) == 4
    assert param_digest(node.model) == param_digest(good)
    assert "checkpoint 9 of validator uid 0 could not be downloaded" in caplog.text
    assert "checkpoint 8 of validator uid 0 could not be downloaded" in caplog.text


# --- publishing and cleanup: a half-published checkpoint is never "the newest" -------------------------


def test_cleanup_keeps_the_newest_complete_checkpoint_not_a_config_only_window(s3_bucket):
    for w in (2, 10):
        s3_bucket.put(checkpoint_key(w, CHECKPOINT_CONFIG_FILE), b"{}")
        s3_bucket.put(checkpoint_key(w, CHECKPOINT_MODEL_FILE), b"complete")
    s3_bucket.put(checkpoint_key(12, CHECKPOINT_CONFIG_FILE), b"{}")  # its model upload failed
    s3_bucket.put(checkpoint_key(14, CHECKPOINT_MODEL_FILE), b"no config")  # its config is gone
    deleted = s3_bucket.cleanup(30, 6)
    left = {o.key for o in s3_bucket.list("checkpoints/")}
    assert {checkpoint_key(10, CHECKPOINT_CONFIG_FILE), checkpoint_key(10, CHECKPOINT_MODEL_FILE)} <= left
    # windows since the newest complete checkpoint stay (a replay from it needs them), partial ones included
    assert set(deleted) == {checkpoint_key(2, CHECKPOINT_CONFIG_FILE), checkpoint_key(2, CHECKPOINT_MODEL_FILE)}


def _tokenizer(path: Path) -> Path:
    """A tiny real tokenizers file with the end-of-text token, so the checkpoint carries tokenizer files."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    from protocol.data import EOT

    tok = Tokenizer(WordLevel({EOT: 0, "[UNK]": 1, "def": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    tok.save(str(path))
    return path


async def test_a_publish_that_fails_halfway_leaves_no_model_for_readers(hostile_s3, s3_bucket, tiny_hp, tmp_path):
    """model.safetensors is uploaded last: a failure on any other file leaves a window readers never take, and
    cleanup keeps the previous complete checkpoint."""
    writer = hostile_s3.bucket(write=True)
    folder = save_checkpoint(build_model(tiny_hp), tmp_path / "ckpt", tiny_hp, tokenizer=_tokenizer(tmp_path / "t.json"))
    assert await upload_checkpoint(writer, 4, folder)
    hostile_s3.behave("checkpoints/8/tokenizer*", Behaviour(redirect=(307, "http://127.0.0.1:9/")), ops={"PUT"})
    assert not await upload_checkpoint(writer, 8, folder)
    window8 = {o.key.rsplit("/", 1)[1] for o in s3_bucket.list("checkpoints/8/")}
    assert CHECKPOINT_CONFIG_FILE in window8 and CHECKPOINT_MODEL_FILE not in window8
    s3_bucket.cleanup(30, 6)
    assert s3_bucket.exists(checkpoint_key(4)) and s3_bucket.exists(checkpoint_key(4, "tokenizer.json"))
