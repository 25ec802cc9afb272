"""The network's dataset in a bucket (issue 18): publish, manifest round trip, verified ranged reads,
bounded cache, prefetch, refusal of a different pinned hash and of tampered objects."""

import time

import numpy as np
import pytest
import torch

from protocol.data import (
    MANIFEST_FILE,
    PAGE_TABLE_SUFFIX,
    DatasetError,
    DataStore,
    PageStore,
    assign,
    build_manifest,
    manifest_hash,
    parse_manifest,
)
from protocol.hparams import load_hparams
from transport.dataset import PageCache, RemotePageStore, object_key, publish_dataset

from .plugins.s3 import TEST_STORAGE


@pytest.fixture
def published(s3_bucket, tiny_dataset):
    pinned, manifest = publish_dataset(s3_bucket, tiny_dataset.path)
    return pinned, manifest


def _remote(s3_bucket, pinned, tmp_path, hp=None, **kw):
    return RemotePageStore(s3_bucket.config, pinned, tmp_path / "cache", hp, storage=TEST_STORAGE, **kw)


def test_manifest_round_trip(tiny_dataset):
    manifest, tables = build_manifest(tiny_dataset.path)
    raw = manifest.to_json()
    assert parse_manifest(raw, manifest_hash(raw)) == manifest
    assert manifest.num_pages("train") == tiny_dataset.train_pages
    assert {s.split for s in manifest.shards} == {"train", "heldout"} and len(manifest_hash(raw)) == 64
    assert all(len(tables[s.file + PAGE_TABLE_SUFFIX]) == 16 * s.pages for s in manifest.shards)
    with pytest.raises(DatasetError, match="not the pinned"):
        parse_manifest(raw, "0" * 64)
    with pytest.raises(DatasetError, match="malformed"):
        parse_manifest(b'{"version": 1}')


def test_remote_store_reads_the_same_pages(s3_bucket, published, tiny_store, tiny_hp, tmp_path):
    pinned, _ = published
    remote = _remote(s3_bucket, pinned, tmp_path, tiny_hp)
    assert isinstance(remote, DataStore) and isinstance(tiny_store, DataStore)
    assert (remote.num_train, remote.num_heldout) == (tiny_store.num_train, tiny_store.num_heldout)
    idx = assign("hk", 3, tiny_hp.data.seed, tiny_hp.samples_per_window, remote.num_train) + [0, 1, 2, remote.num_train - 1]
    assert torch.equal(remote.pages(idx), tiny_store.pages(idx))
    assert torch.equal(remote.pages(range(5), "heldout"), tiny_store.pages(range(5), "heldout"))
    assert remote.tokenizer_path.read_bytes() == tiny_store.tokenizer_path.read_bytes()
    assert remote.fetched_pages == len(set(idx)) + 5  # exactly the pages asked for
    assert remote.requests < remote.fetched_pages  # consecutive pages share a GET
    fetched = remote.fetched_pages
    remote.pages(idx)  # from the cache
    assert remote.fetched_pages == fetched
    with pytest.raises(IndexError):
        remote.pages([remote.num_train])


def test_a_different_pinned_hash_is_refused(s3_bucket, published, tmp_path, tiny_hp):
    pinned, _ = published
    with pytest.raises(DatasetError, match="holds no dataset with the pinned manifest hash ffffffffffffffff"):
        _remote(s3_bucket, "f" * 64, tmp_path)
    # the manifest at the pinned place replaced by another dataset's: its hash is not the pin
    s3_bucket.put(object_key(pinned, MANIFEST_FILE), b'{"version": 1, "other": true}')
    with pytest.raises(DatasetError, match="not the pinned data.manifest_hash"):
        _remote(s3_bucket, pinned, tmp_path)
    with pytest.raises(DatasetError, match="seq_len"):  # the pinned dataset, but not for these hparams
        _remote(s3_bucket, publish_dataset(s3_bucket, _DATA[0])[0], tmp_path / "x",
                load_hparams("tiny", ["model.seq_len=64"]))


_DATA: list = []


@pytest.fixture(autouse=True)
def _data_path(tiny_dataset):
    _DATA[:] = [tiny_dataset.path]


