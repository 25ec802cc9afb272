"""The validator's θ FSDP2-sharded under torchrun: Gauntlet stage 2 and the outer step on each rank's rows.

Why: one 72B θ (288 GB in float32) fits no single accelerator, so `crucible validator --fsdp` under
`torchrun --nproc_per_node R` holds θ the way the sharded miner does (`neurons.sharding.shard_model`:
rank r holds rows [r·⌈d0/R⌉, …) of every parameter, FSDP2's Shard(0), float32 master rows). Rank 0 is
the validator (chain, buckets, stage 1, weights, records); the other ranks only hold rows and run the
collectives rank 0 announces (`ShardedValidatorRanks.call` → `neurons.distributed.broadcast_work` over the
control group → `follow_validator`), in the same order: one protocol with the sharded miner's.

How stage 2 runs sharded (`ShardedTheta.evaluate`, the `gauntlet.evaluate.Evaluator` arithmetic):
- the window's eligible encoded shards (compact: 12-bit indices, 2-bit codes, a table) go to every rank
  once (`begin`; the reference and each miner's evaluation then name them by uid); each
  decodes only the kept positions that fall in its rows (`touched_rows`, as `aggregate_rows` does): flat
  indices (int64) and values (float32, `decode(enc) * factor` element by element), never a dense update.
- θ_rows ← θ_rows − step·u at those positions only (1.6 % of the rows at the anchor top-k), forward
  passes, then the saved values are written back: θ is bit-identical after every evaluation (and after
  the window's reference score, whose mean is built one parameter's rows at a time). Beyond its rows
  [⌈d0/R⌉, …] float32, a rank holds ~16 bytes per touched element (index, value, saved value) and the
  window's eligible encoded shards (as rank 0 does), not a copy of its rows.
- forward passes are data-parallel as well as sharded: each rank runs its rows of every batch
  (b[r::R]) through the FSDP2 model (parameters all-gathered layer by layer), and the token-weighted
  loss sums are all-reduced in float64. The losses therefore differ from one process's only in float
  summation order (smaller per-rank matmuls, the sum across ranks): measured on tiny (2 gloo ranks, 4
  miners) |Δ loss| ≤ 9.5e-7 (one float32 ulp at a loss of 8.4) and |Δ loss score| ≤ 1.2e-7, far below
  the score spread between random draws (~1e-3, gauntlet/evaluate.py); tests/test_sharded_validator.py
  allows 1e-5 on losses and 3e-6 on scores.
- validity (names, shapes, finite values) is checked on the whole encoded update, identically on every
  rank without a collective, so every rank raises `UpdateError` for the same miner, before touching θ.

bf16 (`--precision bf16`): FSDP2's `MixedPrecisionPolicy(param_dtype=bf16)` when sharded (every weight,
embeddings and norms too, is all-gathered in bf16), `torch.autocast` otherwise (`neurons.scoring.
LocalBackend`, matmuls in bf16, with autocast's weight-cast cache off: it would run the passes after
θ − step·u on the bf16 weights cast before it, which shrank honest scores 3–5× when measured). The master
rows, θ − step·u and the outer step stay float32, so θ stays bit-identical across nodes whatever a
validator evaluates in: only the scores move. Measured on tiny, same θ, updates and samples, bf16 − fp32:
one process (autocast), 5 honest miners (8 inner steps) and 3 noise updates on 2 batches: |Δ loss score|
≤ 1.4e-5 against honest scores of 1.7–2.0e-3 (< 1 %), relative scores ≤ 0.015 apart (honest 1.5–1.8,
noise ≤ 0.09), the same ranking (Spearman 1.0) and the same indicators; the test's 4 miners on 1 batch:
≤ 3.5e-5; sharded (FSDP2 bf16) ≤ 2e-5. Rankings hold because one validator scores every miner of a
window in one precision, on the same batches, against the same θ: the rounding of the untouched weights
is shared by the before and after passes and cancels in their difference, and what remains (~1e-5) is an
order below the sampling spread already accepted (σ ≈ 1e-3 per draw) and two below honest scores. Miners
whose fp32 scores lie within a few 1e-5 of each other may swap places, as they may between draws anyway.

Start-up: rank 0 restores or catches θ up on the whole model (local state, checkpoint, replay), then
`build_sharded_theta` scatters it into every rank's rows (`neurons.sharding.scatter_rows`) and frees it;
the other ranks build on the meta device and never hold the whole model.

Not done here (said rather than pretended): rank 0 needs the whole θ in memory once at start-up and at
each checkpoint window (gathered into host memory, float32); a sharded validator that falls behind or
out of sync exits so that a restart catches it up (catch-up and recovery replay on the whole model); its
θ is not saved to the local state file (its scores are); `protocol.gather` still builds the dense
aggregate on rank 0's device (the outer step itself uses only the encoded shards). Tested: the arithmetic
on 2 gloo ranks against one process (tests/test_sharded_validator.py) and `Validator` itself over 2
gloo ranks on a real devnet chain for 4 windows (tests/test_sharded_validator_node.py, slow); the devnet launcher
does not start validators under torchrun, and nothing has run on GPUs (NCCL) or at 72B yet.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist

from gauntlet.evaluate import UpdateError, _check_batches
from gauntlet.records import EvalResult
from neurons.distributed import DistContext, broadcast_work
from neurons.sharding import (
    Slot,
    aggregate_rows,
    apply_rows,
    local,
    meta_model,
    plan,
    sample_rows,
    scatter_rows,
    shard_model,
    sharded_digest,
)
from neurons.training import TrainSettings
from protocol.codec import EncodedTensor
from protocol.hparams import HParams
from protocol.model import build_model

Encoded = Mapping[str, EncodedTensor]


def check_encoded(tensors: Encoded, slots: Mapping[str, Slot], factor: float) -> str | None:
    """`gauntlet.evaluate.check_update` of `decode(tensors) * factor`, read from the encoded form (no collective)."""
    if not math.isfinite(factor) or factor < 0:
        return f"scale factor must be finite and ≥ 0, got {factor}"
    for name, enc in tensors.items():
        slot = slots.get(name)
        if slot is None:
            return f"unknown parameter {name!r}"
        if tuple(enc.layout.shape) != slot.shape:
            return f"{name}: shape {tuple(enc.layout.shape)} != parameter shape {slot.shape}"
        values = enc.lookup.to(torch.float32)[enc.code_values()]
        if not bool(torch.isfinite(values * factor if factor != 1.0 else values).all()):
            return f"{name}: non-finite values"
    return None


Touched = tuple[torch.Tensor, torch.Tensor]  # (flat int64 indices into a rank's rows, float32 values)


@torch.no_grad()
def touched_rows(enc: EncodedTensor, slot: Slot, factor: float, device: torch.device | str = "cpu") -> Touched:
    """The nonzero part of this rank's rows of `decode(enc) * factor`: where (flat, in the rows) and what.

    The values are `decode`'s (the table entry of each kept code, float32) times the factor, element by
    element as the dense product would be; indices are unique (the wire checks it)."""
    enc = enc.to(device)
    lo, n = slot.start * slot.row_numel, slot.rows * slot.row_numel
    pos = enc.positions().reshape(-1)
    mine = (pos >= lo) & (pos < lo + n)
    values = enc.lookup.to(torch.float32)[enc.code_values()][mine]
    return pos[mine] - lo, values * factor if factor != 1.0 else values


@torch.no_grad()
def whole_model(hp: HParams, params: Mapping[str, torch.Tensor]) -> torch.nn.Module:
    """A whole CPU model holding `params` (from `ShardedTheta.gather_whole`), e.g. to save a checkpoint."""
    model = build_model(hp, "cpu")
    for name, p in model.named_parameters():
        p.copy_(params[name])
    return model


class ShardedTheta:
    """One rank's rows of the validator's θ and the collectives over them; every rank calls the same
    methods with the same arguments in the same order (rank 0 through `ShardedValidatorRanks`)."""

    def __init__(self, model: torch.nn.Module, hp: HParams, ctx: DistContext, precision: str = "fp32",
                 presharded: bool = False):
        # presharded: `model` is already `shard_model`-ed with its rows in place (`build_sharded_theta`)
        self.model = model if presharded else shard_model(model, TrainSettings(precision=precision))
        self.hp, self.ctx = hp, ctx
        self.slots = plan(self.model, ctx, hp.sparseloco)
        self.device = next(iter(self.params.values())).device
        emb = self.model.get_input_embeddings()
        self.vocab: int | None = getattr(emb, "num_embeddings", None)
        self.random: list[torch.Tensor] = []
        self.updates: dict[Any, tuple[Encoded, float]] = {}  # the window's eligible updates (encoded, clip factor)
        self._before_random: float | None = None
        self._reference: dict[str, Touched] | None = None  # the mean update's rows, once `reference` ran

    @property
    def params(self) -> dict[str, torch.Tensor]:
        """This rank's float32 master rows of every parameter (views: writing them writes θ)."""
        return {name: local(p) for name, p in self.model.named_parameters()}

    # --- θ: digest, debug sample, outer step, whole copy ------------------------------------------------

    def digest(self) -> str:
        return sharded_digest(self.model)

    def sample(self, positions: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`protocol.sample.gather_sample` of θ (exact values, summed from disjoint rows)."""
        return sample_rows(self.params, self.slots, positions)

    def apply(self, shards: Mapping[str, Encoded], clip: float) -> None:
        """The window's outer step on this rank's rows: bit-identical to `apply_outer_step(aggregate_encoded)`."""
        apply_rows(self.model, aggregate_rows(shards, self.slots, clip, device=self.device), self.hp.outer.lr)

    @torch.no_grad()
    def gather_whole(self) -> dict[str, torch.Tensor] | None:
        """θ whole on rank 0 (float32, CPU), one parameter at a time; None elsewhere (a collective)."""
        out: dict[str, torch.Tensor] = {}
        for name, slot in self.slots.items():
            rows = self.params[name]
            if not slot.sharded:
                out[name] = rows.detach().to("cpu", torch.float32).clone()
                continue
            per = -(-slot.shape[0] // self.ctx.world)
            padded = rows.new_zeros((per, *slot.shape[1:]))
            padded[: rows.shape[0]] = rows
            parts = [torch.empty_like(padded) for _ in range(self.ctx.world)] if self.ctx.is_main else None
            dist.gather(padded, parts, dst=0)
            if parts is not None:
                out[name] = torch.cat(parts)[: slot.shape[0]].to("cpu", torch.float32)
        return out if self.ctx.is_main else None

    # --- Gauntlet stage 2 ---------------------------------------------------------------------------------

    def begin(self, random_batches: Sequence[torch.Tensor], updates: Mapping[Any, tuple[Encoded, float]]) -> None:
        """A new window: its random batches and its eligible updates, sent once. θ must not change before the
        window's evaluations are done (the random batches' loss before any update is computed once)."""
        _check_batches(random_batches, self.vocab)
        self.random, self._before_random, self.updates = list(random_batches), None, dict(updates)
        self._reference = None

    @torch.no_grad()
    def mean_loss(self, batches: Sequence[torch.Tensor]) -> float:
        """`gauntlet.evaluate.mean_loss` with each batch's rows split over the ranks (float64 sums all-reduced)."""
        was_training = self.model.training
        self.model.eval()
        total = torch.zeros(2, dtype=torch.float64)
        try:
            for b in batches:
                rows = b[self.ctx.rank :: self.ctx.world]
                weight = 1.0 if len(rows) else 0.0  # fewer rows than ranks: run one row, count nothing
                rows = (rows if len(rows) else b[:1]).to(self.device)
                n = rows.shape[0] * (rows.shape[1] - 1)
                loss = self.model(input_ids=rows, labels=rows).loss
                total[0] += float(loss.double()) * n * weight
                total[1] += n * weight
        finally:
            self.model.train(was_training)
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return float(total[0] / total[1])

    @property
    def loss_before_random(self) -> float:
        if self._before_random is None:
            self._before_random = self.mean_loss(self.random)
        return self._before_random

    @torch.no_grad()
    def _stepped(self, touched: Mapping[str, Touched], alpha: float, batches: Sequence[Sequence[torch.Tensor]]
                 ) -> list[float]:
        """Mean losses over each batch list with θ_rows − alpha·u at the touched positions only (`Evaluator`'s
        `p.sub_(u, alpha=step)`, where u is zero elsewhere), then those positions restored bit for bit."""
        params, saved = self.params, {}
        try:
            for name, (idx, values) in touched.items():
                flat = params[name].view(-1)  # FSDP2's local rows are contiguous: a view, writes reach θ
                saved[name] = flat[idx]  # a copy (advanced indexing)
                flat[idx] = saved[name].sub(values, alpha=alpha)
            return [self.mean_loss(b) for b in batches]
        finally:
            for name, value in saved.items():
                params[name].view(-1)[touched[name][0]] = value

    def evaluate(self, key: Any, assigned: Sequence[torch.Tensor], step: float) -> EvalResult:
        """`Evaluator.evaluate(scale_update(decode(tensors), factor), assigned, step)` on the sharded θ, for
        the window's update `key` (a uid)."""
        tensors, factor = self.updates[key]
        reason = check_encoded(tensors, self.slots, factor)
        if reason is not None:
            raise UpdateError(reason)
        _check_batches(assigned, self.vocab)
        before_random = self.loss_before_random
        before_assigned = self.mean_loss(assigned)
        touched = {name: touched_rows(enc, self.slots[name], factor, self.device) for name, enc in tensors.items()}
        after_assigned, after_random = self._stepped(touched, step, [assigned, self.random])
        after_reference = None  # the memory control: the window's mean update on the same assigned rows
        if self._reference is not None:
            (after_reference,) = self._stepped(self._reference, step, [assigned])
        return EvalResult(loss_before_assigned=before_assigned, loss_after_assigned=after_assigned,
                          loss_before_random=before_random, loss_after_random=after_random, step=step,
                          loss_after_assigned_reference=after_reference)

    def reference(self, step: float) -> float | None:
        """`Evaluator.reference_score([scoring.mean_update(...)], step)`: the loss score of the mean clipped update."""
        updates = list(self.updates.values())
        usable = [(t, f) for t, f in updates if check_encoded(t, self.slots, f) is None]
        if len(usable) != len(updates) or not updates:
            return None  # the single process drops the whole mean then (check_update on the mean)
        touched: dict[str, Touched] = {}
        for name in sorted({name for tensors, _ in usable for name in tensors}):
            # one parameter's rows at a time: the miners' values added in their order (0 + u: exact), / count
            slot = self.slots[name]
            total = torch.zeros(slot.rows * slot.row_numel, dtype=torch.float32, device=self.device)
            where = []
            for tensors, factor in usable:
                if name in tensors:
                    idx, values = touched_rows(tensors[name], slot, factor, self.device)
                    total.index_add_(0, idx, values)
                    where.append(idx)
            idx = torch.unique(torch.cat(where))
            touched[name] = idx, (total / len(usable))[idx]
            del total
        self._reference = touched
        before = self.loss_before_random
        (after,) = self._stepped(touched, step, [self.random])
        if not (math.isfinite(before) and math.isfinite(after)) or before <= 0:
            return None
        return (before - after) / before


