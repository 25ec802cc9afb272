"""Small signed shards and a validator's shard fetch for the hostile-bucket tests.

The wire format of tests/test_wire.py on a two-tensor model, uploaded through the session rclone server and
read back through the hostile proxy (tests/plugins/hostile_s3.py) with short timeouts (`FAST`).
"""

from __future__ import annotations

import time

import torch
from bittensor.sp_core import Keypair

from protocol.codec import Compressor
from protocol.hparams import load_hparams
from protocol.storage_keys import gradient_key
from protocol.wire import ShardRules, read_shard, write_shard
from tests.plugins.hostile_s3 import HostileS3
from transport.bucket import (
    Bucket,
    StorageConfig,
)
from transport.fetch import BucketPool, ShardSource

# One attempt of 1 s at most, two attempts: a hang costs ~2 s here instead of TEST_STORAGE's 3 x 20 s.
FAST = StorageConfig(
    connect_timeout_s=1.0, read_timeout_s=1.0, max_attempts=2, backoff_base_s=0.05, backoff_max_s=0.1
)
A = b"A" * 1000
B = b"B" * 1000
SLACK_S = 0.5  # thread start-up and scheduling on 2 shared cores, on top of a deadline

# Small signed shards for the shard path (the wire format of tests/test_wire.py, a two-tensor model).
HP = load_hparams("tiny")
RULES = ShardRules(HP.sparseloco, 16, HP.revision(), {"layer.w": (128, 96), "layer.b": (96,)})
NETUID, WINDOW = 7, 42
KEYS = [Keypair.create_from_uri(f"//hostile-s3-{i}") for i in range(5)]


def signed_shard(keypair: Keypair, seed: int = 0) -> bytes:
    gen = torch.Generator().manual_seed(seed)
    update = {name: torch.randn(shape, generator=gen) for name, shape in RULES.shapes.items()}
    return write_shard(Compressor(HP.sparseloco).encode_all(update), keypair=keypair, netuid=NETUID,
                       window=WINDOW, revision=HP.revision(), data_digest="d1" * 16, debug_values=torch.zeros(16))


def content_hash(blob: bytes, keypair: Keypair) -> str:
    return read_shard(blob, shard_source(None, [keypair]).expectation(keypair.ss58_address)).header.content_hash


def shard_source(proxy: HostileS3 | None, keypairs: list[Keypair], *, window_s: float = 5.0, object_s: float = 5.0,
                 pinned: dict[str, str] | None = None, storage: StorageConfig = FAST) -> ShardSource:
    """A validator's window fetch of these hotkeys' shards, every one from the proxy's bucket."""
    config = proxy.bucket(storage=storage).config if proxy is not None else None
    creds = {k.ss58_address: config for k in keypairs} if config is not None else {}
    return ShardSource(warm_pool(storage, config), creds, NETUID, WINDOW, RULES, object_s, window_s, pinned)


def warm_pool(storage: StorageConfig, config=None) -> BucketPool:
    """A pool with its client already made, as a running node's is (making a boto3 client costs CPU)."""
    pool = BucketPool(storage)
    if config is not None:
        pool.get(config)
    return pool


def upload(hostile_s3: HostileS3, s3_bucket: Bucket, keypairs: list[Keypair]) -> dict[str, bytes]:
    blobs = {k.ss58_address: signed_shard(k, i) for i, k in enumerate(keypairs)}
    for hotkey, blob in blobs.items():
        s3_bucket.put(gradient_key(WINDOW, hotkey), blob)
    return blobs


def timed(fn):
    started = time.monotonic()
    try:
        return fn(), time.monotonic() - started
    except Exception as exc:  # noqa: BLE001 - the test inspects it
        return exc, time.monotonic() - started
