"""`crucible bench NAME`: benchmarks that print JSON, each against a baseline measured in the same run."""

from __future__ import annotations

import argparse

from neurons.subcommands import add_group, run_group

BENCHES = {
    "codec": ("bench.codec", "SparseLoCo encode/decode speed and bytes on the wire"),
    "convergence": ("bench.convergence", "SparseLoCo vs DiLoCo vs data-parallel AdamW on the tiny model"),
    "validator": ("bench.validator", "seconds to evaluate one miner vs four plain forward passes"),
    "storage": ("bench.storage", "put/get throughput through the bucket client on the embedded S3 server"),
}


def add_cli(parser: argparse.ArgumentParser) -> None:
    add_group(parser, "bench", BENCHES)


def run_cli(args: argparse.Namespace) -> int:
    return run_group(args, "bench")
