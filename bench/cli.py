"""`crucible bench NAME`: benchmarks that print JSON, each against a baseline measured in the same run.

Each bench is a command like any other (`add_cli`/`run_cli`, see `neurons.cli`); what they
share is here: the `--json` flag and `print_json`, so every bench prints its result the same way
(indented for a person, one line with `--json` for a script).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from neurons.cli import add_group, run_group

BENCHES = {
    "codec": ("bench.codec", "SparseLoCo encode/decode speed and bytes on the wire"),
    "convergence": ("bench.convergence", "SparseLoCo vs DiLoCo vs data-parallel AdamW on the tiny model"),
    "validator": ("bench.validator", "seconds to evaluate one miner vs four plain forward passes"),
    "storage": ("bench.storage", "put/get throughput through the bucket client on the embedded S3 server"),
    "fetch": ("bench.fetch", "a validator's fetch of N shards when k buckets trickle or hang, vs all healthy"),
    "dataset": ("bench.dataset", "pages/s from the bucket-backed page store vs the local folder; prefetch wait"),
    "prepare": ("bench.prepare", "peak memory of crucible data prepare on a large text file vs the offline corpus"),
    "memory": ("bench.memory", "bytes per rank for a preset (params, grads, AdamW, error feedback, activations) and GPUs needed"),
    "gpu": ("bench.gpu", "device check: one miner window (tokens/s, MFU, peak memory, codec, validator s/miner)"),
    "reference-loss": ("bench.reference_loss", "the tiny SparseLoCo reference loss curve (--write regenerates it)"),
}


def add_json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the result as one line of JSON")


def print_json(result: dict[str, Any], args: argparse.Namespace) -> int:
    """Print a bench's result (keys sorted; one line with --json) and return exit code 0."""
    print(json.dumps(result, indent=None if getattr(args, "json", False) else 2, sort_keys=True))
    return 0


def add_cli(parser: argparse.ArgumentParser) -> None:
    add_group(parser, "bench", BENCHES)


def run_cli(args: argparse.Namespace) -> int:
    return run_group(args, "bench")
