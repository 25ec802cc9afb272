"""The network's dataset in a bucket: `publish_dataset` uploads a page store, `RemotePageStore` reads it.

Layout (`protocol.storage_keys.dataset_key`), all under `dataset/<manifest_hash[:16]>/`:

    manifest.json            the manifest (protocol.data.Manifest); its blake2b-256 is data.manifest_hash
    tokenizer.json           the dataset's tokenizer
    train-00000.npy ...      the page shards, as `crucible data prepare` wrote them
    train-00000.npy.pages    per shard: blake2b-128 of every page (its hash is in the manifest)

`RemotePageStore` has the interface of `protocol.data.PageStore` (`protocol.data.DataStore`): it
fetches the manifest (refused unless its hash is the pinned one), the tokenizer and the page tables
(each checked against the manifest), then for `pages(indices)` exactly the pages asked for, one
ranged GET per run of consecutive pages, each page checked against its table before it is used or
cached. A page or object that does not match is a `DatasetError` with the reason, never used.

Pages live in a bounded on-disk cache (least recently used evicted first; a cached page is checked
again when read). `prefetch(indices)` fetches in the background; `follow(hotkey, window)` makes
the store prefetch each next window's assigned pages as soon as a window's pages are asked for
(the assignment is known one window ahead), so a miner finds its pages local at window start.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from protocol.data import (
    MANIFEST_FILE,
    MAX_MANIFEST_BYTES,
    PAGE_DIGEST,
    PAGE_TABLE_SUFFIX,
    TOKENIZER_FILE,
    DatasetError,
    Manifest,
    ShardEntry,
    assign,
    blake2b_hex,
    build_manifest,
    manifest_hash,
    parse_manifest,
)
from protocol.hparams import HParams
from protocol.storage_config import BucketConfig
from protocol.storage_keys import dataset_key
from transport.bucket import Bucket, ObjectNotFound, StorageConfig, StorageError

log = logging.getLogger(__name__)
MiB = 1 << 20
REQUEST_SECONDS = 60.0  # deadline of one ranged GET (headers and body)
MAX_RUN_PAGES = 256  # consecutive pages fetched in one GET at most


def dataset_prefix(pinned: str) -> str:
    return pinned[:16]


def object_key(pinned: str, name: str) -> str:
    return dataset_key(f"{dataset_prefix(pinned)}/{name}")


def publish_dataset(bucket: Bucket, folder: str | Path,
                    progress: Callable[[str, int], None] | None = None) -> tuple[str, Manifest]:
    """Upload a prepared page store with its manifest (last, so a visible manifest means a complete
    dataset); returns the manifest hash to pin and the manifest. Re-publishing the same store is a no-op
    for objects already there with the right size."""
    folder = Path(folder)
    manifest, tables = build_manifest(folder)
    raw = manifest.to_json()
    pinned = manifest_hash(raw)
    present = {o.key: o for o in bucket.iter_objects(dataset_key(dataset_prefix(pinned)) + "/")}

    def upload(name: str, size: int, send: Callable[[str], None], md5: Callable[[], str]) -> None:
        key = object_key(pinned, name)
        there = present.get(key)
        if there is None or there.size != size or _differs(there.etag, md5):
            send(key)
        if progress:
            progress(name, size)

    upload(TOKENIZER_FILE, manifest.tokenizer_bytes, lambda k: bucket.put_file(k, folder / TOKENIZER_FILE),
           lambda: _file_md5(folder / TOKENIZER_FILE))
    for shard in manifest.shards:
        table = tables[shard.file + PAGE_TABLE_SUFFIX]
        upload(shard.file + PAGE_TABLE_SUFFIX, len(table), lambda k, t=table: bucket.put(k, t),
               lambda t=table: hashlib.md5(t, usedforsecurity=False).hexdigest())
        upload(shard.file, shard.bytes, lambda k, s=shard: bucket.put_file(k, folder / s.file),
               lambda s=shard: _file_md5(folder / s.file))
    bucket.put(object_key(pinned, MANIFEST_FILE), raw)
    return pinned, manifest


def _differs(etag: str | None, md5: Callable[[], str]) -> bool:
    """An object of the right size is kept on re-publish unless its ETag is a plain MD5 (a single-part upload)
    that is not the local file's: a same-size object with other bytes (damaged, replaced) is uploaded again.
    A multipart ETag (`…-N`) or none says nothing about the bytes: kept (the nodes check every page anyway)."""
    tag = (etag or "").strip('"').lower()
    if len(tag) != 32 or any(c not in "0123456789abcdef" for c in tag):
        return False
    return tag != md5()


def _file_md5(path: Path) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


class PageCache:
    """Verified pages on disk, one file each, at most `max_bytes` in all (least recently used out first)."""

    def __init__(self, folder: Path, max_bytes: int):
        self.folder = folder / "pages"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, int] = OrderedDict()
        found = sorted((p.stat().st_mtime, p.name, p.stat().st_size) for p in self.folder.glob("*.page"))
        for _, name, size in found:
            self._entries[name] = size
        self.bytes = sum(self._entries.values())
        self.evictions = 0
        self._evict()

    @staticmethod
    def name(split: str, index: int) -> str:
        return f"{split}-{index}.page"

    def __contains__(self, name: str) -> bool:
        with self._lock:
            return name in self._entries

    def get(self, name: str) -> bytes | None:
        with self._lock:
            if name not in self._entries:
                return None
            self._entries.move_to_end(name)
        try:
            return (self.folder / name).read_bytes()
        except OSError:
            self.drop(name)
            return None

    def put(self, name: str, data: bytes) -> None:
        if len(data) > self.max_bytes:
            return
        tmp = self.folder / f".{name}.{threading.get_ident()}"
        tmp.write_bytes(data)
        os.replace(tmp, self.folder / name)
        with self._lock:
            self.bytes += len(data) - self._entries.pop(name, 0)
            self._entries[name] = len(data)
            self._evict()

    def drop(self, name: str) -> None:
        with self._lock:
            self.bytes -= self._entries.pop(name, 0)
        (self.folder / name).unlink(missing_ok=True)

    def _evict(self) -> None:  # under the lock (or in __init__)
        while self.bytes > self.max_bytes and self._entries:
            name, size = self._entries.popitem(last=False)
            self.bytes -= size
            self.evictions += 1
            (self.folder / name).unlink(missing_ok=True)


class RemotePageStore:
    """`PageStore`'s interface over a published dataset: pages fetched by ranged GETs, verified, cached."""

    def __init__(self, config: BucketConfig, pinned: str, cache_dir: str | Path, hp: HParams | None = None, *,
                 cache_bytes: int = 1024 * MiB, storage: StorageConfig | None = None, workers: int = 8,
                 bucket: Bucket | None = None):
        self.pinned = pinned
        self.bucket = bucket or Bucket(config, storage)
        self.cache_dir = Path(cache_dir)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        try:
            raw = self._get(MANIFEST_FILE, MAX_MANIFEST_BYTES)
        except DatasetError as exc:
            if str(exc).endswith(": not found"):
                raise DatasetError(f"s3://{self.bucket.name} holds no dataset with the pinned manifest hash "
                                   f"{pinned[:16]}… (no {object_key(pinned, MANIFEST_FILE)})") from None
            raise
        self.manifest = parse_manifest(raw, pinned)
        self.manifest.check(hp)
        m = self.manifest
        self.seq_len, self.vocab_size, self.tokens = m.seq_len, m.vocab_size, m.tokens
        self.dtype = np.dtype(m.dtype)
        self.path = self.cache_dir
        self.tokenizer_path = self.cache_dir / TOKENIZER_FILE
        self._load_tokenizer()
        self._shards = {split: m.split_shards(split) for split in ("train", "heldout")}
        self._starts = {split: list(itertools.accumulate((s.pages for s in shards[:-1]), initial=0))
                        for split, shards in self._shards.items()}
        self._tables: dict[str, bytes] = {}
        self.cache = PageCache(self.cache_dir, cache_bytes)
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dataset")
        self._lock = threading.RLock()  # a done future's callback may run at once, under the lock
        self._inflight: dict[str, Future] = {}
        self._follow: tuple[str, int, int] | None = None  # hotkey, seed, samples per window
        self._window: int | None = None
        self.fetched_pages = self.requests = 0

    # -- set-up ----------------------------------------------------------------------------------

    def _get(self, name: str, max_bytes: int) -> bytes:
        key = object_key(self.pinned, name)
        try:
            return self.bucket.fetch(key, max_bytes, time.monotonic() + REQUEST_SECONDS)
        except ObjectNotFound:
            raise DatasetError(f"{key}: not found") from None
        except StorageError as exc:
            raise DatasetError(f"{key}: {exc}") from None

    def _load_tokenizer(self) -> None:
        m = self.manifest
        path = self.tokenizer_path
        if path.is_file() and blake2b_hex(path.read_bytes()) == m.tokenizer:
            return
        data = self._get(TOKENIZER_FILE, m.tokenizer_bytes)
        if blake2b_hex(data) != m.tokenizer:
            raise DatasetError(f"{object_key(self.pinned, TOKENIZER_FILE)}: hash {blake2b_hex(data)[:16]}… does "
                               f"not match the manifest's {m.tokenizer[:16]}…: refused")
        tmp = path.with_name(path.name + ".part")
        tmp.write_bytes(data)
        os.replace(tmp, path)

    def _table(self, shard: ShardEntry) -> bytes:
        table = self._tables.get(shard.file)
        if table is not None:
            return table
        local = self.cache_dir / "tables" / (shard.file + PAGE_TABLE_SUFFIX)
        data = local.read_bytes() if local.is_file() else b""
        if blake2b_hex(data) != shard.page_table:
            data = self._get(shard.file + PAGE_TABLE_SUFFIX, shard.pages * PAGE_DIGEST)
            if len(data) != shard.pages * PAGE_DIGEST or blake2b_hex(data) != shard.page_table:
                raise DatasetError(f"{object_key(self.pinned, shard.file + PAGE_TABLE_SUFFIX)}: page table does not "
                                   "match the manifest: refused")
            local.parent.mkdir(exist_ok=True)
            local.write_bytes(data)
        self._tables[shard.file] = data
        return data

    # -- the PageStore interface ------------------------------------------------------------------

    def num_pages(self, split: str = "train") -> int:
        return self.manifest.num_pages(split)

    @property
    def num_train(self) -> int:
        return self.num_pages("train")

    @property
    def num_heldout(self) -> int:
        return self.num_pages("heldout")

    def pages(self, indices: Iterable[int], split: str = "train") -> torch.Tensor:
        idx = [int(i) for i in indices]
        total = self.num_pages(split)
        if idx and (min(idx) < 0 or max(idx) >= total):
            raise IndexError(f"page index out of range for {split} split of {total} pages")
        self._wait(self._ensure(idx, split))
        out = np.empty((len(idx), self.seq_len), dtype=np.int64)
        for row, i in enumerate(idx):
            out[row] = self._cached_page(split, i)
        self._advance(idx, split)
        return torch.from_numpy(out)

    # -- prefetch -----------------------------------------------------------------------------------

    def prefetch(self, indices: Iterable[int], split: str = "train") -> list[Future]:
        """Start fetching these pages in the background (already cached or in flight: nothing to do)."""
        return self._ensure([int(i) for i in indices], split)

    def follow(self, hotkey: str, seed: int, samples: int, window: int) -> None:
        """Prefetch `hotkey`'s pages for `window` and the next; then, each time a window's assigned pages are
        asked for, the following window's."""
        self._follow, self._window = (hotkey, seed, samples), window
        for w in (window, window + 1):
            self.prefetch(assign(hotkey, w, seed, samples, self.num_train))

    def _advance(self, idx: list[int], split: str) -> None:
        if self._follow is None or split != "train" or self._window is None:
            return
        hotkey, seed, samples = self._follow
        if len(idx) != samples:
            return
        for w in range(self._window - 1, self._window + 4):
            if assign(hotkey, w, seed, samples, self.num_train) == idx:
                self._window = w + 1
                self.prefetch(assign(hotkey, w + 1, seed, samples, self.num_train))
                return

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- fetching -----------------------------------------------------------------------------------

    def _locate(self, split: str, index: int) -> tuple[ShardEntry, int]:
        """The shard holding page `index` of `split`, and the page's number within it (bisection)."""
        starts = self._starts[split]
        k = bisect.bisect_right(starts, index) - 1
        shards = self._shards[split]
        if k < 0 or k >= len(shards) or index - starts[k] >= shards[k].pages:
            raise IndexError(index)
        return shards[k], index - starts[k]

    def _ensure(self, idx: list[int], split: str) -> list[Future]:
        """Futures for every page of `idx` not yet cached: in flight already, or one GET per run of pages."""
        waits: list[Future] = []
        missing: list[int] = []
        with self._lock:
            for i in sorted(set(idx)):
                name = PageCache.name(split, i)
                if name in self._inflight:
                    waits.append(self._inflight[name])
                elif name not in self.cache:
                    missing.append(i)
            runs: list[list[int]] = []
            for i in missing:
                if runs and i == runs[-1][-1] + 1 and len(runs[-1]) < MAX_RUN_PAGES and \
                        self._locate(split, i)[0] is self._locate(split, runs[-1][0])[0]:
                    runs[-1].append(i)
                else:
                    runs.append([i])
            for run in runs:
                fut = self._pool.submit(self._fetch_run, split, run)
                waits.append(fut)
                for i in run:
                    self._inflight[PageCache.name(split, i)] = fut
                fut.add_done_callback(lambda _f, r=run: self._done(split, r))
        return waits

    def _done(self, split: str, run: list[int]) -> None:
        with self._lock:
            for i in run:
                self._inflight.pop(PageCache.name(split, i), None)

    @staticmethod
    def _wait(futures: list[Future]) -> None:
        for fut in futures:
            fut.result()  # a DatasetError raised in the fetch comes out here

    def _fetch_run(self, split: str, run: list[int]) -> None:
        shard, first = self._locate(split, run[0])
        table = self._table(shard)
        size = self.manifest.page_bytes
        key = object_key(self.pinned, shard.file)
        try:
            data = self.bucket.fetch(key, len(run) * size, time.monotonic() + REQUEST_SECONDS,
                                     first_bytes=len(run) * size, offset=shard.offset + first * size)
        except StorageError as exc:
            raise DatasetError(f"{key} pages {first}..{first + len(run) - 1}: {exc}") from None
        self.requests += 1
        if len(data) != len(run) * size:
            raise DatasetError(f"{key}: {len(data)} bytes for {len(run)} pages of {size}: refused")
        for k, i in enumerate(run):
            page = data[k * size : (k + 1) * size]
            self._check(shard, first + k, table, page, key)
            self.cache.put(PageCache.name(split, i), page)
            self.fetched_pages += 1

    @staticmethod
    def _check(shard: ShardEntry, local: int, table: bytes, page: bytes, where: str) -> None:
        want = table[local * PAGE_DIGEST : (local + 1) * PAGE_DIGEST]
        got = hashlib.blake2b(page, digest_size=PAGE_DIGEST).digest()
        if got != want:
            raise DatasetError(f"{where} page {local}: hash {got.hex()[:12]}… does not match the manifest's page "
                               f"table ({want.hex()[:12]}…): refused")

    def _cached_page(self, split: str, index: int) -> np.ndarray:
        name = PageCache.name(split, index)
        shard, local = self._locate(split, index)
        for _ in range(2):
            data = self.cache.get(name)
            if data is not None:
                try:
                    self._check(shard, local, self._table(shard), data, f"cache {name}")
                    return np.frombuffer(data, dtype=self.dtype)
                except DatasetError:
                    log.warning("cached page %s does not match the manifest; fetched again", name)
                    self.cache.drop(name)
            self._wait(self._ensure([index], split))  # evicted meanwhile, or corrupt on disk
        raise DatasetError(f"page {split}/{index}: not in the cache after fetching (cache too small?)")
