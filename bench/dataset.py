"""`crucible bench dataset`: pages/s from the bucket-backed page store vs the local folder, and the wait
for a window's pages at window start with and without prefetch.

Publishes a prepared page store (`--data`, else a small slice of the offline corpus) to a local
`rclone serve s3`, then reads miners' assigned pages (`samples_per_window` random pages per window):

- local: `PageStore.pages` (memory-mapped shards) — the baseline;
- remote, cold: `RemotePageStore.pages` with an empty cache (ranged GETs, every page verified);
- remote, warm: the same pages again (from the disk cache, verified again);
- window-start wait: a cold store asks for window w+1's pages right after window w's, without
  prefetch, and after `--train-s` seconds of "training" following `follow()`'s prefetch.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.cli import add_json_flag, print_json


def add_cli(parser: argparse.ArgumentParser) -> None:
    add_json_flag(parser)
    parser.add_argument("--data", type=Path, help="a prepared dataset (default: a small offline-corpus slice)")
    parser.add_argument("--preset", default="tiny", help="hparams preset (default tiny)")
    parser.add_argument("--windows", type=int, default=5, help="windows of assigned pages read per measurement")
    parser.add_argument("--train-s", type=float, default=1.0, help="seconds of simulated training per window")


def _rate(fn, pages: int) -> tuple[float, float]:
    started = time.perf_counter()
    fn()
    seconds = time.perf_counter() - started
    return pages / seconds, seconds


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    from devnet.s3 import S3Server
    from protocol.data import PageStore, assign
    from protocol.hparams import load_hparams
    from transport.bucket import Bucket
    from transport.dataset import RemotePageStore, publish_dataset

    hp = load_hparams(args.preset)
    n, seed = hp.samples_per_window, hp.data.seed
    with tempfile.TemporaryDirectory(prefix="crucible-bench-data-") as tmp, S3Server(Path(tmp) / "s3") as server:
        data = args.data
        if data is None:
            from neurons.corpus import stdlib_documents
            from neurons.dataset import prepare_dataset

            data = prepare_dataset(hp, Path(tmp) / "data", list(stdlib_documents(1_500_000))).path
        server.ensure_bucket("dataset")
        config = server.bucket_config("dataset")
        started = time.perf_counter()
        pinned, manifest = publish_dataset(Bucket(config), data)
        publish_s = time.perf_counter() - started
        local = PageStore(data, hp)
        windows = [assign("bench-miner", w, seed, n, local.num_train) for w in range(args.windows)]
        total = sum(len(w) for w in windows)

        def read(store):
            return lambda: [store.pages(w) for w in windows]

        local_rate, _ = _rate(read(local), total)
        remote = RemotePageStore(config, pinned, Path(tmp) / "cache-a", hp)
        cold_rate, _ = _rate(read(remote), total)
        warm_rate, _ = _rate(read(remote), total)
        requests = remote.requests
        remote.close()

        def window_start_waits(prefetch: bool, cache: str) -> list[float]:
            store = RemotePageStore(config, pinned, Path(tmp) / cache, hp)
            if prefetch:
                store.follow("bench-miner", seed, n, 100)
            waits = []
            for w in range(100, 100 + args.windows):
                time.sleep(args.train_s)  # the previous window's training (or the node's start-up)
                started = time.perf_counter()
                store.pages(assign("bench-miner", w, seed, n, store.num_train))
                waits.append(time.perf_counter() - started)
            store.close()
            return waits

        without = window_start_waits(False, "cache-b")
        with_prefetch = window_start_waits(True, "cache-c")
    return {
        "cpu_count": os.cpu_count(),
        "pages": total, "page_bytes": manifest.page_bytes, "samples_per_window": n, "windows": args.windows,
        "publish_s": round(publish_s, 3), "train_pages": manifest.num_pages("train"),
        "local_pages_per_s": round(local_rate), "remote_cold_pages_per_s": round(cold_rate),
        "remote_warm_pages_per_s": round(warm_rate),
        "remote_cold_vs_local": round(cold_rate / local_rate, 4), "remote_warm_vs_local": round(warm_rate / local_rate, 4),
        "remote_cold_gets": requests,
        "window_start_wait_s_without_prefetch": [round(x, 4) for x in without],
        "window_start_wait_s_with_prefetch": [round(x, 4) for x in with_prefetch],
        "train_s_between_windows": args.train_s,
    }


def run_cli(args: argparse.Namespace) -> int:
    return print_json(benchmark(args), args)
