"""`crucible validator`: parse the node flags, build the node (a validator permit is required), run
`Validator` window after window, close."""

from __future__ import annotations

import argparse
import asyncio

from neurons.node_config import NODE_FLAGS

PROG = "crucible validator"


def add_cli(parser: argparse.ArgumentParser) -> None:
    NODE_FLAGS.add_to(parser)


def run_cli(args: argparse.Namespace) -> int:
    cfg = NODE_FLAGS.parse(args)  # a bad flag fails before torch is imported
    from neurons.node_cli import run_node
    from neurons.validator import Validator

    return asyncio.run(run_node(cfg, "validator", Validator, prog=PROG))
