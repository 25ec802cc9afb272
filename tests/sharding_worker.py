"""Worker for test_sharding.py: one rank of a 2-process gloo FSDP2 miner window on tiny (CPU).

Trains the window's inner steps sharded, encodes with shared statistics, gathers the shard to rank 0
(signed, with its debug sample), then applies an outer step on each rank's rows with two peers (this
shard and a fixed synthetic one) and writes θ's digest.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from bittensor.sp_core import Keypair

from neurons.distributed import init_distributed
from neurons.sharding import (
    ShardedCompressor,
    aggregate_rows,
    apply_rows,
    deltas,
    local,
    plan,
    sample_rows,
    shard_model,
    sharded_context,
    sharded_digest,
    snapshot,
)
from neurons.training import TrainSettings, inner_train, make_inner_optimizer
from protocol.codec import Compressor
from protocol.codec_aggregate import robust_clip_norm, update_norm
from protocol.data import PageStore, assign, samples_digest
from protocol.hparams import load_hparams
from protocol.model import build_model
from protocol.sample import debug_positions, flat_sample
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
    model = shard_model(build_model(hp), settings)
    slots = plan(model, ctx, hp.sparseloco)
    optimizer = make_inner_optimizer(model, hp)
    indices = assign("fsdp", 0, hp.data.seed, hp.samples_per_window, store.num_train)
    theta_w = snapshot(model)
    stats = inner_train(model, optimizer, store.pages(indices), hp, 0, ctx, settings)
    update = deltas(model, theta_w, slots)
    with torch.no_grad():
        for name, p in model.named_parameters():
            local(p).copy_(theta_w[name])
    encoded = ShardedCompressor(hp.sparseloco, ctx, slots).encode_all(update)
    numels = {n: s.row_numel * s.shape[0] for n, s in slots.items()}
    debug = flat_sample(sample_rows(theta_w, slots, debug_positions(SEED, numels, hp.shard.debug_sample_size)))
    box = [encoded]
    dist.broadcast_object_list(box, src=0)
    shards = {"a-fsdp": box[0], "b-other": other_peer(hp)}
    norms = {peer: update_norm(tensors) for peer, tensors in shards.items()}
    clip = robust_clip_norm(norms)
    apply_rows(model, aggregate_rows(shards, slots, clip, norms), hp.outer.lr)
    digest = sharded_digest(model)
    if ctx.is_main:
        blob = write_shard(encoded, keypair=Keypair.create_from_uri(HOTKEY_URI), netuid=1, window=0,
                           revision=hp.revision(), data_digest=samples_digest(indices), debug_values=debug)
        Path(out, "shard.bin").write_bytes(blob)
    aligned = sorted(n for n, s in slots.items() if s.aligned)
    Path(out, f"rank{ctx.rank}.json").write_text(json.dumps(
        {"digest": digest, "clip": clip, "losses": stats.losses, "aligned": aligned,
         "local_rows": {n: s.rows for n, s in slots.items()}}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
