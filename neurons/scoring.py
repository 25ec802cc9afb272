"""The validator's glue between downloaded shards and the pure Gauntlet.

`stage1` turns each miner's fetch outcome (a verified shard, or the reason there is none) into a
`FilterResult`: presence, timeliness, wire rejections, the sync check of the debug sample against
the validator's own θ at the window's positions, and top-k index overlap between uploaders.
`stage2` evaluates as many eligible miners as the budget allows, in an order drawn from the window
seed and the validator's local secret, each update decoded and clipped to the window's median norm,
on a random subset of the miner's assigned samples and on the window's random samples.

Evaluation batch choice: `gauntlet.eval_batches` batches of `inner.batch_size` samples on each side.
For the tiny preset that is 2 × 8 × 128 = 2,048 tokens per side: measured spread of the loss score
over random draws is an order of magnitude below the gap between honest and noise updates, and the
whole evaluation stays inside a devnet window (see gauntlet/evaluate.py for the measurements).
"""

from __future__ import annotations

import hashlib
import logging
import statistics
import time
from collections.abc import Mapping

import numpy as np
import torch

from gauntlet.evaluate import Evaluator, UpdateError, clip_update
from gauntlet.filters import copy_verdicts, split_sample, sync_score, to_posix
from gauntlet.records import EvalResult, FilterResult
from protocol.codec_aggregate import aggregate_encoded, update_norm
from protocol.data import PageStore, assign, random_samples
from protocol.gather import Fetched
from protocol.hparams import HParams

log = logging.getLogger(__name__)
NOT_PRESENT = {"missing", "no_credentials", "unreachable"}
NOT_TIMELY = {"late", "early"}
STALENESS_CAP = 20  # windows; a never-evaluated uid counts as this stale


def stage1(
    miners: Mapping[int, str],
    fetched: Mapping[str, Fetched],
    own_sample: Mapping[str, torch.Tensor],
    positions: Mapping[str, torch.Tensor],
    reference_change: float | None,
    hp: HParams,
) -> dict[int, FilterResult]:
    results: dict[int, FilterResult] = {}
    for uid, hotkey in miners.items():
        got = fetched.get(hotkey) or Fetched(hotkey, reason="missing")
        present = got.reason not in NOT_PRESENT
        result = FilterResult(
            uid=uid, hotkey=hotkey, present=present,
            upload_time=to_posix(got.upload_time) if got.upload_time else None,
            timely=present and got.reason not in NOT_TIMELY,
            reject_reason=got.reason if present and got.reason not in NOT_TIMELY else None,
        )
        if got.shard is not None:
            sample = split_sample(got.shard.debug_values, positions)
            if sample is None:
                result.sync = sync_score(own_sample, {}, reference_change, hp.gauntlet)
            else:
                result.sync = sync_score(own_sample, sample, reference_change, hp.gauntlet)
        results[uid] = result
    eligible = {uid for uid, r in results.items() if r.eligible}
    if len(eligible) > 1:
        index_sets = {
            uid: {name: enc.positions().reshape(-1) for name, enc in fetched[miners[uid]].shard.tensors.items()}
            for uid in eligible
        }
        times = {uid: results[uid].upload_time or 0.0 for uid in eligible}
        for uid, verdict in copy_verdicts(index_sets, times, hp.gauntlet).items():
            results[uid].copy_verdict = verdict
    return results


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


def stage2(
    model: torch.nn.Module,
    store: PageStore,
    hp: HParams,
    window: int,
    miners: Mapping[int, str],
    filters: Mapping[int, FilterResult],
    fetched: Mapping[str, Fetched],
    window_seed: bytes,
    secret: bytes,
    time_budget_s: float | None = None,
    last_evaluated: Mapping[int, int | None] | None = None,
) -> dict[int, EvalResult]:
    """Evaluate eligible miners in a seeded order until the count or the time budget runs out."""
    eligible = [uid for uid, f in filters.items() if f.eligible]
    if not eligible:
        return {}
    staleness = None if last_evaluated is None else {
        uid: STALENESS_CAP if last is None else min(STALENESS_CAP, window - last) for uid, last in last_evaluated.items()
    }
    chosen = evaluation_order(eligible, hp.gauntlet.eval_miners_per_window, window_seed, secret, staleness)
    norms = {uid: update_norm(fetched[miners[uid]].shard.tensors) for uid in eligible}
    clip_to = statistics.median(norms.values())
    n_eval = hp.gauntlet.eval_batches * hp.inner.batch_size
    random_pages = store.pages(random_samples(window_seed + secret, n_eval, store.num_train))
    evaluator = Evaluator(model, _batches(random_pages, hp.inner.batch_size))
    step = hp.gauntlet.eval_step_scale * hp.outer.lr
    device = next(model.parameters()).device
    results: dict[int, EvalResult] = {}
    stop_at = None if time_budget_s is None else time.monotonic() + time_budget_s
    for uid in chosen:
        if stop_at is not None and results and time.monotonic() > stop_at:
            log.info("window %d: stage 2 time budget %.1fs spent after %d of %d miners",
                     window, time_budget_s, len(results), len(chosen))
            break
        hotkey = miners[uid]
        shard = fetched[hotkey].shard
        update = aggregate_encoded({hotkey: shard.tensors}, device=device)  # one peer: its decoded update
        update = clip_update(update, clip_to)
        assigned = assign(hotkey, window, hp.data.seed, hp.samples_per_window, store.num_train)
        subset = _rng(window_seed, secret, f"assigned:{uid}").choice(assigned, size=min(n_eval, len(assigned)),
                                                                     replace=False)
        try:
            results[uid] = evaluator.evaluate(update, _batches(store.pages(subset.tolist()), hp.inner.batch_size), step)
        except UpdateError as exc:
            log.warning("uid %d: update unusable in evaluation: %s", uid, exc)
    return results
