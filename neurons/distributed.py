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
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a batch."""
        return batch[self.rank :: self.world] if self.active else batch

    def average_gradients(self, model: torch.nn.Module, rows: int, total_rows: int) -> None:
        """Turn this rank's mean-loss gradients into the gradients of the whole batch's mean loss."""
        if not self.active:
            return
        for p in model.parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            p.grad.mul_(rows / total_rows)
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)

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
    return DistContext(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local_rank)


def broadcast_work(ctx: DistContext, message: dict | None) -> dict:
    """Rank 0 sends the next instruction ({"op": "train", "window", "indices"} / {"op": "stop"})."""
    box = [message if ctx.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@torch.no_grad()
def broadcast_params(ctx: DistContext, model: torch.nn.Module) -> None:
    for p in model.parameters():
        dist.broadcast(p.data, src=0)
