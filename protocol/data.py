"""Tokenized page store and deterministic sample assignment.

`prepare_dataset` turns documents (see `protocol.corpus`) into fixed-length token pages: a byte-level
BPE tokenizer is trained locally with `tokenizers` (or an existing `tokenizer.json` is used), every
document is tokenized and joined with an end-of-text token, and the stream is cut into pages of
`seq_len` tokens written as `.npy` shards plus `index.json`. About `heldout_fraction` of the pages
(chosen by a hash of the page number, so spread over the whole corpus) form the held-out split.

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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from protocol.hparams import HParams

EOT = "<|endoftext|>"
INDEX_VERSION = 1
PAGES_PER_SHARD = 4096
_MASK64 = (1 << 64) - 1


class DatasetError(ValueError):
    """A dataset folder that is missing, incomplete or does not match the hparams."""


def train_tokenizer(documents: Iterable[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(documents, trainer)
    return tokenizer


@dataclass(frozen=True)
class DatasetInfo:
    path: Path
    train_pages: int
    heldout_pages: int
    seq_len: int
    tokens: int

    @property
    def train_tokens(self) -> int:
        return self.train_pages * self.seq_len


def _is_heldout(page: int, fraction: float) -> bool:
    digest = hashlib.blake2b(page.to_bytes(8, "little"), digest_size=8, person=b"heldout").digest()
    return int.from_bytes(digest, "little") / 2**64 < fraction


def prepare_dataset(
    hp: HParams,
    out_dir: str | Path,
    documents: list[str],
    tokenizer_path: str | Path | None = None,
    progress: bool = False,
) -> DatasetInfo:
    """Tokenize documents into train/held-out page shards under out_dir (overwrites)."""
    from tokenizers import Tokenizer

    if not documents:
        raise DatasetError("no documents to tokenize")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer_path is not None:
        try:
            tokenizer = Tokenizer.from_file(str(tokenizer_path))
        except Exception as exc:
            raise DatasetError(f"tokenizer {tokenizer_path}: cannot load ({exc})") from None
    else:
        tokenizer = train_tokenizer(documents, hp.model.vocab_size)
    if tokenizer.get_vocab_size() > hp.model.vocab_size:
        raise DatasetError(
            f"tokenizer has {tokenizer.get_vocab_size()} tokens, model.vocab_size is {hp.model.vocab_size}"
        )
    eot = tokenizer.token_to_id(EOT)
    if eot is None:
        raise DatasetError(f"tokenizer has no {EOT} token")
    tokenizer.save(str(out / "tokenizer.json"))

    dtype = np.uint16 if hp.model.vocab_size <= 1 << 16 else np.uint32
    seq = hp.model.seq_len
    pages: dict[str, list[np.ndarray]] = {"train": [], "heldout": []}
    carry = np.zeros(0, dtype=dtype)
    page_no = tokens = 0
    batch = 256
    steps = range(0, len(documents), batch)
    if progress:
        from rich.progress import track

        steps = track(steps, description="tokenizing", total=len(steps))
    for start in steps:
        encodings = tokenizer.encode_batch(documents[start : start + batch])
        ids = [np.asarray(e.ids + [eot], dtype=dtype) for e in encodings]
        stream = np.concatenate([carry, *ids])
        tokens += sum(len(x) for x in ids)
        full = len(stream) // seq
        for row in stream[: full * seq].reshape(full, seq):
            pages["heldout" if _is_heldout(page_no, hp.data.heldout_fraction) else "train"].append(row)
            page_no += 1
        carry = stream[full * seq :]

    for old in out.glob("*-*.npy"):
        old.unlink()
    index: dict = {"version": INDEX_VERSION, "seq_len": seq, "vocab_size": hp.model.vocab_size,
                   "dtype": np.dtype(dtype).name, "tokens": tokens}
    for split, rows in pages.items():
        if not rows:
            raise DatasetError(f"corpus too small: no {split} pages of {seq} tokens")
        shards = []
        for i in range(0, len(rows), PAGES_PER_SHARD):
            name = f"{split}-{i // PAGES_PER_SHARD:05d}.npy"
            np.save(out / name, np.stack(rows[i : i + PAGES_PER_SHARD]), allow_pickle=False)
            shards.append({"file": name, "pages": len(rows[i : i + PAGES_PER_SHARD])})
        index[split] = {"pages": len(rows), "shards": shards}
    (out / "index.json").write_text(json.dumps(index, indent=1))
    return DatasetInfo(out, len(pages["train"]), len(pages["heldout"]), seq, tokens)


class PageStore:
    """Read-only view of a prepared dataset; pages come back as int64 tensors [n, seq_len]."""

    def __init__(self, path: str | Path, hp: HParams | None = None):
        self.path = Path(path)
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
