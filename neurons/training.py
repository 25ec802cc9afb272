"""The inner loop: H steps of AdamW on a miner's samples, and held-out loss.

Shared by the miner (one call per window), the local training demo and the convergence benchmark.
The AdamW state lives across windows (the miner saves it with its error feedback), and the learning
rate follows the hparams schedule: linear warm-up over `inner.warmup_windows` windows, then constant.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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
) -> InnerStats:
    """Run inner steps over `samples` [n, seq_len] in batches of `inner.batch_size`, in order.

    Under `dist` (torchrun), each rank trains on its rows of every batch and gradients are averaged
    across ranks, so the step equals a single process's on the whole batch.
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
        loss = model(input_ids=ids, labels=ids).loss
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"inner loss is not finite at step {start // batch}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        dist.average_gradients(model, len(ids), len(full))
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), hp.inner.grad_clip)
        optimizer.step()
        stats.losses.append(dist.average_scalar(loss.item(), len(ids), len(full)))
        stats.grad_norms.append(float(norm))
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
