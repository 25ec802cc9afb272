"""Gauntlet stage 2: does a miner's update lower the loss, and more on its own data than on random data?

For one miner: loss on its assigned samples and on the window's random samples, before and after
θ ← θ − step·update (step = eval_step_scale × outer lr, applied to the median-norm-clipped update);
the model is then restored bit-exactly by copying back the touched parameters (subtracting the
update again would leave rounding residue). Loss score = relative improvement on random data. The
memory control: the same assigned samples after θ ← θ − step·reference instead, the reference being
the window's mean clipped update; `EvalResult.memory_margin` turns it into how much more the update
helped its own samples than the other miners' updates help them (a miner that trained on what it
was assigned "remembers" it), and the binary indicator is +1 above a margin, else −1. Comparing two
updates on the same samples removes the sample-to-sample noise of comparing assigned with random
samples (docs/incentives.md measures both).

All miners of a window are evaluated against the SAME random batches, so their loss scores are
comparable and the random "before" loss is computed once per window (`Evaluator` caches it); the
assigned "before" loss is per miner (different samples). One miner then costs four passes over the
evaluation batches (assigned before/after/control, random after) instead of five.

Batch sizes: the validator passes `eval_batches` (hparams; 4 by default) batches of the inner
`batch_size` samples each, on both sides: the assigned ones drawn from the samples the miner trained
on, the random ones from the whole store. Equal sample counts on both sides give both relative
improvements the same noise, so the indicator compares like with like. With a step of 0.2 × the
update the change in loss is small, so the noise must be small too. Measured on the tiny test LM
(`tests/test_gauntlet_evaluate.py`: hidden 32, 8 sequences × 32 tokens per batch, 20 random
draws), the spread (σ) of an honest miner's loss score was 0.0019 with 1 batch, 0.0017 with 2,
0.0010 with 4 and 0.0008 with 8, against a 0.044 gap between its assigned and random relative
improvements and a 0.036 gap to a noise update: 4 batches keep the noise near 3 % of the signal at
3 × 4 forward batches per miner; more batches buy little.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from gauntlet.records import EvalResult

Update = Mapping[str, torch.Tensor]


class UpdateError(ValueError):
    """A decoded update that cannot be applied to the model (the reason is the message)."""


def check_update(model: torch.nn.Module, update: Update) -> str | None:
    """None if `update` can be applied to `model`, else why not (names, shapes, dtypes, finiteness)."""
    params = dict(model.named_parameters())
    for name, u in update.items():
        p = params.get(name)
        if p is None:
            return f"unknown parameter {name!r}"
        if not isinstance(u, torch.Tensor) or not u.is_floating_point():
            return f"{name}: update is not a floating-point tensor"
        if tuple(u.shape) != tuple(p.shape):
            return f"{name}: shape {tuple(u.shape)} != parameter shape {tuple(p.shape)}"
        if not bool(torch.isfinite(u).all()):
            return f"{name}: non-finite values"
    return None


def scale_update(update: Update, factor: float) -> dict[str, torch.Tensor]:
    """The update times `factor` (a clip factor min(1, median/norm); 1.0 returns the tensors as they are).

    The factor comes from `protocol.codec_aggregate.clip_factors` over the encoded norms, so a miner
    is evaluated with exactly the clipping its update gets in the aggregate.
    """
    if not math.isfinite(factor) or factor < 0:
        raise ValueError(f"scale factor must be finite and ≥ 0, got {factor}")
    return {k: v * factor if factor != 1.0 else v for k, v in update.items()}


def _check_batches(batches: Sequence[torch.Tensor], vocab: int | None) -> None:
    if not batches:
        raise ValueError("no evaluation batches")
    for b in batches:
        if b.dtype != torch.long or b.dim() != 2 or b.shape[1] < 2:
            raise ValueError(
                f"batches must be [batch, seq ≥ 2] int64 tensors, got {b.dtype} {tuple(b.shape)}"
            )
        if vocab is not None and (int(b.min()) < 0 or int(b.max()) >= vocab):
            raise ValueError(f"token ids must lie in [0, {vocab})")


@torch.no_grad()
def mean_loss(model: torch.nn.Module, batches: Sequence[torch.Tensor]) -> float:
    """Token-weighted mean next-token loss of a causal LM over the batches (model in eval mode)."""
    device = next(model.parameters()).device
    total, tokens = 0.0, 0
    for b in batches:
        n = b.shape[0] * (b.shape[1] - 1)
        loss = model(input_ids=b.to(device), labels=b.to(device)).loss
        total += float(loss.double()) * n
        tokens += n
    return total / tokens


class Evaluator:
    """Evaluates miners one after another against one model state and one set of random batches.

    Valid for one window: the model must not change between calls except through `evaluate`, which
    always restores it. Create a new Evaluator after the window's outer step.
    """

    def __init__(self, model: torch.nn.Module, random_batches: Sequence[torch.Tensor]):
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        self.vocab: int | None = getattr(emb, "num_embeddings", None)
        _check_batches(random_batches, self.vocab)
        self.model = model
        self.random_batches = list(random_batches)
        self._before_random: float | None = None

    @property
    def loss_before_random(self) -> float:
        if self._before_random is None:
            with _eval_mode(self.model):
                self._before_random = mean_loss(self.model, self.random_batches)
        return self._before_random

    @torch.no_grad()
    def evaluate(self, update: Update, assigned_batches: Sequence[torch.Tensor], step: float,
                 reference: Update | None = None) -> EvalResult:
        """Losses before/after θ ← θ − step·update on assigned and random data; model restored exactly.

        With `reference` (the window's mean clipped update), also the loss on the assigned batches
        after θ ← θ − step·reference: the memory control (`EvalResult.memory_margin`), one more pass.
        Raises UpdateError (before touching the model) if the update does not fit the model.
        """
        reason = check_update(self.model, update)
        if reason is not None:
            raise UpdateError(reason)
        _check_batches(assigned_batches, self.vocab)
        before_random = self.loss_before_random
        with _eval_mode(self.model):
            before_assigned = mean_loss(self.model, assigned_batches)
            after_assigned, after_random = self._stepped(update, step, [assigned_batches, self.random_batches])
            after_reference = None
            if reference is not None and check_update(self.model, reference) is None:
                (after_reference,) = self._stepped(reference, step, [assigned_batches])
        return EvalResult(
            loss_before_assigned=before_assigned,
            loss_after_assigned=after_assigned,
            loss_before_random=before_random,
            loss_after_random=after_random,
            step=step,
            loss_after_assigned_reference=after_reference,
        )

    @torch.no_grad()
    def _stepped(self, update: Update, step: float, batch_lists: Sequence[Sequence[torch.Tensor]]) -> list[float]:
        """Mean loss over each batch list with θ − step·update, then θ restored bit for bit (copied back)."""
        params = dict(self.model.named_parameters())
        saved = {name: params[name].detach().clone() for name in update}
        try:
            for name, u in update.items():
                p = params[name]
                p.sub_(u.to(device=p.device, dtype=p.dtype), alpha=step)
            return [mean_loss(self.model, batches) for batches in batch_lists]
        finally:
            for name, value in saved.items():
                params[name].copy_(value)

    @torch.no_grad()
    def reference_score(self, updates: Sequence[Update], step: float) -> float | None:
        """Loss score (relative improvement on the random batches) of the MEAN of `updates`.

        The window's reference: the mean of the eligible miners' clipped updates, applied with the
        same step as every miner. A miner's loss score divided by it is its relative score (≈ 1 for
        an average honest update, ≈ 0 for noise), comparable across windows. None without usable
        updates. One forward pass over the random batches; the model is restored bit-exactly.
        """
        usable = [u for u in updates if check_update(self.model, u) is None]
        if not usable:
            return None
        before = self.loss_before_random
        params, mean = dict(self.model.named_parameters()), {}
        for name in sorted({n for u in usable for n in u}):
            p = params[name]
            total = torch.zeros_like(p)
            for u in usable:
                if name in u:
                    total.add_(u[name].to(device=p.device, dtype=p.dtype))
            mean[name] = total / len(usable)
        with _eval_mode(self.model):
            (after,) = self._stepped(mean, step, [self.random_batches])
        if not (math.isfinite(before) and math.isfinite(after)) or before <= 0:
            return None
        return (before - after) / before


class _eval_mode:
    """Put the model in eval mode (no dropout) for a block, then restore its previous mode."""

    def __init__(self, model: torch.nn.Module):
        self.model, self.was_training = model, model.training

    def __enter__(self) -> None:
        self.model.eval()

    def __exit__(self, *exc: object) -> None:
        self.model.train(self.was_training)


def binary_moving_average(previous: float, indicator: int, alpha: float) -> float:
    """m ← (1 − α)·m + α·indicator, with indicator ∈ {−1, +1}."""
    if indicator not in (-1, 1):
        raise ValueError(f"indicator must be ±1, got {indicator}")
    return (1.0 - alpha) * previous + alpha * indicator
