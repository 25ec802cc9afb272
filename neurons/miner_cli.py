"""`crucible miner`: parse the node flags, build the node, run `Miner` window after window, close.

Under `torchrun --nproc_per_node G`, rank 0 is the miner (chain, bucket, uploads) and every other
rank only trains, on rank 0's instructions (`neurons.miner_ranks.follow`); with `--fsdp` the ranks shard the
model by rows (`neurons.sharding`) instead of each holding all of it.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import TYPE_CHECKING

from neurons.flags import FlagError
from neurons.node_config import NODE_FLAGS, NodeConfig

if TYPE_CHECKING:  # importing it imports torch; the parser is built without
    from neurons.distributed import DistContext

PROG = "crucible miner"


def add_cli(parser: argparse.ArgumentParser) -> None:
    NODE_FLAGS.add_to(parser)


def _follow(cfg: NodeConfig, dist: DistContext) -> int:
    """A torchrun rank > 0: no chain, no bucket, no dataset; trains on the pages rank 0 sends."""
    from neurons.miner_ranks import follow
    from protocol.model import build_model

    hp, device = cfg.hparams(), cfg.torch_device()
    device = f"cuda:{dist.local_rank}" if device.startswith("cuda") else device
    if dist.sharded:  # no whole model here: this rank's rows come from rank 0 (`build_sharded_miner`)
        follow(None, hp, dist, cfg.train_settings(), device=device)
    else:
        follow(build_model(hp, device), hp, dist, cfg.train_settings())
    return 0


def run_cli(args: argparse.Namespace) -> int:
    cfg = NODE_FLAGS.parse(args)  # a bad flag fails before torch is imported
    from neurons.distributed import init_distributed
    from neurons.miner import Miner
    from neurons.node_cli import run_node

    dist = init_distributed()
    if cfg.fsdp and not dist.active:  # one process would silently hold the whole model after all
        raise FlagError("--fsdp: shards over torchrun ranks; start under `torchrun --nproc_per_node G` "
                        f"with G ≥ 2 (this is a single process, world size {dist.world})")
    if cfg.fsdp and dist.active:
        from neurons.sharding import sharded_context

        dist = sharded_context(dist)
    if not dist.is_main:
        return _follow(cfg, dist)
    built: list[Miner] = []

    def build(node, state_dir) -> Miner:
        built.append(Miner(node, state_dir, dist=dist, train=cfg.train_settings()))
        return built[0]

    try:
        return asyncio.run(run_node(cfg, "miner", build, prog=PROG))
    finally:  # a node that could not start still releases the followers (they wait for their first instruction)
        if not built and dist.active:
            from neurons.distributed import broadcast_work

            broadcast_work(dist, {"op": "stop"})
