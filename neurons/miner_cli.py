"""`crucible miner`: parse flags, build the node, run `Miner` window after window."""

from __future__ import annotations

import argparse
import asyncio
import sys

from neurons.node_cli import StartupError, add_node_arguments, open_node


def add_cli(parser: argparse.ArgumentParser) -> None:
    add_node_arguments(parser)
    parser.add_argument("--adversary", default=None,
                        help="devnet only: run an adversarial miner kind (see devnet/adversaries.py)")


async def _run(args: argparse.Namespace) -> int:
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
            miner = Miner(node, state_dir)
        await miner.run(args.windows)
    finally:
        await node.chain.close()
    return 0


def run_cli(args: argparse.Namespace) -> int:
    return asyncio.run(_run(args))
