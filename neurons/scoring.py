"""The validator's glue between a window's downloaded shards and the pure Gauntlet.

`Scorer.filter_window` (Gauntlet stage 1) turns each miner's fetch outcome (a verified shard, or
the `FetchOutcome`/`RejectReason` there is none) into a `FilterResult`: presence, timeliness, wire
rejections, the sync check of the debug sample against the validator's own θ at the window's
positions, and top-k index overlap between uploaders. `Scorer.evaluate_window` (stage 2) evaluates
as many eligible miners as the budget allows, in an order drawn from the window seed and the
validator's local secret, each update decoded and scaled by its clip factor — the same
`clip_factors` over the same encoded norms the aggregate uses — on a random subset of the miner's
assigned samples and on the window's random samples.

Evaluation batch choice: `gauntlet.eval_batches` batches of `inner.batch_size` samples on each side.
For the tiny preset that is 2 × 8 × 128 = 2,048 tokens per side: measured spread of the loss score
over random draws is an order of magnitude below the gap between honest and noise updates, and the
whole evaluation stays inside a devnet window (see gauntlet/evaluate.py for the measurements).

Where the forward passes run is an `EvalBackend`: `LocalBackend` decodes each update whole and runs
`gauntlet.evaluate.Evaluator` (fp32, or bf16 autocast); a sharded validator (`neurons.sharded_eval`)
hands each rank the encoded update and evaluates on its rows of θ. The Scorer's choices (who, in which
order, on which samples, with which clip factor) are the same either way.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from collections.abc import Hashable, Mapping, Sequence
from typing import Protocol

import numpy as np
import torch

from gauntlet.evaluate import Evaluator, UpdateError, scale_update
from gauntlet.filters import copy_verdicts, sync_score
from gauntlet.records import EvalResult, FilterResult, WindowEvals
from neurons.node import WindowContext
from neurons.training import FP32, TrainSettings
from protocol.codec import EncodedTensor, decode
from protocol.codec_aggregate import clip_factors, update_norm
from protocol.data import DatasetError, PageStore, assign, random_samples
from protocol.gather import NOT_PRESENT, NOT_TIMELY, Fetched, FetchOutcome
from protocol.hparams import HParams
from protocol.sample import split_sample

log = logging.getLogger(__name__)
STALENESS_CAP = 20  # windows; a never-evaluated uid counts as this stale
Encoded = Mapping[str, EncodedTensor]


class EvalBackend(Protocol):
    """Where stage 2's forward passes run: `LocalBackend` (one process) or, under torchrun with --fsdp,
    `neurons.sharded_eval` (each rank its rows of θ). Same arguments, same arithmetic, same results."""

    def begin(self, random_batches: list[torch.Tensor], updates: Mapping[Hashable, tuple[Encoded, float]]) -> None:
        """A window: its random batches and every eligible miner's encoded update with its clip factor."""

    def reference(self, step: float) -> float | None:
        """The loss score of the mean of the window's clipped updates (`Evaluator.reference_score`)."""

    def evaluate(self, uid: Hashable, assigned: list[torch.Tensor], step: float) -> EvalResult:
        """`Evaluator.evaluate` of one miner's clipped update (UpdateError if it cannot be applied)."""


def _rng(window_seed: bytes, secret: bytes, purpose: str) -> np.random.Generator:
    digest = hashlib.blake2b(window_seed + secret + purpose.encode(), digest_size=16).digest()
    return np.random.default_rng(int.from_bytes(digest, "little"))


def evaluation_order(eligible: list[int], budget: int, window_seed: bytes, secret: bytes,
                     staleness: Mapping[int, int] | None = None) -> list[int]:
    """Which eligible uids to evaluate this window, in order: a seeded draw no miner can predict.

    With `staleness` (windows since a uid was last evaluated), uids are drawn without replacement
    with probability ∝ staleness², so when the budget (count or time) covers only a few miners per
    window, every miner is still evaluated about as often, yet none knows when.
    """
    ordered = sorted(eligible)
    if not ordered:
        return []
    rng = _rng(window_seed, secret, "order")
    if staleness is None:
        order = rng.permutation(ordered)
    else:
        p = np.array([max(1, staleness.get(u, STALENESS_CAP)) for u in ordered], dtype=np.float64) ** 2
        order = rng.choice(ordered, size=len(ordered), replace=False, p=p / p.sum())
    return [int(u) for u in order[:budget]]


