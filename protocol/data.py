"""Tokenized page store and deterministic sample assignment.

`PageStore` reads a prepared page store (`.npy` shards of fixed-length token pages plus
`index.json`; `neurons.dataset.prepare_dataset` writes them) and checks it matches the hparams.

A dataset that a network shares is published with a manifest (`build_manifest`, `Manifest`): the
format version, the tokenizer's hash, per shard its size, blake2b hash, header length and the
hash of its page table (one blake2b-128 digest per page, so a single page fetched with a ranged GET
is checked on its own), page counts, seq_len and vocab size. The blake2b-256 of the manifest's
canonical JSON (`manifest_hash`) is what hparams pin (`data.manifest_hash`). `DataStore` is what
miners, validators and benches read pages through: this local `PageStore` or the bucket-backed
`transport.dataset.RemotePageStore`.

Assignment is the protocol's contract on data: `assign(hotkey, window, seed, n, num_samples)` gives
every miner its samples for a window, reproducible by any validator, and (near-)disjoint across
hotkeys. `random_samples(window_seed, ...)` is the validators' control draw, unpredictable to a
miner before the window's seed exists. Both index a keyed pseudo-random permutation of the pages
(a Feistel network with cycle walking), so no O(num_samples) permutation is ever materialised.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from protocol.hparams import HParams

INDEX_VERSION = 1
EOT = "<|endoftext|>"  # ends every document in the pages; checkpoints name it bos, eos and pad (protocol.model)
TOKENIZER_FILE = "tokenizer.json"  # the dataset's tokenizer, next to index.json
PAGES_PER_SHARD = 4096  # pages per .npy file of a page store
_MASK64 = (1 << 64) - 1


MANIFEST_VERSION = 1
MANIFEST_FILE = "manifest.json"
PAGE_TABLE_SUFFIX = ".pages"  # next to each shard: blake2b-128 of every page, concatenated
PAGE_DIGEST = 16
MAX_MANIFEST_BYTES = 16 << 20
SPLITS = ("train", "heldout")


class DatasetError(ValueError):
    """A dataset folder that is missing, incomplete or does not match the hparams."""


@runtime_checkable
class DataStore(Protocol):
    """What a node reads pages through: a local `PageStore` or a bucket-backed remote store."""

    seq_len: int
    vocab_size: int
    tokenizer_path: Path

    def num_pages(self, split: str = "train") -> int: ...

    @property
    def num_train(self) -> int: ...

    @property
    def num_heldout(self) -> int: ...

    def pages(self, indices: Iterable[int], split: str = "train") -> torch.Tensor: ...


def blake2b_hex(data: bytes | memoryview, digest_size: int = 32) -> str:
    return hashlib.blake2b(data, digest_size=digest_size).hexdigest()


def page_digests(pages: np.ndarray) -> bytes:
    """The page table of a shard: blake2b-128 of each page's bytes (as stored), concatenated."""
    return b"".join(hashlib.blake2b(row.tobytes(), digest_size=PAGE_DIGEST).digest() for row in pages)


@dataclass(frozen=True)
class ShardEntry:
    file: str
    split: str
    pages: int
    bytes: int
    blake2b: str  # of the whole .npy file
    offset: int  # where the first page starts (after the .npy header)
    page_table: str  # blake2b-256 of the shard's page table (PAGE_TABLE_SUFFIX)


@dataclass(frozen=True)
class Manifest:
    """A published page store, as pinned by `manifest_hash(raw)`."""

    version: int
    seq_len: int
    vocab_size: int
    dtype: str
    tokens: int
    tokenizer: str  # blake2b-256 of tokenizer.json
    tokenizer_bytes: int
    shards: tuple[ShardEntry, ...]

    def split_shards(self, split: str) -> list[ShardEntry]:
        return [s for s in self.shards if s.split == split]

    def num_pages(self, split: str) -> int:
        return sum(s.pages for s in self.split_shards(split))

    @property
    def page_bytes(self) -> int:
        return self.seq_len * np.dtype(self.dtype).itemsize

    def to_json(self) -> bytes:
        """The canonical bytes (sorted keys, no spaces): what is uploaded and hashed."""
        body = {"version": self.version, "seq_len": self.seq_len, "vocab_size": self.vocab_size,
                "dtype": self.dtype, "tokens": self.tokens,
                "tokenizer": {"blake2b": self.tokenizer, "bytes": self.tokenizer_bytes},
                "shards": [s.__dict__ for s in self.shards]}
        return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()

    def check(self, hp: HParams | None) -> None:
        if hp is not None and (hp.model.seq_len, hp.model.vocab_size) != (self.seq_len, self.vocab_size):
            raise DatasetError(f"manifest is for seq_len={self.seq_len} vocab={self.vocab_size}, hparams want "
                               f"seq_len={hp.model.seq_len} vocab={hp.model.vocab_size}")


