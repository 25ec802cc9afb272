"""The miner: every window, train on the assigned samples, publish a compressed update, step.

`Miner.step(window)` is one window (docs/protocol.md §3, miner steps 1–6): load the samples `assign` gives
this hotkey, run H inner AdamW steps, take the pseudo-gradient Δ = θ_w − θ_local, compress it with
error feedback, sign and upload the shard (with the sync debug sample of θ_w) before the deadline,
then gather the peers named in the window's peer list and apply the outer step. A window whose
peer list or peers' shards cannot be had leaves the model unchanged and says why.

Adversarial behaviours for the devnet subclass `Miner` in `devnet/adversaries.py` and override the
small hooks `choose_samples` and `make_update`; the honest path lives only here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from neurons.catchup import recover, sync_to
from neurons.distributed import DistContext, broadcast_params, broadcast_work
from neurons.local_state import load_local_state, load_sharded_state, save_local_state, save_sharded_state
from neurons.metrics import NodeMetrics
from neurons.node import FoundRecord, Node, WindowContext
from neurons.node_files import append_metrics
from neurons.pacing import Pace
from neurons.sharding import ShardedMiner, build_sharded_miner
from neurons.training import FP32, TrainSettings, inner_train, make_inner_optimizer, prepare_model
from protocol.codec import Compressor, EncodedTensor
from protocol.data import DatasetError, assign, samples_digest
from protocol.gather import GatherResult
from protocol.sample import debug_positions, flat_sample, gather_sample
from protocol.storage_keys import gradient_key
from protocol.windows import window_of, window_progress
from protocol.wire import write_shard

log = logging.getLogger(__name__)


@dataclass
class MinerReport:
    window: int
    trained: bool = False
    uploaded: bool = False
    train_loss: float | None = None
    tokens: int = 0
    inner_steps: int = 0  # trained this window (fewer than planned when the rest would miss the deadline)
    tokens_per_s: float = 0.0
    compute_s: float = 0.0
    window_s: float = 0.0
    shard_bytes: int = 0
    upload_s: float = 0.0  # seconds the shard's PUT took
    stepped: bool = False
    in_sync: bool = True  # θ matched the window's record (or the record did not say)
    peers_used: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    note: str = ""

    @property
    def compute_fraction(self) -> float:
        return self.compute_s / self.window_s if self.window_s > 0 else 0.0


class Miner:
    def __init__(self, node: Node, state_dir: str | Path, kind: str = "honest", dist: DistContext | None = None,
                 train: TrainSettings = FP32):
        self.node = node
        self.dist = dist or DistContext()
        self.train = train  # micro-batch, precision, ... (node-local; `neurons.training.TrainSettings`)
        prepare_model(node.model, train)
        self.hp = node.hp
        self.kind = kind
        self.state_dir = Path(state_dir)
        self.keypair = node.chain.wallet.hotkey
        self.compressor = Compressor(self.hp.sparseloco)
        self.optimizer = make_inner_optimizer(node.model, self.hp)
        self.numels = {name: p.numel() for name, p in node.model.named_parameters()}
        self.metrics: NodeMetrics | None = None
        self.model_window: int | None = None  # θ in memory is the global model at the start of this window
        self.sharded: ShardedMiner | None = None  # FSDP2 rows (`neurons.sharding`), from the first window on
        self.stopped = False  # the torchrun followers were told to stop (`stop_ranks`)
        self.pace = Pace()  # measured speeds: train only the inner steps that still meet the deadline

    # --- hooks (overridden by devnet adversaries only) -------------------------------------------------

    def choose_samples(self, window: int) -> list[int]:
        return assign(self.node.hotkey, window, self.hp.data.seed, self.hp.samples_per_window,
                      self.node.store.num_train)

    def make_update(self, window: int, delta: dict[str, torch.Tensor]) -> dict[str, EncodedTensor]:
        return self.compressor.encode_all(delta)

    def apply_aggregate(self, result: GatherResult) -> bool:
        if self.sharded is None:
            return self.node.apply(result)
        if result.aggregated is None:
            return False
        shards = {h: result.fetched[h].shard.tensors for h in result.used}
        broadcast_work(self.dist, {"op": "apply", "shards": shards, "clip": result.clip_norm})
        self.sharded.apply(shards, result.clip_norm)
        return True

    # --- one window ------------------------------------------------------------------------------------

    async def step(self, window: int, train: bool = True) -> MinerReport:
        """Train and publish for `window` (if `train`), then gather and apply its aggregated update."""
        report = MinerReport(window)
        started = time.perf_counter()
        ctx = await self.node.open_window(window)
        if train:
            await self._train_and_publish(ctx, report)
        ctx = await self.node.close_window(ctx)
        self.pace.observe_blocks(ctx.start_time, ctx.deadline_time, ctx.bounds.deadline_block - ctx.bounds.start_block)
        found = await self.node.find_record(ctx)
        if found is None:
            report.note += "no validator published an aggregate record for this window in time; model unchanged"
        elif await self.ensure_in_sync(found, report):  # never apply a record to a θ it was not made for
            result = await self.node.gather_record(ctx, found)
            report.skipped = result.skipped
            if result.used != found.record.peers:
                report.note += f"could not reproduce the window's record ({len(result.skipped)} shards unusable); " \
                               "model unchanged"
            else:
                report.peers_used = result.used
                report.stepped = self.apply_aggregate(result)
        self.model_window = window + 1
        if self.dist.active and self.sharded is None:  # sharded: every rank stepped its own rows
            broadcast_work(self.dist, {"op": "sync"})
            broadcast_params(self.dist, self.node.model)
        report.window_s = time.perf_counter() - started
        await asyncio.to_thread(self.save)
        await self.node.prune(window)
        self.record(report)
        return report

    async def ensure_in_sync(self, found: FoundRecord, report: MinerReport) -> bool:
        """Check θ against the record's digest; out of sync, recover (checkpoint + verified replay) now."""
        drift = self.node.drift(found.record) if self.sharded is None else self._sharded_drift(found.record)
        if drift is None:
            return True
        report.in_sync = False
        if self.sharded is not None:
            self.stop_ranks()  # they wait for the next instruction: let them exit rather than die in gloo
            raise SystemExit(f"window {report.window}: sharded θ out of sync ({drift}); restart to catch up")
        log.warning("window %d: out of sync (%s); recovering from the latest checkpoint", report.window, drift)
        why = await recover(self.node, report.window)
        if why is None and self.node.drift(found.record) is None:
            report.note += "was out of sync, recovered; "
            return True
        report.note += f"out of sync ({why or drift}); model unchanged, recovery retried next window. "
        return False

    def _sharded_drift(self, record) -> str | None:
        if record.theta_digest is None:
            return None
        broadcast_work(self.dist, {"op": "digest"})
        mine = self.sharded.digest()
        return None if mine == record.theta_digest else f"θ digest {mine[:12]}… differs from the record's"

    async def _train_and_publish(self, ctx: WindowContext, report: MinerReport) -> None:
        model, window = self.node.model, ctx.window
        started = time.perf_counter()
        indices = self.choose_samples(window)
        try:
            samples = await asyncio.to_thread(self.node.store.pages, indices)  # a slow bucket: not on the loop
        except DatasetError as exc:  # the pinned dataset's bucket is down or served a page that is not the pinned
            # one: no training this window (nothing uploaded); the miner still applies the window's record
            log.warning("window %d: dataset pages unavailable, not trained: %s", window, exc)
            report.note += f"dataset pages unavailable ({exc}); not trained. "
            return
        samples = self.paced(ctx, samples, report)
        if samples is None:
            return
        if self.sharded is not None:  # the same window, a collective over the ranks' rows
            broadcast_work(self.dist, {"op": "train", "window": window, "samples": samples, "seed": ctx.seed})
            trained = time.perf_counter()
            encoded, debug, stats = await asyncio.to_thread(self.sharded.window, samples, window, ctx.seed)
            report.trained, report.train_loss, report.tokens = True, stats.mean_loss, stats.tokens
            report.tokens_per_s = stats.tokens / max(1e-9, time.perf_counter() - started)
            self.pace.observe_steps(report.inner_steps, time.perf_counter() - trained)  # encode included
            await self._sign_and_upload(ctx, report, encoded, debug, indices, started, time.perf_counter())
            return
        theta_w = {name: p.detach().clone() for name, p in model.named_parameters()}
        if self.dist.active:
            # the pages themselves, not their indices: follower ranks hold no dataset (pinned bucket or folder)
            broadcast_work(self.dist, {"op": "train", "window": window, "samples": samples})
        trained = time.perf_counter()
        stats = await asyncio.to_thread(inner_train, model, self.optimizer, samples, self.hp, window, self.dist,
                                        self.train)
        trained_at = time.perf_counter()
        self.pace.observe_steps(report.inner_steps, trained_at - trained)
        report.trained, report.train_loss, report.tokens = True, stats.mean_loss, stats.tokens
        train_s = time.perf_counter() - started
        report.tokens_per_s = stats.tokens / train_s if train_s > 0 else 0.0
        with torch.no_grad():
            delta = {name: theta_w[name] - p for name, p in model.named_parameters()}
            for name, p in model.named_parameters():
                p.copy_(theta_w[name])  # the outer step starts from θ_w, like everyone else's
        encoded = await asyncio.to_thread(self.make_update, window, delta)
        positions = debug_positions(ctx.seed, self.numels, self.hp.shard.debug_sample_size)
        debug = flat_sample(gather_sample(theta_w, positions))
        await self._sign_and_upload(ctx, report, encoded, debug, indices, started, trained_at)

    async def _sign_and_upload(self, ctx: WindowContext, report: MinerReport, encoded: dict[str, EncodedTensor],
                               debug: torch.Tensor, indices: list[int], started: float, trained_at: float) -> None:
        window = ctx.window
        blob = write_shard(
            encoded, keypair=self.keypair, netuid=self.node.netuid, window=window, revision=self.hp.revision(),
            data_digest=samples_digest(indices), debug_values=debug,
        )
        report.compute_s = time.perf_counter() - started
        report.shard_bytes = len(blob)
        prepared_s = time.perf_counter() - trained_at  # encode and sign, after the last inner step
        await self.upload(ctx, blob, report)
        self.pace.observe_finish(prepared_s + report.upload_s)

    async def upload(self, ctx: WindowContext, blob: bytes, report: MinerReport) -> None:
        """Upload inside the window, never after its deadline (a late shard earns nothing)."""
        head = await self.node.chain.block()
        if not ctx.bounds.on_time(head):
            report.note += f"training ended at block {head}, past the deadline {ctx.bounds.deadline_block}; not uploaded. "
            return
        put = time.perf_counter()
        await asyncio.to_thread(self.node.bucket.put, gradient_key(ctx.window, self.node.hotkey), blob)
        report.upload_s = time.perf_counter() - put
        report.uploaded = True

    def paced(self, ctx: WindowContext, samples: torch.Tensor, report: MinerReport) -> torch.Tensor | None:
        """The window's first samples that leave time to encode and upload before the deadline
        (`neurons.pacing`); None when not even one inner step fits. Sets `report.inner_steps`."""
        plan = self.pace.plan(samples, self.hp.inner.batch_size, ctx.start_time,
                              ctx.bounds.deadline_block - ctx.bounds.start_block)
        report.inner_steps = plan.steps
        if plan.note:
            report.note += plan.note
            log.warning("window %d: %s", ctx.window, plan.note.strip())
        return plan.samples

    # --- lifecycle -------------------------------------------------------------------------------------

    def record(self, report: MinerReport) -> None:
        """Append the window's numbers to the state folder's metrics.jsonl (`neurons.node_files`)."""
        line = {k: v for k, v in asdict(report).items() if k not in ("peers_used", "skipped")}
        line.update(kind=self.kind, compute_fraction=report.compute_fraction, peers_used=len(report.peers_used))
        append_metrics(self.state_dir, line)

    def save(self) -> None:
        if self.sharded is not None:  # each rank its own AdamW and error-feedback rows (`neurons.local_state`)
            message = {"op": "save", "dir": str(self.state_dir), "window": self.model_window or 0,
                       "revision": self.hp.revision()}
            broadcast_work(self.dist, message)
            save_sharded_state(self.state_dir, message["window"], message["revision"], self.sharded)
            return
        save_local_state(self.state_dir, self.model_window or 0, self.hp.revision(), self.node.model,
                         self.compressor, self.optimizer)

    async def start(self) -> int:
        """Restore local state, catch up to the current window; returns the first window to work on."""
        saved = load_local_state(self.state_dir, self.hp.revision(), self.node.model, self.compressor, self.optimizer)
        current = await self.node.current_window()
        self.model_window = await sync_to(self.node, saved.window if saved else None, current)
        return current

    def _shard(self) -> None:
        """Rank 0's whole θ (restored, caught up) becomes every rank's rows, then is freed; resume the
        ranks' saved AdamW and error-feedback rows if every rank has them (`neurons.local_state`)."""
        message = {"op": "shard", "dir": str(self.state_dir), "revision": self.hp.revision()}
        broadcast_work(self.dist, message)
        self.optimizer = self.compressor = None  # their whole-model tensors are not used sharded: free them
        self.sharded = build_sharded_miner(self.node.model, self.hp, self.dist, self.train, self.node.device)
        self.node.model = self.sharded.model  # the whole model was spent on the scatter
        self.optimizer, self.compressor = self.sharded.optimizer, Compressor(self.hp.sparseloco)
        resumed = load_sharded_state(self.state_dir, message["revision"], self.sharded)
        if resumed is not None:
            log.info("sharded AdamW and error feedback resumed from window %d", resumed)

    async def run(self, windows: int | None = None) -> None:
        """Step window after window (forever, or `windows` times)."""
        try:
            window = await self.start()
        except BaseException:  # no collective has run yet: the followers wait for their first instruction
            self.stop_ranks()
            raise
        if self.dist.sharded:  # from now on every rank holds only its rows
            self._shard()
        elif self.dist.active:  # every rank starts from rank 0's restored θ and AdamW state
            broadcast_work(self.dist, {"op": "sync", "optimizer": self.optimizer.state_dict()})
            broadcast_params(self.dist, self.node.model)
        done = 0
        while windows is None or done < windows:
            head = await self.node.chain.block()
            current = window_of(head, self.hp.windows)
            if current > window and self.sharded is not None:
                self.stop_ranks()
                raise SystemExit(f"sharded miner fell behind (windows {window}..{current - 1}); restart to catch up")
            if current > window:  # behind (a stall): never train for a window whose deadline has passed
                log.warning("windows %d..%d passed while this miner was busy; replaying their records", window,
                            current - 1)
                self.model_window = await sync_to(self.node, window, current)
                if self.dist.active:
                    broadcast_work(self.dist, {"op": "sync"})
                    broadcast_params(self.dist, self.node.model)
                window = current
            late = window_progress(head, self.hp.windows) > 0.5
            report = await self.step(window, train=not late)
            log.info("window %d: %s", window, _summary(report))
            if self.metrics is not None:
                self.metrics.observe_miner(report, self.node.buckets())
            done += 1
            window += 1  # step() waits for the next window's first block itself
        self.stop_ranks()

    def stop_ranks(self) -> None:
        """Tell the torchrun followers to exit (once; nothing without torchrun). Only between instructions:
        a rank 0 that fails inside a collective leaves torchrun to tear the group down."""
        if self.dist.active and not self.stopped:
            self.stopped = True
            broadcast_work(self.dist, {"op": "stop"})


def _summary(r: MinerReport) -> str:
    parts = [f"loss {r.train_loss:.4f}" if r.train_loss is not None else "no training",
             f"{r.tokens_per_s:,.0f} tok/s", f"compute {r.compute_fraction:.0%}",
             f"uploaded {r.shard_bytes:,} B" if r.uploaded else "not uploaded",
             f"stepped with {len(r.peers_used)} peers" if r.stepped else "not stepped"]
    if r.skipped:
        parts.append("skipped " + ", ".join(f"{h[:8]}:{why}" for h, why in sorted(r.skipped.items())))
    if r.note:
        parts.append(r.note)
    return "; ".join(parts)
