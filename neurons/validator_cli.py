"""`crucible validator`: parse flags, build the node (a validator permit is required), run `Validator`."""

from __future__ import annotations

import argparse
import asyncio
import sys

from neurons.node_cli import StartupError, add_node_arguments, open_node, start_metrics


def add_cli(parser: argparse.ArgumentParser) -> None:
    add_node_arguments(parser)


async def _run(args: argparse.Namespace) -> int:
    from neurons.validator import Validator

    try:
        node, state_dir = await open_node(args, need_permit=True)
    except StartupError as exc:
        print(f"crucible validator: {exc}", file=sys.stderr)
        return 1
    try:
        validator = Validator(node, state_dir)
        validator.metrics = start_metrics(args, "validator")
        await validator.run(args.windows)
    finally:
        await node.chain.close()
    return 0


def run_cli(args: argparse.Namespace) -> int:
    return asyncio.run(_run(args))
