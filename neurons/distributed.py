"""Multi-GPU miners: data-parallel inner steps under `torchrun`, one voice on chain and bucket.

Under `torchrun --nproc_per_node N crucible miner ...` every rank holds the same θ and AdamW state.
Each inner step's batch is split across ranks (rank r takes rows r, r+N, ...) and gradients are
averaged with an all-reduce before clipping, so N ranks compute exactly the step one process would
on the whole batch (up to float summation order). Only rank 0 talks to the chain and the buckets: it
tells the other ranks what to train on (`broadcast_work`), and after its outer step it broadcasts θ
(`broadcast_params`) so every rank starts the next window from the same model. NCCL on GPUs, gloo
on CPUs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

# Longer than any window of any preset (72b: 125 blocks × 12 s = 25 min) with room for a catch-up.
CONTROL_TIMEOUT = timedelta(hours=6)


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    sharded: bool = False  # the model is FSDP2-sharded (`neurons.sharding`): FSDP reduce-scatters the gradients
    # gloo group for rank 0's instructions: followers wait in it for a whole window (upload, deadline,
    # record), far past NCCL's 10-minute watchdog, so instructions never go over NCCL (None: one process)
    control: Any = field(default=None, compare=False, repr=False)

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a batch."""
        return batch[self.rank :: self.world] if self.active else batch

    def loss_scale(self, rows: int, total_rows: int) -> float:
        """Factor on this rank's mean loss before backward: FSDP2 averages gradients over the ranks, so
        a rank with rows/total of the batch scales by world·rows/total (1.0 when the rows split evenly)."""
        if not (self.active and self.sharded):
            return 1.0
        return self.world * rows / total_rows

    def average_gradients(self, model: torch.nn.Module, rows: int, total_rows: int) -> None:
        """Turn this rank's mean-loss gradients into the gradients of the whole batch's mean loss."""
        if not self.active or self.sharded:  # sharded: FSDP2's reduce-scatter already did (see loss_scale)
            return
        for p in model.parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            p.grad.mul_(rows / total_rows)
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)

    def clip_grad_norm(self, model: torch.nn.Module, max_norm: float) -> float:
        """Clip the global gradient norm (over all shards when sharded); returns the norm before clipping."""
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        if hasattr(norm, "full_tensor"):  # a DTensor under FSDP2
            norm = norm.full_tensor()
        return float(norm)

    def average_scalar(self, value: float, rows: int, total_rows: int) -> float:
        if not self.active:
            return value
        t = torch.tensor([value * rows / total_rows], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return float(t.item())


def init_distributed() -> DistContext:
    """Join the process group torchrun set up (RANK/WORLD_SIZE in the environment), if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    return DistContext(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local_rank, control=control)


def broadcast_work(ctx: DistContext, message: dict | None) -> dict:
    """Rank 0 sends the next instruction ({"op": "train", "window", "samples"} / "sync" / "stop").

    `broadcast_object_list` pickles: fine between the ranks of one operator's own process group, never
    for anything that came from a bucket (those are raw token pages, already checked by the store)."""
    box = [message if ctx.is_main else None]
    dist.broadcast_object_list(box, src=0, group=ctx.control)
    return box[0]


@torch.no_grad()
def broadcast_params(ctx: DistContext, model: torch.nn.Module) -> None:
    for p in model.parameters():
        dist.broadcast(p.data, src=0)
