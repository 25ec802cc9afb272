"""Prometheus metrics of a miner or validator, served with `--metrics.port` (loopback unless `--metrics.addr`).

Operators watch nodes on Grafana (`deploy/grafana/crucible-node.json` reads exactly these names; a
test keeps the two in step): one gauge or counter per thing that can go wrong. Names follow the
Prometheus conventions, which `tests/test_metrics.py` lints: snake_case with the `crucible_` prefix,
base units in the name (`_seconds`, `_bytes`, `_ratio`), and counters — things that only go up, so
`rate()` works on them — exposed with `_total`. Gauges are the latest value of something that goes
up and down (the window, a loss, a weight). The registry also carries the standard process and
platform collectors (`process_cpu_seconds_total`, `process_resident_memory_bytes`,
`python_info`, GC counts).

Each node has its own registry (tests run several nodes in one process); the numbers come from the
per-window reports `Miner.step` / `Validator.step` return and from the buckets' transfer counters, so
the window logic itself carries no metrics code.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Info,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from gauntlet.state import ScoringState
from transport.bucket import Bucket

disable_created_metrics()  # no `_created` series next to every counter: they double the series for nothing
BUCKET_COUNTERS = ("bytes_uploaded", "bytes_downloaded", "upload_seconds", "download_seconds", "retries")


class NodeMetrics:
    def __init__(self, role: str):
        self.role = role
        self.registry = CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        Info("crucible_node", "The node's role.", registry=r).info({"role": role})
        self.window = Gauge("crucible_window", "Last window this node completed.", registry=r)
        self.windows = Counter("crucible_windows_completed", "Windows this node completed.", registry=r)
        self.window_seconds = Gauge("crucible_window_duration_seconds", "Seconds the last window's step took.",
                                    registry=r)
        self.in_sync = Gauge("crucible_in_sync", "1 while θ matches the window's aggregate record, 0 while not.",
                             registry=r)
        self.bucket = {
            "bytes_uploaded": Counter("crucible_bucket_upload_bytes", "Payload bytes uploaded to buckets.", registry=r),
            "bytes_downloaded": Counter("crucible_bucket_download_bytes", "Payload bytes downloaded from buckets.",
                                        registry=r),
            "upload_seconds": Counter("crucible_bucket_upload_seconds", "Seconds spent uploading to buckets.",
                                      registry=r),
            "download_seconds": Counter("crucible_bucket_download_seconds", "Seconds spent downloading from buckets.",
                                        registry=r),
            "retries": Counter("crucible_bucket_retries", "Bucket requests retried.", registry=r),
        }
        self.requests = Counter("crucible_bucket_requests", "Bucket requests, by operation.", ["operation"],
                                registry=r)
        self.rejections = Counter("crucible_shard_rejections", "Peer shards skipped, by reason.", ["reason"],
                                  registry=r)
        self.chain_failures = Counter("crucible_chain_call_failures", "Chain calls that failed.", ["call"],
                                      registry=r)
        self._seen: dict[int, dict[str, Any]] = {}  # id(bucket stats) -> the totals already counted
        if role == "miner":
            self.loss = Gauge("crucible_inner_loss", "Mean inner training loss of the last window.", registry=r)
            self.tokens_per_s = Gauge("crucible_train_tokens_per_second", "Training tokens per second, last window.",
                                      registry=r)
            self.tokens = Counter("crucible_train_tokens", "Tokens trained on.", registry=r)
            self.train_seconds = Counter("crucible_train_seconds", "Seconds spent in inner training.", registry=r)
            self.compute_ratio = Gauge("crucible_compute_ratio", "Training time / window time, last window (0-1).",
                                       registry=r)
            self.uploaded = Gauge("crucible_shard_uploaded", "1 if the last shard went up on time.", registry=r)
            self.uploads = Counter("crucible_shard_uploads", "Windows by upload outcome (on_time, missed).",
                                   ["outcome"], registry=r)
            self.shard_bytes = Gauge("crucible_shard_size_bytes", "Size of the last uploaded shard.", registry=r)
            self.peers_used = Gauge("crucible_peers_aggregated", "Peers in the last outer step.", registry=r)
        else:
            labels = ["uid"]
            self.sync = Gauge("crucible_uid_sync", "Sync score per uid (0-1).", labels, registry=r)
            self.loss_score = Gauge("crucible_uid_loss_score", "Relative loss improvement per uid.", labels,
                                    registry=r)
            self.rating = Gauge("crucible_uid_rating", "OpenSkill ordinal (mu - 3 sigma) per uid.", labels,
                                registry=r)
            self.score = Gauge("crucible_uid_score", "Final score per uid.", labels, registry=r)
            self.weight = Gauge("crucible_uid_weight", "Weight set on chain per uid (0-1).", labels, registry=r)
            self.weights_set = Gauge("crucible_set_weights_ok", "1 if the last set_weights succeeded.", registry=r)
            self.evaluated = Gauge("crucible_miners_evaluated", "Miners evaluated in stage 2, last window.",
                                   registry=r)
            self.eval_seconds = Gauge("crucible_evaluation_duration_seconds",
                                      "Seconds stage 2 took in the last window.", registry=r)

    def serve(self, port: int, addr: str = "127.0.0.1") -> None:
        start_http_server(port, addr=addr, registry=self.registry)

    def _storage(self, buckets: list[Bucket]) -> None:
        """Add what each bucket moved since the last call (its stats only ever grow)."""
        for bucket in buckets:
            stats = bucket.stats
            seen = self._seen.setdefault(id(stats), {"ops": {}})
            for name in BUCKET_COUNTERS:
                total = getattr(stats, name)
                self.bucket[name].inc(max(0, total - seen.get(name, 0)))
                seen[name] = total
            for operation, total in dict(stats.by_operation).items():
                self.requests.labels(operation=operation).inc(max(0, total - seen["ops"].get(operation, 0)))
                seen["ops"][operation] = total

    def _window(self, window: int, seconds: float, in_sync: bool = True) -> None:
        self.window.set(window)
        self.in_sync.set(1 if in_sync else 0)
        self.windows.inc()
        self.window_seconds.set(seconds)

    def observe_miner(self, report, buckets: list[Bucket]) -> None:
        self._window(report.window, report.window_s, getattr(report, "in_sync", True))
        if report.train_loss is not None:
            self.loss.set(report.train_loss)
        self.tokens_per_s.set(report.tokens_per_s)
        self.tokens.inc(report.tokens)
        self.train_seconds.inc(report.compute_s)
        self.compute_ratio.set(report.compute_fraction)
        self.uploaded.set(1 if report.uploaded else 0)
        self.uploads.labels(outcome="on_time" if report.uploaded else "missed").inc()
        if report.uploaded:
            self.shard_bytes.set(report.shard_bytes)
        self.peers_used.set(len(report.peers_used))
        for reason in report.skipped.values():
            self.rejections.labels(reason=reason).inc()
        self._storage(buckets)

    def observe_validator(self, report, state: ScoringState, buckets: list[Bucket]) -> None:
        self._window(report.window, report.seconds, getattr(report, "in_sync", True))
        self.weights_set.set(1 if report.weights_set else 0)
        if not report.weights_set:
            self.chain_failures.labels(call="set_weights").inc()
        self.evaluated.set(report.evaluated)
        self.eval_seconds.set(getattr(report, "eval_seconds", 0.0))
        for uid, us in state.uids.items():
            entry = us.history[-1] if us.history else None
            label = str(uid)
            self.rating.labels(uid=label).set(us.mu - 3 * us.sigma)
            self.score.labels(uid=label).set(us.score)
            self.weight.labels(uid=label).set(report.weights.get(uid, 0.0))
            if entry is not None and entry.window == report.window:
                self.sync.labels(uid=label).set(entry.sync if entry.sync is not None else 0.0)
                if entry.losses is not None:
                    self.loss_score.labels(uid=label).set(entry.losses.loss_score)
                if entry.reject_reason:
                    self.rejections.labels(reason=entry.reject_reason).inc()
        self._storage(buckets)