def test_tampered_page_table_and_tokenizer_are_refused(s3_bucket, published, tiny_dataset, tmp_path, tiny_hp):
    pinned, manifest = published
    shard = manifest.shards[0]
    key = object_key(pinned, shard.file)
    data = bytearray(s3_bucket.get(key, 1 << 30))
    page = 7
    data[shard.offset + page * manifest.page_bytes] ^= 1
    s3_bucket.put(key, bytes(data))
    remote = _remote(s3_bucket, pinned, tmp_path / "a", tiny_hp)
    assert remote.pages([6, 8]).shape == (2, tiny_hp.model.seq_len)  # the neighbours are fine
    with pytest.raises(DatasetError, match=f"{shard.file} page {page}: hash .* does not match"):
        remote.pages([page])
    assert PageCache.name("train", page) not in remote.cache  # never cached, never used
    table_key = object_key(pinned, shard.file + PAGE_TABLE_SUFFIX)
    s3_bucket.put(table_key, b"\0" * 16 * shard.pages)
    with pytest.raises(DatasetError, match="page table does not match the manifest"):
        _remote(s3_bucket, pinned, tmp_path / "b", tiny_hp).pages([1])
    s3_bucket.put(object_key(pinned, "tokenizer.json"), b"{}" + b" " * (manifest.tokenizer_bytes - 2))
    with pytest.raises(DatasetError, match="tokenizer.json: hash .* does not match the manifest"):
        _remote(s3_bucket, pinned, tmp_path / "c", tiny_hp)


def test_a_corrupt_cached_page_is_fetched_again(s3_bucket, published, tiny_store, tmp_path):
    pinned, _ = published
    remote = _remote(s3_bucket, pinned, tmp_path)
    remote.pages([5])
    (remote.cache.folder / PageCache.name("train", 5)).write_bytes(b"\1" * 256)
    assert torch.equal(remote.pages([5]), tiny_store.pages([5]))


def test_cache_eviction_keeps_the_cache_under_its_limit(s3_bucket, published, tiny_store, tmp_path, tiny_hp):
    pinned, manifest = published
    limit = 40 * manifest.page_bytes
    remote = _remote(s3_bucket, pinned, tmp_path, cache_bytes=limit)
    seen: set[int] = set()
    for w in range(4):
        idx = assign("hk", w, tiny_hp.data.seed, 32, remote.num_train)
        seen |= set(idx)
        assert torch.equal(remote.pages(idx), tiny_store.pages(idx))
        on_disk = sum(p.stat().st_size for p in remote.cache.folder.glob("*.page"))
        assert on_disk == remote.cache.bytes <= limit
    assert remote.cache.evictions >= len(seen) - 40
    last = assign("hk", 3, tiny_hp.data.seed, 32, remote.num_train)
    assert all(PageCache.name("train", i) in remote.cache for i in last)  # the most recent stay
    again = _remote(s3_bucket, pinned, tmp_path, cache_bytes=10 * manifest.page_bytes)  # a smaller limit on restart
    assert again.cache.bytes <= 10 * manifest.page_bytes
    big = list(range(100))  # more than the cache holds in one call: still served, verified
    assert torch.equal(again.pages(big), tiny_store.pages(big))


def test_prefetch_makes_the_next_window_local(s3_bucket, published, tmp_path, tiny_hp):
    pinned, _ = published
    n = tiny_hp.samples_per_window
    remote = _remote(s3_bucket, pinned, tmp_path)
    remote.follow("miner-0", tiny_hp.data.seed, n, 10)
    for fut in list(remote._inflight.values()):
        fut.result()
    for w in (10, 11):
        assert all(PageCache.name("train", i) in remote.cache
                   for i in assign("miner-0", w, tiny_hp.data.seed, n, remote.num_train))
    fetched = remote.fetched_pages
    remote.pages(assign("miner-0", 10, tiny_hp.data.seed, n, remote.num_train))
    assert remote.fetched_pages == fetched  # window 10 was local at its start
    deadline = time.monotonic() + 10
    nxt = assign("miner-0", 12, tiny_hp.data.seed, n, remote.num_train)
    while not all(PageCache.name("train", i) in remote.cache for i in nxt):  # asking for 10's pages fetched 11's
        assert time.monotonic() < deadline, "window 12 not prefetched"
        remote.pages(assign("miner-0", 11, tiny_hp.data.seed, n, remote.num_train))
        time.sleep(0.05)


def test_local_pages_are_what_the_manifest_hashes(tiny_dataset, tiny_store):
    manifest, tables = build_manifest(tiny_dataset.path)
    shard = manifest.shards[0]
    arr = np.load(tiny_dataset.path / shard.file, mmap_mode="r")
    assert arr.offset == shard.offset
    assert isinstance(PageStore(tiny_dataset.path), DataStore)


class _Cfg:
    def __init__(self, data, state):
        self.data, self.data_cache_mb, self._state = data, 64, state

    def state_folder(self, hotkey):
        return self._state / hotkey


class _Chain:
    async def block(self):
        return 95


def _pinned_hp(s3_bucket, pinned):
    c = s3_bucket.config
    return load_hparams("tiny", [f"data.manifest_hash={pinned}", f"data.endpoint={c.endpoint_url}",
                                 f"data.bucket={c.bucket}", f"data.read_key={c.access_key_id}",
                                 f"data.read_secret={c.secret_access_key.get_secret_value()}",
                                 "endpoints.allow_http=true", "endpoints.allow_networks=[\"127.0.0.0/8\"]"])


