"""The inner loop: H steps of AdamW on a miner's samples, and held-out loss.

Shared by the miner (one call per window), the local training demo and the convergence benchmark.
The AdamW state lives across windows (the miner saves it with its error feedback), and the learning
rate follows the hparams schedule: linear warm-up over `inner.warmup_windows` windows, then constant.

How a node computes a step is its own business (`TrainSettings`, from `crucible miner` flags), as long
as the step is the network's: `inner.batch_size` samples per inner step is a network rule, while the
micro-batch (samples per forward/backward, gradients accumulated until the batch is done) and the
compute precision are chosen to fit the node's memory. Micro-batching changes only float summation
order; bf16 autocast changes the miner's own Δ a little (like any other GPU would), never θ: the
parameters, AdamW state, error feedback and the outer step stay float32, so every node's θ after the
outer step is still bit-identical (the aggregate is the same bytes for all of them).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Literal

import torch

from neurons.distributed import DistContext
from protocol.hparams import HParams


@dataclass
class InnerStats:
    losses: list[float]
    tokens: int
    grad_norms: list[float]

    @property
    def mean_loss(self) -> float:
        return sum(self.losses) / max(1, len(self.losses))


@dataclass(frozen=True)
class TrainSettings:
    """Node-local choices of how to compute the network's inner steps (none of them changes θ's rule).

    micro_batch: samples per forward/backward on this rank (None: the whole per-rank batch at once);
      gradients accumulate over the micro-batches of an inner step, weighted by their rows, so the
      step is the batch's mean-loss step whatever the micro-batch.
    precision: "fp32", or "bf16" (autocast compute, float32 master weights, gradients and AdamW state;
      under FSDP2 sharding the MixedPrecisionPolicy does the same).
    checkpointing: recompute each decoder layer's activations in the backward pass (less memory).
    compile: `torch.compile` the model once (faster on GPUs; off by default, slow to start on CPU).
    """

    micro_batch: int | None = None
    precision: Literal["fp32", "bf16"] = "fp32"
    checkpointing: bool = False
    compile: bool = False

    def __post_init__(self) -> None:
        if self.micro_batch is not None and self.micro_batch < 1:
            raise ValueError(f"micro_batch must be at least 1 (got {self.micro_batch})")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be fp32 or bf16 (got {self.precision!r})")

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        """bf16 autocast for the forward pass, or nothing (fp32; or FSDP2's policy casts already)."""
        if self.precision == "bf16":
            return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()


FP32 = TrainSettings()


def prepare_model(model: torch.nn.Module, settings: TrainSettings) -> torch.nn.Module:
    """Apply the node options that change how the model runs, not what it is (in place where possible)."""
    if settings.checkpointing and hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if settings.compile:
        model.compile()  # in place: parameters and state_dict names are unchanged
    return model


def make_inner_optimizer(model: torch.nn.Module, hp: HParams) -> torch.optim.AdamW:
    inner = hp.inner
    return torch.optim.AdamW(
        model.parameters(), lr=inner.lr, betas=(inner.beta1, inner.beta2),
        weight_decay=inner.weight_decay, foreach=True,
    )


def inner_lr(hp: HParams, window: int) -> float:
    if hp.inner.warmup_windows == 0:
        return hp.inner.lr
    return hp.inner.lr * min(1.0, (window + 1) / hp.inner.warmup_windows)


def inner_train(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    samples: torch.Tensor,
    hp: HParams,
    window: int = 0,
    dist: DistContext | None = None,
    settings: TrainSettings = FP32,
) -> InnerStats:
    """Run inner steps over `samples` [n, seq_len] in batches of `inner.batch_size`, in order.

    Under `dist` (torchrun), each rank trains on its rows of every batch and gradients are averaged
    across ranks (or reduce-scattered, when the model is FSDP2-sharded), so the step equals a single
    process's on the whole batch. Each rank's rows go through in micro-batches of
    `settings.micro_batch`: micro-batch i's mean loss is weighted by rows_i / rows before its
    backward, so the accumulated gradient is that of the rank's mean loss (every sample has the same
    number of predicted tokens). With one micro-batch (the default) nothing is scaled: the fp32 step
    is bit-for-bit the unaccumulated one.
    """
    dist = dist or DistContext()
    device = next(model.parameters()).device
    for group in optimizer.param_groups:
        group["lr"] = inner_lr(hp, window)
    model.train()
    stats = InnerStats(losses=[], tokens=0, grad_norms=[])
    batch = hp.inner.batch_size
    for start in range(0, len(samples), batch):
        full = samples[start : start + batch]
        ids = dist.shard(full).to(device, non_blocking=True)
        micro = settings.micro_batch or len(ids)
        scale = dist.loss_scale(len(ids), len(full))
        optimizer.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for first in range(0, max(1, len(ids)), micro):
            part = ids[first : first + micro]
            with settings.autocast(device) if not dist.sharded else contextlib.nullcontext():  # FSDP2 casts
                loss = model(input_ids=part, labels=part).loss
            value = loss.item()
            if not math.isfinite(value):
                raise FloatingPointError(f"inner loss is not finite at step {start // batch}")
            weight = scale * len(part) / len(ids)
            (loss if weight == 1.0 else loss * weight).backward()
            loss_sum += value * len(part) / len(ids)
        dist.average_gradients(model, len(ids), len(full))
        norm = dist.clip_grad_norm(model, hp.inner.grad_clip)
        optimizer.step()
        stats.losses.append(dist.average_scalar(loss_sum, len(ids), len(full)))
        stats.grad_norms.append(norm)
        stats.tokens += full.numel()
    return stats


@torch.no_grad()
def mean_loss(model: torch.nn.Module, samples: torch.Tensor, batch_size: int = 16) -> float:
    """Token-weighted mean next-token loss over `samples` (eval mode, no grad)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(samples), batch_size):
        ids = samples[start : start + batch_size].to(device)
        n = ids.numel() - ids.shape[0]  # predicted tokens: all but the first of each row
        total += model(input_ids=ids, labels=ids).loss.item() * n
        count += n
    model.train(was_training)
    return total / max(1, count)