def manifest_hash(raw: bytes) -> str:
    """What a network pins: blake2b-256 of the manifest's bytes, 64 hex characters."""
    return blake2b_hex(raw)


def parse_manifest(raw: bytes, pinned: str | None = None) -> Manifest:
    """A manifest from its bytes; DatasetError with the reason when it is not the pinned one or malformed.

    Every field is checked even when the hash is the pinned one (a subnet owner can publish a bad manifest):
    integers are ints (not bools, floats or strings) in range, hashes are 64 lowercase hex characters, the
    dtype an integer type that holds every token id, and each shard's file a plain file name (it becomes an
    object key and a path under the node's cache), listed once. A bad field is one line naming it."""
    if pinned is not None and manifest_hash(raw) != pinned:
        raise DatasetError(f"manifest hash {manifest_hash(raw)[:16]}… is not the pinned data.manifest_hash "
                           f"{pinned[:16]}…: a different dataset")
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # not JSON, not UTF-8, nested too deep
        raise DatasetError(f"manifest malformed: {type(exc).__name__}: {exc}") from None
    if not isinstance(body, dict):
        raise DatasetError(f"manifest malformed: a JSON {type(body).__name__}, not an object")
    version = _field(body, "version", "version")
    if not _is_int(version) or version != MANIFEST_VERSION:
        raise DatasetError(f"manifest version {version!r}, expected {MANIFEST_VERSION}")
    seq_len = _int_field(body, "seq_len", "seq_len", 1)
    vocab_size = _int_field(body, "vocab_size", "vocab_size", 1)
    tokens = _int_field(body, "tokens", "tokens", 0)
    dtype = _field(body, "dtype", "dtype")
    try:
        kind = np.dtype(dtype) if isinstance(dtype, str) else None
    except (TypeError, ValueError):
        kind = None
    if kind is None or kind.kind not in "ui" or kind.fields is not None or kind.shape != ():
        raise DatasetError(f"manifest malformed: dtype {dtype!r} is not an integer dtype")
    if vocab_size - 1 > np.iinfo(kind).max:
        raise DatasetError(f"manifest malformed: vocab_size {vocab_size} does not fit dtype {dtype}")
    tok = _field(body, "tokenizer", "tokenizer")
    if not isinstance(tok, dict):
        raise DatasetError(f"manifest malformed: tokenizer is a {type(tok).__name__}, not an object")
    tokenizer = _hash_field(tok, "blake2b", "tokenizer.blake2b")
    tokenizer_bytes = _int_field(tok, "bytes", "tokenizer.bytes", 1)
    entries = _field(body, "shards", "shards")
    if not isinstance(entries, list):
        raise DatasetError(f"manifest malformed: shards is a {type(entries).__name__}, not a list")
    page_bytes = seq_len * kind.itemsize
    shards, names = [], set()
    for k, s in enumerate(entries):
        shard = _shard_entry(s, f"shards[{k}]", page_bytes)
        if shard.file in names:
            raise DatasetError(f"manifest malformed: shards[{k}].file {shard.file!r} is listed twice")
        names.add(shard.file)
        shards.append(shard)
    if not any(s.split == "train" for s in shards):
        raise DatasetError("manifest malformed: shards has no train shard")
    return Manifest(version, seq_len, vocab_size, dtype, tokens, tokenizer, tokenizer_bytes, tuple(shards))


_HEX64 = re.compile(r"[0-9a-f]{64}")
SHARD_FIELDS = frozenset(ShardEntry.__dataclass_fields__)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _field(body: dict, key: str, name: str) -> object:
    if key not in body:
        raise DatasetError(f"manifest malformed: {name} missing")
    return body[key]


def _int_field(body: dict, key: str, name: str, low: int) -> int:
    value = _field(body, key, name)
    if not _is_int(value) or value < low:
        raise DatasetError(f"manifest malformed: {name} {value!r} is not an integer >= {low}")
    return value


def _hash_field(body: dict, key: str, name: str) -> str:
    value = _field(body, key, name)
    if not isinstance(value, str) or not _HEX64.fullmatch(value):
        raise DatasetError(f"manifest malformed: {name} {value!r} is not a blake2b-256 (64 lowercase hex)")
    return value


def plain_file_name(name: object) -> bool:
    """A name that is one file in one folder: no separator, not '.' or '..', nothing unprintable."""
    return (isinstance(name, str) and name not in ("", ".", "..") and not any(c in name for c in "/\\:")
            and name.isprintable() and name == name.strip())