def build_sharded_theta(full: torch.nn.Module | None, hp: HParams, ctx: DistContext, precision: str,
                        device: torch.device | str) -> ShardedTheta:
    """Every rank's rows from rank 0's whole θ (a collective; `full` is None on the others, which never
    hold the whole model): built on the meta device, sharded, then filled by `neurons.sharding.scatter_rows`.

    Rank 0's `full` is spent (its tensors emptied): replace every reference to it with the result's model."""
    model = meta_model(hp)
    shard_model(model, TrainSettings(precision=precision))
    model.to_empty(device=device)
    scatter_rows(model, full, ctx)
    return ShardedTheta(model, hp, ctx, precision, presharded=True)


class ShardedValidatorRanks:
    """Rank 0's handle: announce each collective to the followers (`broadcast_work`), then run it here."""

    OPS = ("digest", "sample", "apply", "gather_whole", "begin", "evaluate", "reference")

    def __init__(self, theta: ShardedTheta):
        self.theta = theta

    def call(self, op: str, **kwargs: Any) -> Any:
        if op not in self.OPS:
            raise ValueError(f"unknown sharded validator op {op!r}")
        broadcast_work(self.theta.ctx, {"op": op, **kwargs})
        return getattr(self.theta, op)(**kwargs)

    # `neurons.scoring.EvalBackend`: the Scorer drives stage 2 through these
    def begin(self, random_batches: list[torch.Tensor], updates: Mapping[Any, tuple[Encoded, float]]) -> None:
        self.call("begin", random_batches=random_batches, updates=dict(updates))

    def reference(self, step: float) -> float | None:
        return self.call("reference", step=step)

    def evaluate(self, key: Any, assigned: list[torch.Tensor], step: float) -> EvalResult:
        return self.call("evaluate", key=key, assigned=assigned, step=step)


def follow_validator(hp: HParams, ctx: DistContext, precision: str = "fp32", device: torch.device | str = "cpu"
                     ) -> None:
    """Ranks > 0 of a sharded validator: get their rows of rank 0's θ, then run rank 0's collectives in order.

    Instructions come from the operator's own rank 0 over the control group (pickled, as the miner's);
    a miner's update arrives as the encoded tensors rank 0 already read and checked with `read_shard`.
    A follower never holds the whole model (no chain, bucket or dataset either)."""
    theta: ShardedTheta | None = None
    while True:
        message = broadcast_work(ctx, None)
        op = message.pop("op")
        if op == "shard":
            theta = build_sharded_theta(None, hp, ctx, precision, device)
        elif op in ShardedValidatorRanks.OPS and theta is not None:
            try:
                getattr(theta, op)(**message)
            except UpdateError:
                pass  # raised on every rank alike, before θ was touched; rank 0 logs it
        else:
            return