def _batches(samples: torch.Tensor, batch: int) -> list[torch.Tensor]:
    return [samples[i : i + batch] for i in range(0, len(samples), batch)]


class Scorer:
    """Scores one window's miners for one validator: its model, pages, hparams and local secret."""

    def __init__(self, model: torch.nn.Module, store: PageStore, hp: HParams, secret: bytes,
                 backend: EvalBackend | None = None, settings: TrainSettings = FP32):
        self.model = model
        self.store = store
        self.hp = hp
        self.secret = secret
        self.backend: EvalBackend = backend or LocalBackend(model, settings)  # a sharded validator swaps it

    def filter_window(
        self,
        miners: Mapping[int, str],
        fetched: Mapping[str, Fetched],
        first_seen: Mapping[str, int],
        own_sample: Mapping[str, torch.Tensor],
        positions: Mapping[str, torch.Tensor],
        reference_change: float | None,
    ) -> dict[int, FilterResult]:
        """Gauntlet stage 1 for every miner uid (uid → hotkey in `miners`).

        `first_seen` is the poll round in which the validator first saw each hotkey's shard (copy order).
        """
        hp = self.hp.gauntlet
        results: dict[int, FilterResult] = {}
        for uid, hotkey in miners.items():
            got = fetched.get(hotkey) or Fetched(hotkey, reason=FetchOutcome.MISSING)
            present = got.reason not in NOT_PRESENT
            result = FilterResult(
                uid=uid, hotkey=hotkey, present=present,
                first_seen=first_seen.get(hotkey),
                timely=present and got.reason not in NOT_TIMELY,
                reject_reason=got.reason if present and got.reason not in NOT_TIMELY else None,
            )
            if got.shard is not None:
                sample = split_sample(got.shard.debug_values, positions)
                result.sync = sync_score(own_sample, sample or {}, reference_change, hp)
            results[uid] = result
        eligible = {uid for uid, r in results.items() if r.eligible}
        if len(eligible) > 1:
            # The encoded tensors themselves: copy detection reads their packed indices slab by slab,
            # so no miner's positions are ever held as a whole int64 tensor (bounded stage-1 memory).
            index_sets = {uid: dict(fetched[miners[uid]].shard.tensors) for uid in eligible}
            times = {uid: results[uid].first_seen or 0 for uid in eligible}
            # beyond 16 miners the overlaps are read on a position sample only this validator can predict
            salt = int.from_bytes(hashlib.blake2b(self.secret + b"copy-sample", digest_size=8).digest(), "little")
            for uid, verdict in copy_verdicts(index_sets, times, hp, salt).items():
                results[uid].copy_verdict = verdict
        return results

    def evaluate_window(
        self,
        ctx: WindowContext,
        miners: Mapping[int, str],
        filters: Mapping[int, FilterResult],
        fetched: Mapping[str, Fetched],
        time_budget_s: float | None = None,
        last_evaluated: Mapping[int, int | None] | None = None,
    ) -> WindowEvals:
        """Gauntlet stage 2: evaluate eligible miners in a seeded order until the count or time budget runs out.

        Pages this validator cannot read (`DatasetError`: the dataset's bucket down past the request deadline,
        or a page that does not match the pinned manifest) are its own trouble, never the miner's: a miner
        whose assigned pages fail is not evaluated this window, and if the window's random pages fail no one
        is (stage 2 skipped; the weights come from the scores the state holds). Either way one warning line,
        and `WindowEvals.not_evaluated` gives the reason for each chosen miner left out."""
        hp, store, window = self.hp, self.store, ctx.window
        eligible = [uid for uid, f in filters.items() if f.eligible]
        if not eligible:
            return WindowEvals()
        staleness = None if last_evaluated is None else {
            uid: STALENESS_CAP if last is None else min(STALENESS_CAP, window - last)
            for uid, last in last_evaluated.items()
        }
        chosen = evaluation_order(eligible, hp.gauntlet.eval_miners_per_window, ctx.seed, self.secret, staleness)
        n_eval = hp.gauntlet.eval_batches * hp.inner.batch_size
        try:
            random_pages = store.pages(random_samples(ctx.seed + self.secret, n_eval, store.num_train))
        except DatasetError as exc:
            log.warning("window %d: stage 2 skipped, the window's random pages cannot be read: %s", window, exc)
            why = f"stage 2 skipped: the window's random dataset pages could not be read ({exc})"
            return WindowEvals(not_evaluated=dict.fromkeys(chosen, why))
        factors = clip_factors({uid: update_norm(fetched[miners[uid]].shard.tensors) for uid in eligible})
        backend = self.backend
        # every eligible update once per window (a sharded backend sends them to its ranks once)
        backend.begin(_batches(random_pages, hp.inner.batch_size),
                      {uid: (fetched[miners[uid]].shard.tensors, factors[uid]) for uid in eligible})
        step = hp.gauntlet.eval_step_scale * hp.outer.lr
        reference = backend.reference(step)
        results = WindowEvals()
        stop_at = None if time_budget_s is None else time.monotonic() + time_budget_s
        for uid in chosen:
            # at least one miner is tried (a page failure counts: a slow bucket must not hold stage 2 past its budget)
            if stop_at is not None and (results or results.not_evaluated) and time.monotonic() > stop_at:
                log.info("window %d: stage 2 time budget %.1fs spent after %d of %d miners",
                         window, time_budget_s, len(results) + len(results.not_evaluated), len(chosen))
                break
            hotkey = miners[uid]
            assigned = assign(hotkey, window, hp.data.seed, hp.samples_per_window, store.num_train)
            subset = _rng(ctx.seed, self.secret, f"assigned:{uid}").choice(
                assigned, size=min(n_eval, len(assigned)), replace=False)
            try:
                pages = store.pages(subset.tolist())
            except DatasetError as exc:
                log.warning("window %d: uid %d not evaluated, its assigned pages cannot be read: %s", window, uid, exc)
                results.not_evaluated[uid] = f"its assigned dataset pages could not be read ({exc})"
                continue
            try:
                results[uid] = backend.evaluate(uid, _batches(pages, hp.inner.batch_size), step)
            except UpdateError as exc:
                log.warning("uid %d: update unusable in evaluation: %s", uid, exc)
                continue
            results[uid].reference_score = reference
            results[uid].reference_count = len(eligible)
            verdict = filters[uid].copy_verdict
            results[uid].reference_twins = len(set(verdict.twins) & set(eligible)) if verdict is not None else 0
        return results


