"""`crucible bench storage`: put/get throughput through `transport.bucket.Bucket`.

By default against the devnet's embedded rclone S3 server in a temporary folder (so it measures our
client plus a local server, not a network); with `--config FILE` (a BucketConfig as JSON) against any
real bucket, e.g. R2. Objects at or above the multipart threshold go through multipart upload and
parallel ranged download; `--single` also measures them as one PUT / one GET for comparison, and
`--managed` measures the same uploads through boto3's managed transfer (`upload_fileobj`, i.e.
s3transfer) with the same part size, threshold and concurrency, next to our `Bucket.put`, and
`--fault-part K` makes part K of one upload of each client fail once (a connection error) and reports
the bytes each sent to recover. Prints nothing itself: `run` returns a dict the CLI prints as JSON.

Why uploads stay on our own multipart code (`transport.bucket_transfer.upload_multipart`) and not
s3transfer, measured here on the local rclone server (2 shared cores, 16 MiB parts, 8 in flight):
- clean uploads are equally fast: 8 MiB 225 vs 213 MB/s, 64 MiB 208 vs 170, 256 MiB 222 vs 211
  (ours vs s3transfer; a second run 147/144, 153/149, 216/206: within the run-to-run noise);
- one transient failure is not: the bucket client turns botocore's retries off so that one policy
  (`bucket_errors.call_with_retry`: typed errors, backoff, redacted messages, retry counters) retries
  every request. Ours then retries the one failed part: 256 MiB with part 15 of 16 failing once sent
  272 MiB in 1.33 s. s3transfer on the same client fails the whole transfer and the retry starts
  over: 480 MiB in 2.14 s (`--sizes-mib 256 --managed --fault-part 15 --threshold-mib 16`).
  Giving s3transfer its own botocore retries instead would mean a second retry policy outside the
  counters and error types every other request uses.
Downloads were never in question (size caps and untrusted peers need the custom reader).
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
    parser.add_argument("--managed", action="store_true",
                        help="Also measure uploads through boto3's managed transfer (s3transfer).")
    parser.add_argument("--fault-part", type=int, default=None, metavar="K",
                        help="With --managed: fail part K once in one upload per client; report the bytes sent.")


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


def managed_uploads(bucket: Bucket, size: int, repeats: int) -> dict[str, Any]:
    """Median upload throughput of boto3's managed transfer (s3transfer) with the bucket's own part size,
    threshold and concurrency, through the same botocore client (same retries and timeouts)."""
    import io

    from boto3.s3.transfer import TransferConfig

    storage = bucket.storage
    config = TransferConfig(multipart_threshold=storage.multipart_threshold,
                            multipart_chunksize=storage.part_size_for(size), max_concurrency=storage.max_concurrency,
                            use_threads=True)
    data = os.urandom(size)
    key = f"bench/{uuid.uuid4().hex}.bin"
    puts = []
    try:
        for _ in range(repeats):
            t0 = time.perf_counter()
            bucket.client.upload_fileobj(io.BytesIO(data), bucket.name, key, Config=config)
            puts.append(time.perf_counter() - t0)
        if bucket.get(key, max_bytes=size) != data:
            raise RuntimeError("benchmark read back different bytes")
    finally:
        bucket.delete(key)
    return {"size_mib": round(size / MiB, 3), "client": "boto3 managed transfer (s3transfer)",
            "multipart": size >= storage.multipart_threshold, "put_MBps": _mbps(size, statistics.median(puts)),
            "put_s": [round(t, 4) for t in puts]}


def _fail_once(bucket: Bucket, part: int) -> dict[str, Any]:
    """Count the UploadPart bytes this bucket's client sends; part `part` fails once (connection error)."""
    from botocore.exceptions import EndpointConnectionError

    state = {"sent": 0, "failed": False}

    def before_send(request, **_kw) -> None:
        body = request.body
        if isinstance(body, bytes | bytearray):
            n = len(body)
        else:  # s3transfer's chunk reader
            pos = body.tell()
            body.seek(0, os.SEEK_END)
            n = body.tell() - pos
            body.seek(pos)
        state["sent"] += n
        if f"partNumber={part}&" in request.url + "&" and not state["failed"]:
            state["failed"] = True
            raise EndpointConnectionError(endpoint_url="injected connection reset")

    bucket.client.meta.events.register("before-send.s3.UploadPart", before_send)
    return state


def fault_uploads(config: BucketConfig, storage: StorageConfig, size: int, part: int) -> list[dict[str, Any]]:
    """One upload per client with part `part` failing once: our per-part retry vs s3transfer, whose failed
    transfer is retried whole (the client's botocore retries are off, as in `Bucket`)."""
    import io

    from boto3.s3.transfer import TransferConfig

    data, out = os.urandom(size), []
    ours = Bucket(config, storage)
    sent = _fail_once(ours, part)
    key = f"bench/{uuid.uuid4().hex}.bin"
    t0 = time.perf_counter()
    ours.put(key, data)
    out.append({"client": "crucible Bucket.put", "size_mib": size / MiB, "fault_part": part,
                "seconds": round(time.perf_counter() - t0, 3), "MiB_sent": round(sent["sent"] / MiB, 1)})
    ours.delete(key)
    managed = Bucket(config, storage)
    sent = _fail_once(managed, part)
    transfer = TransferConfig(multipart_threshold=storage.multipart_threshold,
                              multipart_chunksize=storage.part_size_for(size), max_concurrency=storage.max_concurrency)
    t0, attempts = time.perf_counter(), 0
    while True:
        attempts += 1
        try:
            managed.client.upload_fileobj(io.BytesIO(data), managed.name, key, Config=transfer)
            break
        except Exception:  # S3UploadFailedError wrapping the part's error
            if attempts >= storage.max_attempts:
                raise
    out.append({"client": "boto3 managed transfer (s3transfer)", "size_mib": size / MiB, "fault_part": part,
                "seconds": round(time.perf_counter() - t0, 3), "MiB_sent": round(sent["sent"] / MiB, 1),
                "attempts": attempts})
    managed.delete(key)
    return out


def _bench(config: BucketConfig, args: argparse.Namespace) -> list[dict[str, Any]]:
    storage = StorageConfig(
        part_size=args.part_size_mib * MiB,
        multipart_threshold=args.threshold_mib * MiB,
        max_concurrency=args.concurrency,
    )
    results = []
    for s in args.sizes_mib:  # interleaved, so both clients see the same machine load
        results.append(round_trips(Bucket(config, storage), s * MiB, args.repeats))
        if getattr(args, "managed", False):
            results.append(managed_uploads(Bucket(config, storage), s * MiB, args.repeats))
            if args.fault_part is not None and s * MiB >= storage.multipart_threshold:
                results += fault_uploads(config, storage, s * MiB, args.fault_part)
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