def _shard_entry(s: object, name: str, page_bytes: int) -> ShardEntry:
    if not isinstance(s, dict):
        raise DatasetError(f"manifest malformed: {name} is a {type(s).__name__}, not an object")
    if set(s) != SHARD_FIELDS:
        extra, missing = sorted(set(s) - SHARD_FIELDS), sorted(SHARD_FIELDS - set(s))
        raise DatasetError(f"manifest malformed: {name} " + (f"has unknown field(s) {extra}" if extra
                                                               else f"misses field(s) {missing}"))
    file = s["file"]
    if not plain_file_name(file):
        raise DatasetError(f"manifest malformed: {name}.file {file!r} is not a plain file name")
    where = f"{name} ({file})"
    if s["split"] not in SPLITS:
        raise DatasetError(f"manifest malformed: {where}.split {s['split']!r} is not one of {list(SPLITS)}")
    pages = _int_field(s, "pages", f"{where}.pages", 1)
    size = _int_field(s, "bytes", f"{where}.bytes", 0)
    offset = _int_field(s, "offset", f"{where}.offset", 0)
    if size != offset + pages * page_bytes:
        raise DatasetError(f"manifest malformed: {where}.bytes {size} is not offset {offset} + {pages} pages × "
                           f"{page_bytes} bytes")
    return ShardEntry(file, s["split"], pages, size, _hash_field(s, "blake2b", f"{where}.blake2b"), offset,
                      _hash_field(s, "page_table", f"{where}.page_table"))


def build_manifest(path: str | Path) -> tuple[Manifest, dict[str, bytes]]:
    """The manifest of a prepared page store, and every shard's page table (by table file name)."""
    path = Path(path)
    store = PageStore(path)
    index = json.loads((path / "index.json").read_text())
    try:
        tok = (path / TOKENIZER_FILE).read_bytes()
    except OSError as exc:
        raise DatasetError(f"{path / TOKENIZER_FILE}: unreadable ({exc.strerror or exc}); a published dataset "
                           "carries its tokenizer") from None
    shards, tables = [], {}
    for split in SPLITS:
        for shard, arr in zip(index[split]["shards"], store._splits[split], strict=True):
            file = path / shard["file"]
            table = page_digests(np.asarray(arr))
            tables[shard["file"] + PAGE_TABLE_SUFFIX] = table
            h = hashlib.blake2b(digest_size=32)
            with open(file, "rb") as fh:
                while chunk := fh.read(1 << 20):
                    h.update(chunk)
            shards.append(ShardEntry(shard["file"], split, shard["pages"], file.stat().st_size, h.hexdigest(),
                                     int(arr.offset), blake2b_hex(table)))
    m = Manifest(MANIFEST_VERSION, store.seq_len, store.vocab_size, index.get("dtype", "uint16"), store.tokens,
                 blake2b_hex(tok), len(tok), tuple(shards))
    return m, tables


class PageStore:
    """Read-only view of a prepared dataset; pages come back as int64 tensors [n, seq_len]."""

    def __init__(self, path: str | Path, hp: HParams | None = None):
        self.path = Path(path)
        self.tokenizer_path = self.path / TOKENIZER_FILE
        index_file = self.path / "index.json"
        if not index_file.is_file():
            raise DatasetError(f"{self.path}: no index.json (run `crucible data prepare`)")
        try:
            index = json.loads(index_file.read_text())
        except (OSError, ValueError) as exc:  # ValueError: not JSON, not UTF-8
            raise DatasetError(f"{index_file}: unreadable ({exc})") from None
        if not isinstance(index, dict) or index.get("version") != INDEX_VERSION:
            version = index.get("version") if isinstance(index, dict) else None
            raise DatasetError(f"{index_file}: version {version}, expected {INDEX_VERSION}")
        try:
            self.seq_len: int = int(index["seq_len"])
            self.vocab_size: int = int(index["vocab_size"])
            self.tokens: int = int(index["tokens"])
        except (KeyError, TypeError, ValueError) as exc:
            raise DatasetError(f"{index_file}: malformed ({type(exc).__name__}: {exc})") from None
        if hp is not None and (hp.model.seq_len, hp.model.vocab_size) != (self.seq_len, self.vocab_size):
            raise DatasetError(
                f"{self.path}: built for seq_len={self.seq_len} vocab={self.vocab_size}, "
                f"hparams want seq_len={hp.model.seq_len} vocab={hp.model.vocab_size}"
            )
        self._splits: dict[str, list[np.ndarray]] = {}
        for split in ("train", "heldout"):
            arrays = []
            try:
                shards = [(str(s["file"]), s["pages"]) for s in index[split]["shards"]]
            except (KeyError, TypeError) as exc:
                raise DatasetError(f"{index_file}: malformed {split} entry ({type(exc).__name__}: {exc})") from None
            for file, pages in shards:
                try:  # a missing, truncated or foreign file: one line naming it
                    arr = np.load(self.path / file, mmap_mode="r", allow_pickle=False)
                except (OSError, ValueError, EOFError) as exc:
                    why = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
                    raise DatasetError(f"{self.path / file}: unreadable ({why})") from None
                if arr.ndim != 2 or arr.shape != (pages, self.seq_len):
                    raise DatasetError(f"{file}: shape {arr.shape} does not match index.json")
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
