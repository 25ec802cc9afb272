"""`crucible validator`: parse the node flags, build the node (a validator permit is required), run
`Validator` window after window, close.

Under `torchrun --nproc_per_node R crucible validator --fsdp`, rank 0 is the validator (chain, buckets,
stage 1, weights, records) and every rank holds its FSDP2 rows of θ for stage 2 and the outer step;
ranks > 0 only follow rank 0's instructions (`neurons.sharded_eval.follow_validator`). Several ranks
without --fsdp would only replicate θ, so they are refused. `--precision bf16` evaluates in bf16.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import TYPE_CHECKING

from neurons.flags import FlagError
from neurons.node_config import NODE_FLAGS, NodeConfig

if TYPE_CHECKING:  # importing it imports torch; the parser is built without
    from neurons.distributed import DistContext

PROG = "crucible validator"


def add_cli(parser: argparse.ArgumentParser) -> None:
    NODE_FLAGS.add_to(parser)


def _follow(cfg: NodeConfig, dist: DistContext) -> int:
    """A torchrun rank > 0: no chain, no bucket, no dataset, no whole model; holds rows, runs rank 0's collectives."""
    from neurons.sharded_eval import follow_validator

    hp, device = cfg.hparams(), cfg.torch_device()
    device = f"cuda:{dist.local_rank}" if device.startswith("cuda") else device
    follow_validator(hp, dist, cfg.precision, device)  # its rows come from rank 0; never the whole model
    return 0


def run_cli(args: argparse.Namespace) -> int:
    cfg = NODE_FLAGS.parse(args)  # a bad flag fails before torch is imported
    from neurons.distributed import init_distributed
    from neurons.node_cli import run_node
    from neurons.validator import Validator

    dist = init_distributed()
    if cfg.fsdp and not dist.active:  # one process would silently hold the whole model after all
        raise FlagError("--fsdp: shards over torchrun ranks; start under `torchrun --nproc_per_node G` "
                        f"with G ≥ 2 (this is a single process, world size {dist.world})")
    if dist.active and not cfg.fsdp:
        raise FlagError("--fsdp: a validator under torchrun shards θ (--fsdp); without it every rank would "
                        "hold the same whole model for nothing")
    if dist.active:
        from neurons.sharding import sharded_context

        dist = sharded_context(dist)
    if not dist.is_main:
        return _follow(cfg, dist)
    built: list[Validator] = []

    def build(node, state_dir) -> Validator:
        built.append(Validator(node, state_dir, dist=dist, precision=cfg.precision))
        return built[0]

    try:
        return asyncio.run(run_node(cfg, "validator", build, prog=PROG))
    finally:  # a node that could not start (or stopped early) still releases the followers
        if built:
            built[0].stop_ranks()
        elif dist.active:
            from neurons.distributed import broadcast_work

            broadcast_work(dist, {"op": "stop"})