class LocalBackend:
    """Stage 2 on the whole model in this process (`gauntlet.evaluate.Evaluator`), fp32 or bf16 autocast.

    bf16 autocasts the forward passes only: θ, the applied update and its restoration stay float32
    (how much bf16 moves the scores: neurons/sharded_eval.py). Autocast's weight-cast cache is off: it
    keeps the bf16 copy of each weight for the whole autocast block, so the passes after θ − step·u
    would run on the weights from before it. `neurons.sharded_eval` is the FSDP2 twin."""

    def __init__(self, model: torch.nn.Module, settings: TrainSettings = FP32):
        self.model, self.settings = model, settings
        self.device = next(model.parameters()).device
        self.evaluator: Evaluator | None = None
        self.updates: dict[Hashable, tuple[Encoded, float]] = {}
        self.mean: dict[str, torch.Tensor] | None = None  # the window's reference update, once computed

    def _precision(self) -> contextlib.AbstractContextManager:
        if self.settings.precision != "bf16":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, cache_enabled=False)

    def begin(self, random_batches: list[torch.Tensor], updates: Mapping[Hashable, tuple[Encoded, float]]) -> None:
        self.evaluator, self.updates, self.mean = Evaluator(self.model, random_batches), dict(updates), None

    def reference(self, step: float) -> float | None:
        self.mean = mean_update(list(self.updates.values()), self.device)  # kept: each miner's memory control
        with self._precision():
            return self.evaluator.reference_score([self.mean], step)

    def evaluate(self, uid: Hashable, assigned: list[torch.Tensor], step: float) -> EvalResult:
        tensors, factor = self.updates[uid]
        update = scale_update({name: decode(enc, self.device) for name, enc in tensors.items()}, factor)
        with self._precision():
            return self.evaluator.evaluate(update, assigned, step, reference=self.mean)


def mean_update(updates: Sequence[tuple[Encoded, float]], device: torch.device) -> dict[str, torch.Tensor]:
    """The window's reference update: the mean of the eligible miners' clipped updates (docs/incentives.md).

    Summed one miner at a time, so it holds one decoded update besides the sum.
    """
    total: dict[str, torch.Tensor] = {}
    for tensors, factor in updates:
        for name, enc in tensors.items():
            u = decode(enc, device) * factor
            if name in total:
                total[name].add_(u)
            else:
                total[name] = u.clone()
    return {name: t / len(updates) for name, t in total.items()}
