"""Prometheus metrics of a miner or validator, served on loopback with `--metrics.port`.

Operators watch nodes on Grafana: one gauge or counter per thing that can go wrong. Each node has
its own registry (tests run several nodes in one process); the numbers come from the per-window
reports `Miner.step` / `Validator.step` return and from the buckets' transfer counters, so the
window logic itself carries no metrics code.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from gauntlet.state import ScoringState
from transport.bucket import Bucket


class NodeMetrics:
    def __init__(self, role: str):
        self.role = role
        self.registry = CollectorRegistry()
        r = self.registry
        self.window = Gauge("crucible_window", "Last window this node completed.", registry=r)
        self.bytes_up = Gauge("crucible_bytes_uploaded", "Payload bytes uploaded to buckets.", registry=r)
        self.bytes_down = Gauge("crucible_bytes_downloaded", "Payload bytes downloaded from buckets.", registry=r)
        self.storage_retries = Gauge("crucible_storage_retries", "Bucket requests retried.", registry=r)
        self.up_seconds = Gauge("crucible_upload_seconds", "Seconds spent uploading to buckets.", registry=r)
        self.down_seconds = Gauge("crucible_download_seconds", "Seconds spent downloading from buckets.", registry=r)
        self.window_seconds = Gauge("crucible_window_seconds", "Seconds the last window's step took.", registry=r)
        self.rejections = Counter("crucible_shard_rejections", "Peer shards skipped, by reason.", ["reason"],
                                  registry=r)
        self.chain_failures = Counter("crucible_chain_call_failures", "Chain calls that failed.", ["call"],
                                      registry=r)
        if role == "miner":
            self.loss = Gauge("crucible_inner_loss", "Mean inner training loss of the last window.", registry=r)
            self.tokens_per_s = Gauge("crucible_tokens_per_second", "Training tokens per second.", registry=r)
            self.compute_fraction = Gauge("crucible_compute_fraction", "Training time / window time.", registry=r)
            self.uploaded = Gauge("crucible_shard_uploaded", "1 if the last shard went up on time.", registry=r)
            self.peers_used = Gauge("crucible_peers_aggregated", "Peers in the last outer step.", registry=r)
        else:
            labels = ["uid"]
            self.sync = Gauge("crucible_uid_sync", "Sync score per uid.", labels, registry=r)
            self.loss_score = Gauge("crucible_uid_loss_score", "Relative loss improvement per uid.", labels,
                                    registry=r)
            self.rating = Gauge("crucible_uid_rating", "OpenSkill ordinal (mu - 3 sigma) per uid.", labels,
                                registry=r)
            self.score = Gauge("crucible_uid_score", "Final score per uid.", labels, registry=r)
            self.weight = Gauge("crucible_uid_weight", "Weight set on chain per uid.", labels, registry=r)
            self.weights_set = Gauge("crucible_set_weights_ok", "1 if the last set_weights succeeded.", registry=r)
            self.evaluated = Gauge("crucible_miners_evaluated", "Miners evaluated in stage 2.", registry=r)

    def serve(self, port: int, addr: str = "127.0.0.1") -> None:
        start_http_server(port, addr=addr, registry=self.registry)

    def _storage(self, buckets: list[Bucket]) -> None:
        self.bytes_up.set(sum(b.stats.bytes_uploaded for b in buckets))
        self.bytes_down.set(sum(b.stats.bytes_downloaded for b in buckets))
        self.storage_retries.set(sum(b.stats.retries for b in buckets))
        self.up_seconds.set(sum(b.stats.upload_seconds for b in buckets))
        self.down_seconds.set(sum(b.stats.download_seconds for b in buckets))

    def observe_miner(self, report, buckets: list[Bucket]) -> None:
        self.window.set(report.window)
        self.window_seconds.set(report.window_s)
        if report.train_loss is not None:
            self.loss.set(report.train_loss)
        self.tokens_per_s.set(report.tokens_per_s)
        self.compute_fraction.set(report.compute_fraction)
        self.uploaded.set(1 if report.uploaded else 0)
        self.peers_used.set(len(report.peers_used))
        for reason in report.skipped.values():
            self.rejections.labels(reason=reason).inc()
        self._storage(buckets)

    def observe_validator(self, report, state: ScoringState, buckets: list[Bucket]) -> None:
        self.window.set(report.window)
        self.window_seconds.set(report.seconds)
        self.weights_set.set(1 if report.weights_set else 0)
        if not report.weights_set:
            self.chain_failures.labels(call="set_weights").inc()
        self.evaluated.set(report.evaluated)
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
