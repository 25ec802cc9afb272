"""The three training methods `crucible bench convergence` compares, simulated with K peers in one process.

Every method sees the same data: `Workload.samples[w][peer]` are the pages `assign` gives that peer in
window w, and every method trains on all of them once, so tokens are equal by construction.

- SparseLoCo (the network's optimizer): each window every peer starts from the global θ, runs H inner
  AdamW steps (its AdamW state persists across windows, as a real miner's does), folds Δ = θ − θ_local
  into its error feedback, compresses, and writes a real signed shard; the shard is read back through
  the validating reader, aggregated with median-norm clipping and applied with outer SGD.
- DiLoCo: the same inner loop, dense Δ averaged, outer Nesterov SGD on the global θ.
- Data-parallel AdamW: one AdamW step per inner step on the K peers' batches together (the
  all-reduced gradient), H steps per window.

The K peers share one local model; each keeps its own AdamW optimizer (state keyed by the shared
parameters), so memory is one model plus K optimizer states whatever K is.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from bittensor.sp_core import Keypair

from neurons.training import inner_train, make_inner_optimizer, mean_loss
from protocol.codec import Compressor
from protocol.codec_aggregate import aggregate_encoded, apply_outer_step
from protocol.data import samples_digest
from protocol.hparams import HParams
from protocol.model import build_model
from protocol.sample import debug_positions, flat_sample, gather_sample
from protocol.wire import Shard, ShardExpectation, ShardRules, read_shard, write_shard

BENCH_NETUID = 0
Progress = Callable[[str, int, float], None]  # (method, window, held-out loss after it)


@dataclass
class Workload:
    """Everything the methods share: hparams, device, peers, their samples per window, held-out pages."""

    hp: HParams
    device: torch.device
    keypairs: dict[str, Keypair]  # peer id (ss58 hotkey) -> keypair, for signing real shards
    samples: list[dict[str, torch.Tensor]]  # per window: peer id -> pages [samples_per_window, seq_len]
    indices: list[dict[str, list[int]]]  # per window: peer id -> page numbers (for the shard's digest)
    heldout: torch.Tensor  # fixed held-out pages [n, seq_len]
    seed: int = 0

    @property
    def peers(self) -> list[str]:
        return sorted(self.keypairs)

    @property
    def windows(self) -> int:
        return len(self.samples)


@dataclass
class MethodResult:
    curve: list[float]  # held-out loss of the global model after 0, 1, ..., W windows
    train_curve: list[float]  # mean inner training loss per window (over peers and steps)
    tokens: int  # training tokens consumed, all peers together
    bytes_per_window: list[int] = field(default_factory=list)  # bytes one peer sends per window (peer mean)
    seconds: float = 0.0

    @property
    def final(self) -> float:
        return self.curve[-1]


@dataclass
class Settings:
    """Bench-local knobs (the headline run leaves them at the preset's values)."""

    outer_lr: float  # SparseLoCo outer SGD step size (preset: hp.outer.lr)
    diloco_lr: float = 0.7
    diloco_momentum: float = 0.9


class _LocalPeers:
    """K simulated miners on one shared local model, each with its own persistent AdamW state."""

    def __init__(self, work: Workload):
        self.work = work
        self.local = build_model(work.hp, work.device)
        self.optimizers = {peer: make_inner_optimizer(self.local, work.hp) for peer in work.peers}

    def train(
        self, theta: torch.nn.Module, peer: str, window: int
    ) -> tuple[dict[str, torch.Tensor], float, int]:
        """Pseudo-gradient Δ = θ − θ_local after H inner steps from θ, mean inner loss, tokens."""
        params = dict(theta.named_parameters())
        with torch.no_grad():
            for name, p in self.local.named_parameters():
                p.copy_(params[name])
        samples = self.work.samples[window][peer]
        stats = inner_train(self.local, self.optimizers[peer], samples, self.work.hp, window)
        with torch.no_grad():
            delta = {name: params[name] - p for name, p in self.local.named_parameters()}
        return delta, stats.mean_loss, stats.tokens


def _numel(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _window_seed(work: Workload, window: int) -> bytes:
    return hashlib.blake2b(f"bench-convergence:{work.seed}:{window}".encode(), digest_size=32).digest()


def _evaluate(model: torch.nn.Module, work: Workload) -> float:
    return mean_loss(model, work.heldout)


def run_sparseloco(work: Workload, settings: Settings, progress: Progress) -> MethodResult:
    hp = work.hp
    theta = build_model(hp, work.device)
    peers = _LocalPeers(work)
    compressors = {peer: Compressor(hp.sparseloco) for peer in work.peers}
    shapes = {name: tuple(p.shape) for name, p in theta.named_parameters()}
    rules = ShardRules.from_hparams(hp, shapes)
    numels = {name: p.numel() for name, p in theta.named_parameters()}
    result = MethodResult(curve=[_evaluate(theta, work)], train_curve=[], tokens=0)
    started = time.perf_counter()
    for window in range(work.windows):
        positions = debug_positions(_window_seed(work, window), numels, hp.shard.debug_sample_size)
        debug = flat_sample(gather_sample(dict(theta.named_parameters()), positions))
        shards, sizes, losses = {}, [], []
        for peer in work.peers:
            delta, loss, tokens = peers.train(theta, peer, window)
            encoded = compressors[peer].encode_all(delta)
            blob = write_shard(
                encoded, keypair=work.keypairs[peer], netuid=BENCH_NETUID, window=window,
                revision=hp.revision(), data_digest=samples_digest(work.indices[window][peer]),
                debug_values=debug,
            )
            # Aggregate what a gathering node would: the shard as decoded by the validating reader.
            shard = read_shard(blob, ShardExpectation(BENCH_NETUID, window, peer, rules))
            if not isinstance(shard, Shard):
                raise RuntimeError(f"bench convergence: own shard rejected: {shard}")
            shards[peer] = shard.tensors
            sizes.append(len(blob))
            losses.append(loss)
            result.tokens += tokens
        apply_outer_step(theta, aggregate_encoded(shards, device=work.device), settings.outer_lr)
        result.bytes_per_window.append(round(sum(sizes) / len(sizes)))
        result.train_curve.append(sum(losses) / len(losses))
        result.curve.append(_evaluate(theta, work))
        progress("sparseloco", window, result.curve[-1])
    result.seconds = time.perf_counter() - started
    return result


def run_diloco(work: Workload, settings: Settings, progress: Progress) -> MethodResult:
    theta = build_model(work.hp, work.device)
    outer = torch.optim.SGD(theta.parameters(), lr=settings.diloco_lr, momentum=settings.diloco_momentum,
                            nesterov=True)
    peers = _LocalPeers(work)
    dense_bytes = 4 * _numel(theta)
    result = MethodResult(curve=[_evaluate(theta, work)], train_curve=[], tokens=0)
    started = time.perf_counter()
    for window in range(work.windows):
        total: dict[str, torch.Tensor] = {name: torch.zeros_like(p) for name, p in theta.named_parameters()}
        losses = []
        for peer in work.peers:
            delta, loss, tokens = peers.train(theta, peer, window)
            for name, d in delta.items():
                total[name].add_(d)
            losses.append(loss)
            result.tokens += tokens
        for name, p in theta.named_parameters():
            p.grad = total[name].div_(len(work.peers))
        outer.step()
        outer.zero_grad(set_to_none=True)
        result.bytes_per_window.append(dense_bytes)
        result.train_curve.append(sum(losses) / len(losses))
        result.curve.append(_evaluate(theta, work))
        progress("diloco", window, result.curve[-1])
    result.seconds = time.perf_counter() - started
    return result


def run_dp_adamw(work: Workload, settings: Settings, progress: Progress) -> MethodResult:
    hp = work.hp
    batch = hp.inner.batch_size
    k = len(work.peers)
    # One step on the K peers' batches together is the all-reduced (averaged) gradient of K workers:
    # every row has the same token count, so the batch mean loss is the mean of the K per-peer means.
    dp_hp = hp.model_copy(update={"inner": hp.inner.model_copy(update={"batch_size": k * batch})})
    model = build_model(hp, work.device)
    optimizer = make_inner_optimizer(model, hp)
    dense_bytes = 4 * _numel(model)
    result = MethodResult(curve=[_evaluate(model, work)], train_curve=[], tokens=0)
    started = time.perf_counter()
    for window in range(work.windows):
        per_peer = [work.samples[window][peer] for peer in work.peers]
        steps = [torch.cat([s[i : i + batch] for s in per_peer]) for i in range(0, len(per_peer[0]), batch)]
        stats = inner_train(model, optimizer, torch.cat(steps), dp_hp, window)
        result.tokens += stats.tokens
        result.bytes_per_window.append(len(steps) * dense_bytes)
        result.train_curve.append(stats.mean_loss)
        result.curve.append(_evaluate(model, work))
        progress("dp_adamw", window, result.curve[-1])
    result.seconds = time.perf_counter() - started
    return result


METHODS: dict[str, Callable[[Workload, Settings, Progress], MethodResult]] = {
    "sparseloco": run_sparseloco,
    "diloco": run_diloco,
    "dp_adamw": run_dp_adamw,
}
