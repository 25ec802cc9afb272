"""Materialise each FSDP2 rank's shard without the whole model on every rank.

Why: the first sharded miner built the whole float32 model on every rank, had rank 0 broadcast its
restored θ (and its whole AdamW state) into each of them, and only then sharded. Every follower thus
held the whole model, and `neurons.miner.follow` kept it alive for the run through its data-parallel
optimizer; on a model that does not fit one device this cannot even start.

Here only rank 0 holds the whole model: the one it restored or caught up on (θ must be the network's,
bit for bit; θ_0 itself is `protocol.model.build_model`'s seeded CPU initialisation, which cannot be
drawn row by row). Every rank, rank 0 included, builds the model on the meta device (no memory),
`fully_shard`s it, allocates only its own rows (`to_empty`), and receives them from rank 0 tensor
by tensor (`dist.scatter` of ⌈d0/R⌉-row pieces, FSDP2's Shard(0) split); buffers (rotary tables)
are broadcast. Rank 0 frees each whole tensor as soon as its rows are sent, so its peak is the whole
model plus one tensor, before training; the followers' is their shard. The result is the same θ as
sharding the whole model in place (`sharded_digest` equals `param_digest` of the whole model).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from neurons.distributed import DistContext
from neurons.sharding import ShardedMiner, local, shard_model
from neurons.training import TrainSettings, prepare_model
from protocol.hparams import HParams


def meta_model(hp: HParams) -> torch.nn.Module:
    """The network's model on the meta device: names, shapes and float32 dtypes, no storage."""
    from transformers import LlamaForCausalLM

    from protocol.model import llama_config

    with torch.device("meta"):
        model = LlamaForCausalLM(llama_config(hp))
    return model.to(dtype=torch.float32)


@torch.no_grad()
def scatter_rows(sharded: torch.nn.Module, full: torch.nn.Module | None, ctx: DistContext) -> None:
    """Fill every rank's rows of `sharded` from rank 0's whole `full` (a collective; `full` only on rank 0).

    Rank 0's whole tensors are released as they are sent (their `.data` is emptied), so `full` is
    spent afterwards: the caller drops it."""
    whole = dict(full.named_parameters()) if full is not None else {}
    for name, p in sharded.named_parameters():
        mine = local(p)
        rows = -(-p.shape[0] // ctx.world)
        buf = torch.empty((rows, *p.shape[1:]), dtype=mine.dtype, device=mine.device)
        pieces = None
        if ctx.is_main:
            src = whole[name].detach()
            pieces = []
            for r in range(ctx.world):
                piece = torch.zeros_like(buf)
                part = src[r * rows : (r + 1) * rows]
                piece[: part.shape[0]] = part
                pieces.append(piece)
            whole[name].data = torch.empty(0, dtype=src.dtype, device=src.device)  # spent: free it now
            del src
        dist.scatter(buf, pieces, src=0)
        mine.copy_(buf[: mine.shape[0]])
    for name, b in sharded.named_buffers():
        if ctx.is_main:
            b.copy_(dict(full.named_buffers())[name])
        dist.broadcast(b, src=0)


def build_sharded_miner(full: torch.nn.Module | None, hp: HParams, ctx: DistContext, settings: TrainSettings,
                        device: torch.device | str) -> ShardedMiner:
    """Every rank's `ShardedMiner` from rank 0's whole model (a collective; `full` is None on the others).

    Rank 0's `full` is spent (its tensors emptied): replace every reference to it with the result's model."""
    model = prepare_model(meta_model(hp), settings)
    shard_model(model, settings)
    model.to_empty(device=device)
    scatter_rows(model, full, ctx)
    return ShardedMiner(model, hp, ctx, settings, presharded=True)
