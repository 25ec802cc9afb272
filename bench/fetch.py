"""`crucible bench fetch`: a validator's download of N shards when k of the N buckets trickle or hang.

Issue 14: a registered miner controls its bucket's every delay, and the validator downloads every
registered miner's shard each window. This measures what a slow or silent bucket costs the validator:
N signed shards at a preset's real shapes (`--preset`, tiny by default; one synthetic update signed by
N hotkeys), one bucket each on a local rclone server, every bucket behind the hostile proxy
(`devnet.hostile_s3`). Each run is one `transport.fetch.ShardSource.fetch` of all N, exactly as a
validator's window fetch (one GET per object, object and window deadlines, verification): first with
every bucket healthy, then with the first k buckets trickling the body (`trickle`, at a rate that
needs ten windows for one shard) or never answering (`hang`).

Reported per run: seconds, the ratio to the healthy run, how many shards arrived and why the others
did not, and `bound_s`, the deadline arithmetic: a fetch never waits longer than the window download
deadline plus the collection grace (`window_seconds + COLLECT_GRACE_S`), however many buckets
misbehave. `bound_ratio` is that bound over the healthy time, the most a slow bucket can cost.
Prints nothing itself: `benchmark` returns a dict the CLI prints as JSON.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from typing import Any

import torch
from bittensor.sp_core import Keypair

from bench.cli import add_json_flag, print_json
from protocol.codec import Compressor
from protocol.hparams import PRESETS, HParams, load_hparams
from protocol.model import param_shapes
from protocol.storage_keys import gradient_key
from protocol.wire import ShardRules, write_shard
from transport.bucket import Bucket, StorageConfig
from transport.fetch import COLLECT_GRACE_S, BucketPool, ShardSource

MODES = ("trickle", "hang")
WINDOW = 7  # any window: the shards are made for it
NETUID = 1


def add_cli(parser: argparse.ArgumentParser) -> None:
    add_json_flag(parser)
    parser.add_argument("--shards", type=int, default=16, help="N: shards (one bucket each) fetched per run.")
    parser.add_argument("--bad", type=int, nargs="+", default=[0, 2, 4],
                        help="k values: how many of the N buckets misbehave in a run (0 is the healthy baseline).")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="How the k buckets misbehave.")
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="Model shapes of the shards.")
    parser.add_argument("--window-seconds", type=float, default=None,
                        help="Window download deadline (default: the preset's fetch.window_fraction of its window).")
    parser.add_argument("--object-seconds", type=float, default=None,
                        help="Per-object deadline (default: the preset's fetch.object_seconds).")
    parser.add_argument("--repeats", type=int, default=3, help="Healthy runs (the median is the baseline).")
    parser.add_argument("--concurrency", type=int, default=StorageConfig().max_concurrency,
                        help="Downloads in flight at once (the node's storage max_concurrency).")


def _shards(hp: HParams, count: int) -> tuple[ShardRules, dict[str, bytes]]:
    """`count` valid shards for WINDOW at the preset's shapes: one random update, signed by `count` hotkeys."""
    shapes = {name: tuple(shape) for name, shape in param_shapes(hp).items()}
    rules = ShardRules.from_hparams(hp, shapes)
    gen = torch.Generator().manual_seed(0)
    encoded = Compressor(hp.sparseloco).encode_all(
        {name: torch.randn(shape, generator=gen) * 1e-3 for name, shape in shapes.items()})
    debug = torch.zeros(hp.shard.debug_sample_size)
    shards = {}
    for i in range(count):
        keypair = Keypair.create_from_uri(f"//crucible-bench-fetch-{i}")
        shards[keypair.ss58_address] = write_shard(
            encoded, keypair=keypair, netuid=NETUID, window=WINDOW, revision=hp.revision(),
            data_digest="00" * 16, debug_values=debug)
    return rules, shards


