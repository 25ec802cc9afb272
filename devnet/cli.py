"""`crucible devnet [s3 | chain | init | run]`: the parts of the local network, one command each."""

from __future__ import annotations

import argparse

from neurons.subcommands import add_group, run_group

PARTS = {
    "run": ("devnet.launcher", "start chain, S3, miners and validators and run W windows"),
    "init": ("devnet.bootstrap", "create wallets, the subnet, registrations and validator stake"),
    "chain": ("devnet.chain_server", "run the simulated subtensor chain process"),
    "s3": ("devnet.s3", "run the embedded S3 server (rclone serve s3) over a folder"),
}


def add_cli(parser: argparse.ArgumentParser) -> None:
    add_group(parser, "devnet_command", PARTS)


def run_cli(args: argparse.Namespace) -> int:
    return run_group(args, "devnet_command")
