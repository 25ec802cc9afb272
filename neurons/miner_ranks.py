"""A miner's torchrun follower ranks (ranks > 0): they train and step only on rank 0's instructions.

Rank 0 runs `neurons.miner.Miner` (chain, buckets, dataset) and sends each window's work with
`neurons.distributed.broadcast_work`; the other ranks run `follow`, a loop over those instructions in
the order rank 0 issues them (each one a collective): data-parallel inner steps on the pages sent, or,
under FSDP2 (`neurons.sharding`), the sharded miner's window, outer step, digest and saved state.
"""

from __future__ import annotations

import torch

from neurons.distributed import DistContext, broadcast_params, broadcast_work
from neurons.local_state import load_sharded_state, save_sharded_state
from neurons.sharding import ShardedMiner, build_sharded_miner
from neurons.training import FP32, TrainSettings, inner_train, make_inner_optimizer, prepare_model


def follow(model: torch.nn.Module | None, hp, dist: DistContext, train: TrainSettings = FP32,
           device: torch.device | str | None = None) -> None:
    """Ranks > 0 under torchrun: train on the pages rank 0 sends, take θ from rank 0 after each window.

    Rank 0 reads the window's pages (from the pinned dataset bucket or a folder) and sends them with the
    instruction, so a follower needs no dataset, cache or bucket credentials of its own. Sharded
    (`dist.sharded`), `model` may be None: the rank's rows are made on `device` when rank 0 says
    "shard" (`neurons.sharding.build_sharded_miner`), and a whole model given here is dropped then."""
    optimizer = None
    if model is not None:
        prepare_model(model, train)
        optimizer = make_inner_optimizer(model, hp)
        device = device or next(model.parameters()).device
    sharded: ShardedMiner | None = None  # sharded: run rank 0's `ShardedMiner` collectives in the same order
    while True:
        message = broadcast_work(dist, None)
        if message["op"] == "shard":
            model = optimizer = None  # this rank's whole copy (if any) is never used sharded
            sharded = build_sharded_miner(None, hp, dist, train, device or "cpu")
            if message.get("dir") is not None:
                load_sharded_state(message["dir"], message["revision"], sharded)
        elif message["op"] == "save":
            save_sharded_state(message["dir"], message["window"], message["revision"], sharded)
        elif message["op"] == "digest":
            sharded.digest()
        elif message["op"] == "apply":
            sharded.apply(message["shards"], message["clip"])
        elif message["op"] == "train" and sharded is not None:
            sharded.window(message["samples"], message["window"], message["seed"])
        elif message["op"] == "train":
            inner_train(model, optimizer, message["samples"], hp, message["window"], dist, train)
        elif message["op"] == "sync":
            if message.get("optimizer") is not None:
                optimizer.load_state_dict(message["optimizer"])
            broadcast_params(dist, model)
        else:
            return