def _one_run(source: ShardSource, hotkeys: list[str]) -> tuple[float, dict[str, Any]]:
    started = time.monotonic()
    got = source.fetch(hotkeys)
    seconds = time.monotonic() - started
    reasons: dict[str, int] = {}
    for fetched in got.values():
        if not fetched.ok:
            reasons[str(fetched.reason)] = reasons.get(str(fetched.reason), 0) + 1
    return seconds, {"ok": sum(f.ok for f in got.values()), "failed": reasons}


def measure(server, hp: HParams, args: argparse.Namespace) -> dict[str, Any]:
    """The runs against a running `S3Server` (healthy first, then each k and mode)."""
    from devnet.hostile_s3 import Behaviour, HostileS3  # the adversary lives with the devnet

    window_s = args.window_seconds
    if window_s is None:
        window_s = hp.fetch.window_fraction * hp.windows.blocks_per_window * hp.windows.expected_block_time_s
    object_s = args.object_seconds if args.object_seconds is not None else hp.fetch.object_seconds
    rules, shards = _shards(hp, args.shards)
    hotkeys = list(shards)
    buckets: dict[str, str] = {}
    for i, (hotkey, blob) in enumerate(shards.items()):
        name = f"bench-fetch-{i}"
        server.ensure_bucket(name)
        Bucket(server.bucket_config(name)).put(gradient_key(WINDOW, hotkey), blob)
        buckets[hotkey] = name
    size = len(next(iter(shards.values())))
    result: dict[str, Any] = {
        "preset": hp.name, "shards": args.shards, "shard_bytes": size, "window_seconds": round(window_s, 3),
        "object_seconds": object_s, "collect_grace_s": COLLECT_GRACE_S,
        "bound_s": round(window_s + COLLECT_GRACE_S, 3), "concurrency": args.concurrency, "cpu_count": os.cpu_count(),
        "runs": [],
    }
    with HostileS3.over(server) as proxy:
        read = {h: server.bucket_config(b, write=False) for h, b in buckets.items()}
        credentials = {h: c.model_copy(update={"endpoint_url": proxy.endpoint}) for h, c in read.items()}

        # one client per bucket, kept across windows as a validator's node does
        pool = BucketPool(StorageConfig(max_concurrency=args.concurrency))

        def source() -> ShardSource:
            return ShardSource(pool, credentials, NETUID, WINDOW, rules, object_s, window_s)

        _one_run(source(), hotkeys)  # warm-up: clients created, connections open (a running validator has both)
        healthy = [_one_run(source(), hotkeys) for _ in range(max(1, args.repeats))]
        baseline = statistics.median(s for s, _ in healthy)
        result["healthy_s"] = round(baseline, 4)
        result["bound_ratio"] = round(result["bound_s"] / baseline, 2)
        result["runs"].append({"bad": 0, "mode": "healthy", "seconds": round(baseline, 4), "ratio": 1.0,
                               **healthy[len(healthy) // 2][1]})
        for k in sorted(set(args.bad) - {0}):
            for mode in args.modes:
                proxy.clear()
                for hotkey in hotkeys[: min(k, len(hotkeys))]:
                    lie = Behaviour(trickle_bps=max(1.0, size / (10 * window_s))) if mode == "trickle" \
                        else Behaviour(hang="before_headers")
                    proxy.behave(gradient_key(WINDOW, hotkey), lie, ops={"GET"}, bucket=buckets[hotkey])
                seconds, outcome = _one_run(source(), hotkeys)
                result["runs"].append({"bad": k, "mode": mode, "seconds": round(seconds, 4),
                                       "ratio": round(seconds / baseline, 2), **outcome})
    return result


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    from devnet.s3 import S3Server  # only the local mode needs the devnet

    hp = load_hparams(args.preset)
    with tempfile.TemporaryDirectory(prefix="crucible-bench-fetch-") as folder, S3Server(folder) as server:
        return measure(server, hp, args)


def run_cli(args: argparse.Namespace) -> int:
    return print_json(benchmark(args), args)
