"""`crucible miner`: parse flags, build the node, run `Miner` window after window."""

from __future__ import annotations

import argparse
import asyncio
import sys

from neurons.node_cli import StartupError, add_node_arguments, open_node, start_metrics


def add_cli(parser: argparse.ArgumentParser) -> None:
    add_node_arguments(parser)
    parser.add_argument("--adversary", default=None,
                        help="devnet only: run an adversarial miner kind (see devnet/adversaries.py)")


def _follow(args: argparse.Namespace, dist) -> int:
    """A torchrun rank > 0: no chain, no bucket; trains on rank 0's instructions."""
    from neurons.miner import follow
    from protocol.data import PageStore
    from protocol.hparams import load_hparams
    from protocol.model import build_model

    hp = load_hparams(args.preset, args.overrides)
    device = f"cuda:{dist.local_rank}" if args.device.startswith("cuda") else args.device
    follow(build_model(hp, device), PageStore(args.data, hp), hp, dist)
    return 0


async def _run(args: argparse.Namespace, dist) -> int:
    from neurons.miner import Miner

    try:
        node, state_dir = await open_node(args)
    except StartupError as exc:
        print(f"crucible miner: {exc}", file=sys.stderr)
        return 1
    try:
        if args.adversary:
            from devnet.adversaries import make_adversary

            miner = make_adversary(args.adversary, node, state_dir)
        else:
            miner = Miner(node, state_dir, dist=dist)
        miner.metrics = start_metrics(args, "miner")
        await miner.run(args.windows)
    finally:
        await node.chain.close()
    return 0


def run_cli(args: argparse.Namespace) -> int:
    from neurons.distributed import init_distributed

    dist = init_distributed()
    if not dist.is_main:
        return _follow(args, dist)
    return asyncio.run(_run(args, dist))
