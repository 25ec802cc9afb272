"""A damaged local dataset folder is one line, never a traceback: `crucible data train/publish` and a node's
`--data` checked against a pinned data.manifest_hash printed tracebacks (FileNotFoundError for a missing
shard or tokenizer.json, JSONDecodeError / KeyError for a bad index.json, ValueError for a truncated
shard). Every such folder is now a DatasetError naming the file (one line at the CLI)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from protocol.data import DatasetError, PageStore, build_manifest
from protocol.hparams import load_hparams

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def folder(tmp_path):
    """A minimal valid page store for the tiny preset (two shards, a tokenizer file)."""
    model = load_hparams("tiny").model
    out = tmp_path / "data"
    out.mkdir()
    for split in ("train", "heldout"):
        np.save(out / f"{split}-00000.npy", np.zeros((2, model.seq_len), dtype=np.uint16))
    index = {"version": 1, "seq_len": model.seq_len, "vocab_size": model.vocab_size, "dtype": "uint16", "tokens": 32,
             **{s: {"pages": 2, "shards": [{"file": f"{s}-00000.npy", "pages": 2}]} for s in ("train", "heldout")}}
    (out / "index.json").write_text(json.dumps(index))
    (out / "tokenizer.json").write_text("{}")
    PageStore(out)
    build_manifest(out)
    return out


def _damage(folder: Path, how: str) -> None:
    if how == "no shard":
        (folder / "train-00000.npy").unlink()
    elif how == "truncated shard":
        raw = (folder / "train-00000.npy").read_bytes()
        (folder / "train-00000.npy").write_bytes(raw[:-10])
    elif how == "index not JSON":
        (folder / "index.json").write_text('{"version": 1,')
    elif how == "index without a split":
        index = json.loads((folder / "index.json").read_text())
        del index["train"]
        (folder / "index.json").write_text(json.dumps(index))
    elif how == "index a list":
        (folder / "index.json").write_text("[1]")
    elif how == "index not UTF-8":
        (folder / "index.json").write_bytes(b"\xff\xfe{}")


@pytest.mark.parametrize("how", ["no shard", "truncated shard", "index not JSON", "index without a split",
                                 "index a list", "index not UTF-8"])
def test_a_damaged_folder_is_a_dataset_error(folder, how):
    _damage(folder, how)
    with pytest.raises(DatasetError):
        PageStore(folder)
    with pytest.raises(DatasetError):
        build_manifest(folder)


def test_a_folder_without_its_tokenizer_cannot_be_published(folder):
    (folder / "tokenizer.json").unlink()
    PageStore(folder)  # training reads pages only
    with pytest.raises(DatasetError, match="tokenizer.json"):
        build_manifest(folder)


def test_data_train_on_a_damaged_folder_is_one_line(folder):
    _damage(folder, "no shard")
    r = subprocess.run([sys.executable, "-m", "neurons.cli", "data", "train", "--data", str(folder), "--windows", "1"],
                       capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "train-00000.npy: unreadable" in r.stderr
