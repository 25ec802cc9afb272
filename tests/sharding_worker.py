"""Worker for test_sharding.py: one rank of a 2-process gloo FSDP2 miner window on tiny (CPU).

Rank 0 drives a `ShardedMiner` as `neurons.miner.Miner` does (each collective announced with
`broadcast_work`); rank 1 runs the production follower loop (`neurons.miner.follow`). The window is
trained sharded, encoded with shared statistics and gathered to rank 0 (signed, with its debug
sample); the outer step runs on each rank's rows with two peers (this shard and a fixed synthetic
one), and rank 0 writes θ's digest.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from bittensor.sp_core import Keypair

from neurons.distributed import broadcast_work, init_distributed
from neurons.miner import follow
from neurons.sharding import ShardedMiner, sharded_context
from neurons.training import TrainSettings
from protocol.codec import Compressor
from protocol.codec_aggregate import robust_clip_norm, update_norm
from protocol.data import PageStore, assign, samples_digest
from protocol.hparams import load_hparams
from protocol.model import build_model
from protocol.wire import write_shard

OVERRIDES = ["inner.steps=4", "inner.batch_size=8"]
HOTKEY_URI = "//Alice"
SEED = b"sharding-test-window"


def other_peer(hp) -> dict:
    """A fixed second peer for the outer step (small Gaussian Δ, encoded by one process)."""
    g = torch.Generator().manual_seed(7)
    shapes = {n: p.shape for n, p in build_model(hp).named_parameters()}
    return Compressor(hp.sparseloco).encode_all({n: torch.randn(s, generator=g) * 1e-3 for n, s in shapes.items()})


def main(data: str, out: str, precision: str = "fp32") -> None:
    torch.set_num_threads(1)
    ctx = sharded_context(init_distributed())
    hp = load_hparams("tiny", OVERRIDES)
    store = PageStore(data, hp)
    settings = TrainSettings(precision=precision)
    model = build_model(hp)
    if not ctx.is_main:
        follow(model, hp, ctx, settings)  # the production follower loop, until rank 0 says stop
        dist.destroy_process_group()
        return
    broadcast_work(ctx, {"op": "shard"})
    miner = ShardedMiner(model, hp, ctx, settings)
    indices = assign("fsdp", 0, hp.data.seed, hp.samples_per_window, store.num_train)
    samples = store.pages(indices)
    broadcast_work(ctx, {"op": "train", "window": 0, "samples": samples, "seed": SEED})
    encoded, debug, stats = miner.window(samples, 0, SEED)
    shards = {"a-fsdp": encoded, "b-other": other_peer(hp)}
    clip = robust_clip_norm({peer: update_norm(tensors) for peer, tensors in shards.items()})
    broadcast_work(ctx, {"op": "apply", "shards": shards, "clip": clip})
    miner.apply(shards, clip)
    broadcast_work(ctx, {"op": "digest"})
    digest = miner.digest()
    broadcast_work(ctx, {"op": "stop"})
    blob = write_shard(encoded, keypair=Keypair.create_from_uri(HOTKEY_URI), netuid=1, window=0,
                       revision=hp.revision(), data_digest=samples_digest(indices), debug_values=debug)
    Path(out, "shard.bin").write_bytes(blob)
    Path(out, "rank0.json").write_text(json.dumps(
        {"digest": digest, "clip": clip, "losses": stats.losses,
         "aligned": sorted(n for n, s in miner.slots.items() if s.aligned),
         "local_rows": {n: s.rows for n, s in miner.slots.items()}}))
    dist.destroy_process_group()

if __name__ == "__main__":
    main(*sys.argv[1:])
