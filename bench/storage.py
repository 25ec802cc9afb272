"""`crucible bench storage`: put/get throughput through `transport.bucket.Bucket`.

By default against the devnet's embedded rclone S3 server in a temporary folder (so it measures our
client plus a local server, not a network); with `--config FILE` (a BucketConfig as JSON) against any
real bucket, e.g. R2. Objects at or above the multipart threshold go through multipart upload and
parallel ranged download; `--single` also measures them as one PUT / one GET for comparison.
Prints nothing itself: `run` returns a dict the CLI prints as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from bench.cli import add_json_flag, print_json
from protocol.storage_config import MiB
from transport.bucket import Bucket, BucketConfig, StorageConfig


def add_cli(parser: argparse.ArgumentParser) -> None:
    add_json_flag(parser)
    parser.add_argument("--sizes-mib", type=int, nargs="+", default=[1, 64], help="Object sizes in MiB.")
    parser.add_argument(
        "--repeats", type=int, default=3, help="Round trips per size (the median is reported)."
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help="BucketConfig JSON of a real bucket (default: a local rclone S3 server in a temporary folder).",
    )
    parser.add_argument("--part-size-mib", type=int, default=16, help="Multipart part size (MiB).")
    parser.add_argument("--threshold-mib", type=int, default=64, help="Multipart threshold (MiB).")
    parser.add_argument("--concurrency", type=int, default=8, help="Parallel parts per object.")
    parser.add_argument("--single", action="store_true", help="Also measure large objects as one PUT/GET.")


def _mbps(size: int, seconds: float) -> float:
    return round(size / 1e6 / seconds, 1) if seconds > 0 else float("inf")


def round_trips(bucket: Bucket, size: int, repeats: int) -> dict[str, Any]:
    """Median put and get throughput (MB/s, 1 MB = 10^6 bytes) of `repeats` round trips of `size` bytes."""
    data = os.urandom(size)
    key = f"bench/{uuid.uuid4().hex}.bin"
    puts, gets = [], []
    try:
        for _ in range(repeats):
            t0 = time.perf_counter()
            bucket.put(key, data)
            t1 = time.perf_counter()
            got = bucket.get(key, max_bytes=size)
            t2 = time.perf_counter()
            if got != data:
                raise RuntimeError("benchmark read back different bytes")
            puts.append(t1 - t0)
            gets.append(t2 - t1)
    finally:
        bucket.delete(key)
    return {
        "size_mib": round(size / MiB, 3),
        "multipart": size >= bucket.storage.multipart_threshold,
        "put_MBps": _mbps(size, statistics.median(puts)),
        "get_MBps": _mbps(size, statistics.median(gets)),
        "put_s": [round(t, 4) for t in puts],
        "get_s": [round(t, 4) for t in gets],
    }


def _bench(config: BucketConfig, args: argparse.Namespace) -> list[dict[str, Any]]:
    storage = StorageConfig(
        part_size=args.part_size_mib * MiB,
        multipart_threshold=args.threshold_mib * MiB,
        max_concurrency=args.concurrency,
    )
    results = [round_trips(Bucket(config, storage), s * MiB, args.repeats) for s in args.sizes_mib]
    if args.single:
        single = storage.model_copy(update={"multipart_threshold": 1 << 62})
        results += [
            round_trips(Bucket(config, single), s * MiB, args.repeats)
            for s in args.sizes_mib
            if s * MiB >= storage.multipart_threshold
        ]
    return results


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    if args.config is not None:
        config = BucketConfig.model_validate(json.loads(args.config.read_text()))
        return {"target": config.endpoint_url or "aws", "results": _bench(config, args)}
    from devnet.s3 import S3Server  # only the local mode needs the devnet

    with tempfile.TemporaryDirectory(prefix="crucible-bench-s3-") as folder, S3Server(folder) as server:
        server.ensure_bucket("bench")
        return {
            "target": "local rclone serve s3",
            "cpu_count": os.cpu_count(),
            "results": _bench(server.bucket_config("bench"), args),
        }


def run_cli(args: argparse.Namespace) -> int:
    return print_json(benchmark(args), args)