def test_a_node_opens_the_pinned_dataset_or_refuses_with_one_line(s3_bucket, published, tiny_dataset, tmp_path):
    import asyncio

    from neurons.node_cli import StartupError, open_store

    pinned, _ = published
    hp = _pinned_hp(s3_bucket, pinned)
    assert hp.revision() != load_hparams("tiny").revision()  # the pin is part of the revision, the place is not
    store = asyncio.run(open_store(_Cfg(tmp_path / "no-folder", tmp_path), hp, "miner-0", _Chain()))
    assert isinstance(store, RemotePageStore) and store.num_train == tiny_dataset.train_pages
    assert store._window == 95 // hp.windows.blocks_per_window  # following the chain's window
    other = _pinned_hp(s3_bucket, "ab" * 32)
    with pytest.raises(StartupError, match=r"^dataset: s3://\S+ holds no dataset with the pinned manifest hash abab") as e:
        asyncio.run(open_store(_Cfg(tmp_path / "no-folder", tmp_path), other, "miner-0", _Chain()))
    assert "\n" not in str(e.value)
    strict = load_hparams("tiny", [f"data.manifest_hash={pinned}", f"data.endpoint={s3_bucket.config.endpoint_url}",
                                   "data.bucket=b-b-b", "data.read_key=AAAAAAAAAAAAAAAAAAAA",
                                   "data.read_secret=BBBBBBBBBBBBBBBBBBBB"])
    with pytest.raises(StartupError, match=r"^dataset bucket \(hparams data\.\*\): .*https"):
        asyncio.run(open_store(_Cfg(tmp_path, tmp_path), strict, "miner-0", _Chain()))
    local = load_hparams("tiny", ["data.manifest_hash=" + "cd" * 32])  # a local folder is checked against the pin
    with pytest.raises(StartupError, match="network pins data.manifest_hash cdcd.*a different dataset"):
        asyncio.run(open_store(_Cfg(tiny_dataset.path, tmp_path), local, "miner-0", _Chain()))
    same = load_hparams("tiny", [f"data.manifest_hash={pinned}"])
    assert asyncio.run(open_store(_Cfg(tiny_dataset.path, tmp_path), same, "m", _Chain())).num_train > 0


def test_pages_across_shards(s3_bucket, tmp_path, monkeypatch):
    import neurons.dataset
    import protocol.data
    from neurons.corpus import stdlib_documents
    from neurons.dataset import prepare_dataset

    monkeypatch.setattr(neurons.dataset, "PAGES_PER_SHARD", 100)
    monkeypatch.setattr(protocol.data, "PAGES_PER_SHARD", 100)
    hp = load_hparams("tiny", ["model.seq_len=32"])
    info = prepare_dataset(hp, tmp_path / "d", list(stdlib_documents(120_000)))
    local = PageStore(info.path, hp)
    pinned, manifest = publish_dataset(s3_bucket, info.path)
    assert len(manifest.split_shards("train")) >= 3
    remote = _remote(s3_bucket, pinned, tmp_path, hp)
    idx = [0, 98, 99, 100, 101, 199, 200, local.num_train - 1, 150]
    assert torch.equal(remote.pages(idx), local.pages(idx))
    assert remote.requests == 7  # 0 | 98-99 | 100-101 | 150 | 199 | 200 | last: runs never cross a shard


def test_publish_cli(s3_server, s3_bucket_name, tiny_dataset, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    creds = s3_server.credentials(s3_bucket_name)
    env = {**os.environ, "CRUCIBLE_BUCKET_READ_KEY": creds.read.access_key_id,
           "CRUCIBLE_BUCKET_READ_SECRET": creds.read.secret_access_key.get_secret_value(),
           "CRUCIBLE_BUCKET_WRITE_KEY": creds.write.access_key_id,
           "CRUCIBLE_BUCKET_WRITE_SECRET": creds.write.secret_access_key.get_secret_value()}
    cmd = [sys.executable, "-m", "neurons.cli", "data", "publish", "--data", str(tiny_dataset.path),
           "--bucket.endpoint", s3_server.endpoint, "--bucket.name", s3_bucket_name]
    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=repo, timeout=120)
    assert out.returncode == 1 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "--bucket.allow-private" in out.stderr  # http on loopback: refused under the strict policy
    out = subprocess.run([*cmd, "--bucket.allow-private"], capture_output=True, text=True, env=env, cwd=repo,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    manifest, _ = build_manifest(tiny_dataset.path)
    assert f"--set data.manifest_hash={manifest_hash(manifest.to_json())}" in out.stdout
    assert f"--set data.bucket={s3_bucket_name}" in out.stdout
