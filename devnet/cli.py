"""`crucible devnet [run | init | chain | s3 | miner | validator]`: the parts of the local network, one command each.

`run` starts everything; the other parts are what it starts (and what docker/compose.devnet.yml
starts one container each): `miner` and `validator` are the production node with the devnet's
chain client (and, for a miner, an adversary) plugged in (`devnet.participant`).
"""

from __future__ import annotations

import argparse

from neurons.cli import add_group, run_group

PARTS = {
    "run": ("devnet.launcher", "start chain, S3, miners and validators and run W windows"),
    "init": ("devnet.bootstrap", "create wallets, the subnet, registrations and validator stake"),
    "chain": ("devnet.chain_server", "run the simulated subtensor chain process"),
    "s3": ("devnet.s3", "run the embedded S3 server (rclone serve s3) over a folder"),
    "miner": ("devnet.participant:MINER", "`crucible miner` on a devnet:// chain, optionally --adversary KIND"),
    "validator": ("devnet.participant:VALIDATOR", "`crucible validator` on a devnet:// chain"),
}


def add_cli(parser: argparse.ArgumentParser) -> None:
    add_group(parser, "devnet_command", PARTS)


def run_cli(args: argparse.Namespace) -> int:
    return run_group(args, "devnet_command")
