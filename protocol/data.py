"""Tokenized page store and deterministic sample assignment.

`PageStore` reads a prepared page store (`.npy` shards of fixed-length token pages plus
`index.json`; `neurons.dataset.prepare_dataset` writes them) and checks it matches the hparams.

Assignment is the protocol's contract on data: `assign(hotkey, window, seed, n, num_samples)` gives
every miner its samples for a window, reproducible by any validator, and (near-)disjoint across
hotkeys. `random_samples(window_seed, ...)` is the validators' control draw, unpredictable to a
miner before the window's seed exists. Both index a keyed pseudo-random permutation of the pages
(a Feistel network with cycle walking), so no O(num_samples) permutation is ever materialised.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from protocol.hparams import HParams

INDEX_VERSION = 1
EOT = "<|endoftext|>"  # ends every document in the pages; checkpoints name it bos, eos and pad (protocol.model)
TOKENIZER_FILE = "tokenizer.json"  # the dataset's tokenizer, next to index.json
PAGES_PER_SHARD = 4096  # pages per .npy file of a page store
_MASK64 = (1 << 64) - 1


class DatasetError(ValueError):
    """A dataset folder that is missing, incomplete or does not match the hparams."""


class PageStore:
    """Read-only view of a prepared dataset; pages come back as int64 tensors [n, seq_len]."""

    def __init__(self, path: str | Path, hp: HParams | None = None):
        self.path = Path(path)
        self.tokenizer_path = self.path / TOKENIZER_FILE
        index_file = self.path / "index.json"
        if not index_file.is_file():
            raise DatasetError(f"{self.path}: no index.json (run `crucible data prepare`)")
        index = json.loads(index_file.read_text())
        if index.get("version") != INDEX_VERSION:
            raise DatasetError(f"{index_file}: version {index.get('version')}, expected {INDEX_VERSION}")
        self.seq_len: int = index["seq_len"]
        self.vocab_size: int = index["vocab_size"]
        self.tokens: int = index["tokens"]
        if hp is not None and (hp.model.seq_len, hp.model.vocab_size) != (self.seq_len, self.vocab_size):
            raise DatasetError(
                f"{self.path}: built for seq_len={self.seq_len} vocab={self.vocab_size}, "
                f"hparams want seq_len={hp.model.seq_len} vocab={hp.model.vocab_size}"
            )
        self._splits: dict[str, list[np.ndarray]] = {}
        for split in ("train", "heldout"):
            arrays = []
            for shard in index[split]["shards"]:
                arr = np.load(self.path / shard["file"], mmap_mode="r", allow_pickle=False)
                if arr.ndim != 2 or arr.shape != (shard["pages"], self.seq_len):
                    raise DatasetError(f"{shard['file']}: shape {arr.shape} does not match index.json")
                arrays.append(arr)
            self._splits[split] = arrays

    def num_pages(self, split: str = "train") -> int:
        return sum(len(a) for a in self._splits[split])

    @property
    def num_train(self) -> int:
        return self.num_pages("train")

    @property
    def num_heldout(self) -> int:
        return self.num_pages("heldout")

    def pages(self, indices: Iterable[int], split: str = "train") -> torch.Tensor:
        idx = np.asarray(list(indices), dtype=np.int64)
        total = self.num_pages(split)
        if idx.size and (idx.min() < 0 or idx.max() >= total):
            raise IndexError(f"page index out of range for {split} split of {total} pages")
        out = np.empty((len(idx), self.seq_len), dtype=np.int64)
        for row, i in enumerate(idx):
            out[row] = self._splits[split][i // PAGES_PER_SHARD][i % PAGES_PER_SHARD]
        return torch.from_numpy(out)


# --- assignment -------------------------------------------------------------------------------


def _key(*parts: bytes | str | int) -> int:
    h = hashlib.blake2b(digest_size=8, person=b"crucible")
    for part in parts:
        raw = part.encode() if isinstance(part, str) else part.to_bytes(8, "little", signed=True) if isinstance(part, int) else part
        h.update(len(raw).to_bytes(4, "little") + raw)
    return int.from_bytes(h.digest(), "little")


def _mix(x: np.ndarray, key: int) -> np.ndarray:
    """splitmix64-style finaliser, vectorised over uint64."""
    with np.errstate(over="ignore"):
        z = x + np.uint64((key * 0x9E3779B97F4A7C15) & _MASK64)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def permute(positions: np.ndarray, size: int, key: int, rounds: int = 4) -> np.ndarray:
    """A keyed bijection of [0, size): 4-round Feistel on the next even power of two, cycle-walked."""
    if size <= 0:
        raise ValueError("size must be positive")
    half_bits = max(1, (int(size - 1).bit_length() + 1) // 2)
    mask = np.uint64((1 << half_bits) - 1)
    x = positions.astype(np.uint64)
    todo = np.ones(len(x), dtype=bool)
    while todo.any():
        left, right = x[todo] >> np.uint64(half_bits), x[todo] & mask
        for r in range(rounds):
            left, right = right, left ^ (_mix(right, key + r) & mask)
        x[todo] = (left << np.uint64(half_bits)) | right
        todo = x >= np.uint64(size)
    return x.astype(np.int64)


def assign(hotkey: str, window: int, seed: int, n: int, num_samples: int) -> list[int]:
    """The n training samples of `hotkey` in `window`: a slot of a per-window permutation.

    Hotkeys hash to one of num_samples // n slots, so two miners share samples only when they
    collide on a slot; any validator recomputes the same list from public values.
    """
    if n <= 0 or n > num_samples:
        raise ValueError(f"n must be in [1, {num_samples}], got {n}")
    slots = num_samples // n
    slot = _key(b"slot", seed, window, hotkey) % slots
    positions = np.arange(slot * n, (slot + 1) * n, dtype=np.int64)
    return permute(positions, num_samples, _key(b"window", seed, window)).tolist()


def random_samples(window_seed: bytes, n: int, num_samples: int) -> list[int]:
    """The validator's control draw: n samples no miner can predict before the window seed exists."""
    if n <= 0 or n > num_samples:
        raise ValueError(f"n must be in [1, {num_samples}], got {n}")
    return permute(np.arange(n, dtype=np.int64), num_samples, _key(b"random", window_seed)).tolist()


def samples_digest(indices: Iterable[int]) -> str:
    """Digest of the samples a miner trained on, carried in its shard header."""
    arr = np.asarray(list(indices), dtype=np.int64)
    return hashlib.blake2b(arr.tobytes(), digest_size=16).hexdigest()
