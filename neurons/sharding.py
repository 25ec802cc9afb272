"""FSDP2 sharding for a miner under torchrun: parameters, gradients, AdamW and error feedback split by rows.

A data-parallel miner (`neurons.distributed`) holds the whole model, AdamW state and error feedback on
every rank, which caps it at what one GPU holds. Sharded (`shard_model`), the embeddings, each decoder
layer, the head and the root are `fully_shard`-ed: rank r holds rows [r·⌈d0/R⌉, …) of every parameter (FSDP2's Shard(0)),
and with it those rows' gradients (reduce-scattered in float32), AdamW moments and error feedback.
`--precision bf16` becomes FSDP2's `MixedPrecisionPolicy` (bf16 parameters for compute, float32
gradient reduction), the master weights stay float32, so θ's rule is unchanged.

Compression without gathering Δ: the SparseLoCo codec cuts a 2-D tensor into block_rows × block_cols
chunks (`protocol.codec.ChunkLayout`) and keeps the top-k of each chunk, so when a rank's rows are a
multiple of the block height ("aligned": d0 divisible by R and d0/R by block_rows) the rank's chunks
are exactly the whole tensor's chunks of its block rows, in order, and selecting on the rank's rows
selects exactly what the whole tensor would. Only the 2-bit table is per tensor: it is built from
all-reduced sums (`protocol.codec.quantize_shared`), so every rank codes against the same table.
Rank 0 then gathers the compressed pieces (in-chunk indices and codes, never Δ) and packs them into
the whole tensor's wire form. Tensors that are not aligned (1-D norms, rows not divisible by R or by
the block height) fall back to replication: their Δ is all-gathered and every rank encodes the whole
tensor with a replicated error-feedback buffer (the same bytes on every rank, so the copies never
diverge); they are the small tensors of real models (norm weights), so this costs little.

The outer step runs on each rank's own rows (`aggregate_rows`): the peers' encoded shards (compact)
are decoded only where they hit the rank's rows, with exactly `aggregate_encoded`'s per-element
arithmetic (float64 accumulate in sorted peer order, one divide, one cast), so θ after the step is
bit-identical to an unsharded node's (`sharded_digest` equals `protocol.model.param_digest`).

The miner (`crucible miner --fsdp` under torchrun): rank 0 restores or catches θ up on the whole
model, then every rank builds the model on the meta device, shards it and receives its rows from
rank 0, which frees its whole copy (`build_sharded_miner`, below); from then on rank 0 drives each
collective (train, digest, apply, save) and the other ranks follow in the same order
(`neurons.miner_ranks.follow`). Each rank saves its own AdamW and error-feedback rows every window and
resumes them after a restart (`neurons.local_state.save_sharded_state`; θ is caught up from the
network). Not yet here (said rather than pretended): a sharded miner that falls behind or out of
sync exits so that a restart catches it up (catch-up and recovery replay on the whole model); the
devnet adversaries' `make_update` hook is not called on the sharded path (honest miners only).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from neurons.distributed import DistContext
from neurons.training import InnerStats, TrainSettings, inner_train, make_inner_optimizer, prepare_model
from protocol.codec import ChunkLayout, Compressor, EncodedTensor, pack2, pack12
from protocol.codec_aggregate import apply_outer_step, clip_factors, update_norm
from protocol.hparams import HParams, SparseLoCoHParams
from protocol.sample import debug_positions, flat_sample


@dataclass(frozen=True)
class Slot:
    """Where this rank's rows of one parameter sit in the whole tensor, and how it is compressed."""

    shape: tuple[int, ...]  # the whole tensor's
    start: int  # first row held here
    rows: int  # rows held here (FSDP2's torch.chunk split; the last ranks may hold fewer or none)
    aligned: bool  # compress this rank's rows (True) or the all-gathered whole tensor (False)
    sharded: bool = True  # False: a parameter FSDP2 left whole on every rank

    @property
    def row_numel(self) -> int:
        return _prod(self.shape[1:])


def _prod(dims: tuple[int, ...]) -> int:
    out = 1
    for d in dims:
        out *= d
    return out


def local(p: torch.Tensor) -> torch.Tensor:
    """This rank's rows of a (possibly DTensor) parameter, as a plain tensor sharing its storage."""
    return p.to_local() if isinstance(p, DTensor) else p


def shard_model(model: torch.nn.Module, settings: TrainSettings) -> torch.nn.Module:
    """`fully_shard` the embeddings, every decoder layer, the head, then the root (in place); bf16 compute
    when settings ask."""
    policy = MixedPrecisionPolicy(
        param_dtype=torch.bfloat16 if settings.precision == "bf16" else None, reduce_dtype=torch.float32
    )
    inner = getattr(model, "model", None)
    # the embeddings and the head get groups of their own: in the root group they would stay gathered
    # (with their whole gradients and reduce-scatter buffers) from the forward to the end of backward
    head = getattr(model, "lm_head", None)
    if head is not None and getattr(inner, "embed_tokens", None) is not None and \
            head.weight is inner.embed_tokens.weight:
        head = None  # tied to the embeddings: one group holds the one tensor
    groups = [getattr(inner, "embed_tokens", None), *getattr(inner, "layers", []), head]
    for group in groups:
        if group is not None and any(True for _ in group.parameters()):
            fully_shard(group, mp_policy=policy)
    fully_shard(model, mp_policy=policy, reshard_after_forward=True)
    return model


def plan(model: torch.nn.Module, ctx: DistContext, hp: SparseLoCoHParams) -> dict[str, Slot]:
    """Every parameter's slot on this rank, in the model's parameter order."""
    slots: dict[str, Slot] = {}
    for name, p in model.named_parameters():
        shape = tuple(int(s) for s in p.shape)
        sharded = isinstance(p, DTensor)
        start = min(ctx.rank * -(-shape[0] // ctx.world), shape[0]) if sharded else 0
        rows = int(local(p).shape[0])
        slots[name] = Slot(shape, start, rows, sharded and row_aligned(shape, ctx.world, hp), sharded)
    return slots


def row_aligned(shape: tuple[int, ...], world: int, hp: SparseLoCoHParams) -> bool:
    """Whether `world` ranks' row shards of a tensor are whole chunk rows (compressed where they lie);
    if not, its Δ is all-gathered and its error feedback replicated whole on every rank (`bench.memory`)."""
    return (len(shape) >= 2 and shape[0] % world == 0
            and (shape[0] // world) % ChunkLayout.for_shape(shape, hp).block_rows == 0)


def _sum_all(t: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


@torch.no_grad()
def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """θ_w as this rank holds it (its rows), cloned: the start of the window's inner steps."""
    return {name: local(p).detach().clone() for name, p in model.named_parameters()}


@torch.no_grad()
def deltas(model: torch.nn.Module, theta_w: Mapping[str, torch.Tensor], slots: Mapping[str, Slot]
           ) -> dict[str, torch.Tensor]:
    """Δ = θ_w − θ per parameter: this rank's rows (aligned) or the all-gathered whole tensor (not)."""
    out: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        d = theta_w[name] - local(p).detach()
        out[name] = d if slots[name].aligned or not isinstance(p, DTensor) else _all_rows(d, slots[name])
    return out


def _all_rows(rows: torch.Tensor, slot: Slot) -> torch.Tensor:
    """All-gather a row-sharded tensor (uneven splits padded to ⌈d0/R⌉ rows for the collective)."""
    world = dist.get_world_size()
    per_rank = -(-slot.shape[0] // world)
    padded = rows.new_zeros((per_rank, *slot.shape[1:]))
    padded[: rows.shape[0]] = rows
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat(parts)[: slot.shape[0]]


@torch.no_grad()
def sample_rows(theta_w: Mapping[str, torch.Tensor], slots: Mapping[str, Slot],
                positions: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`protocol.sample.gather_sample` of the whole θ_w from row shards (a collective).

    Each rank fills the positions in its rows and leaves zeros elsewhere; the rows are disjoint, so
    the all-reduced sum is every value exactly (x + 0 = x), without gathering θ.
    """
    out: dict[str, torch.Tensor] = {}
    for name in sorted(positions):
        slot, pos = slots[name], positions[name].to(torch.int64)
        lo, n = slot.start * slot.row_numel, slot.rows * slot.row_numel
        values = torch.zeros(len(pos), dtype=torch.float32)
        owner = slot.sharded or not dist.is_initialized() or dist.get_rank() == 0  # replicated: rank 0 says
        mine = (pos >= lo) & (pos < lo + n) & owner
        values[mine] = theta_w[name].detach().reshape(-1)[(pos[mine] - lo).to(theta_w[name].device)].to(
            "cpu", torch.float32)
        out[name] = _sum_all(values) if dist.is_initialized() else values
    return out


class ShardedCompressor:
    """Error feedback of this rank's rows; `encode_all` returns the whole model's shard on rank 0."""

    def __init__(self, hp: SparseLoCoHParams, ctx: DistContext, slots: Mapping[str, Slot]):
        self.hp, self.ctx, self.slots = hp, ctx, dict(slots)
        self.inner = Compressor(hp)  # keyed by name: rows for aligned tensors, whole tensors otherwise

    @torch.no_grad()
    def encode_all(self, deltas: Mapping[str, torch.Tensor]) -> dict[str, EncodedTensor] | None:
        """Encode every parameter (a collective: every rank calls it with its `deltas`, same order)."""
        out: dict[str, EncodedTensor] = {}
        for name, slot in self.slots.items():
            if not slot.aligned:
                out[name] = self.inner.encode(name, deltas[name])  # the whole tensor, the same bytes everywhere
                continue
            piece = self.inner.encode(name, deltas[name], reduce=_sum_all)
            whole = self._gather(piece, slot)
            if whole is not None:
                out[name] = whole
        return out if self.ctx.is_main else None

    def _gather(self, piece: EncodedTensor, slot: Slot) -> EncodedTensor | None:
        idx = piece.indices().to(torch.int32).reshape(-1)
        codes = piece.code_values().to(torch.int32)
        payload = torch.cat([idx, codes])
        parts = [torch.empty_like(payload) for _ in range(self.ctx.world)] if self.ctx.is_main else None
        dist.gather(payload, parts, dst=0)
        if parts is None:
            return None
        n = idx.numel()
        all_idx = torch.cat([part[:n] for part in parts])
        all_codes = torch.cat([part[n:] for part in parts])
        layout = ChunkLayout.for_shape(slot.shape, self.hp)
        return EncodedTensor(pack12(all_idx), pack2(all_codes), piece.lookup.clone(), layout)


@torch.no_grad()
def aggregate_rows(
    shards: Mapping[str, Mapping[str, EncodedTensor]], slots: Mapping[str, Slot], clip_norm: float,
    norms: Mapping[str, float] | None = None, device: torch.device | str = "cpu",
) -> dict[str, torch.Tensor]:
    """This rank's rows of `aggregate_encoded(shards, norms=…, clip_norm=…)`, bit for bit.

    Same per-element arithmetic: each peer's float64 table·factor product added once per kept
    position (peers in sorted order), divided by the peer count, cast to float32.
    """
    peers = sorted(shards)
    if norms is None:
        norms = {peer: update_norm(shards[peer]) for peer in peers}
    factors = clip_factors({peer: norms[peer] for peer in peers}, clip_norm)
    out: dict[str, torch.Tensor] = {}
    for name, slot in slots.items():
        lo, n = slot.start * slot.row_numel, slot.rows * slot.row_numel
        acc = torch.zeros(n, dtype=torch.float64, device=device)
        for peer in peers:
            enc = shards[peer][name].to(device)
            pos = enc.positions().reshape(-1)
            mine = (pos >= lo) & (pos < lo + n)
            table = enc.lookup.to(torch.float64) * factors[peer]
            acc.index_add_(0, pos[mine] - lo, table[enc.code_values()][mine])
        out[name] = acc.div_(len(peers)).to(torch.float32).reshape(slot.rows, *slot.shape[1:])
    return out


@torch.no_grad()
def apply_rows(model: torch.nn.Module, rows: Mapping[str, torch.Tensor], lr: float) -> None:
    """θ ← θ − lr·aggregate on this rank's rows (`apply_outer_step`'s element-wise arithmetic)."""
    apply_outer_step({name: local(p) for name, p in model.named_parameters()}, rows, lr)


@torch.no_grad()
def full_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every whole parameter (a collective under FSDP2: every rank calls it), float32 on the CPU."""
    return {name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().to("cpu", torch.float32)
            for name, p in model.named_parameters()}


def sharded_digest(model: torch.nn.Module) -> str:
    """`protocol.model.param_digest` of the whole (sharded) model, on every rank (a collective).

    One whole tensor at a time (gathered in name order, hashed, dropped): a rank never holds the whole model."""
    h = hashlib.blake2b(digest_size=16)
    params = dict(model.named_parameters())
    for name in sorted(params):
        p = params[name]
        whole = (p.full_tensor() if isinstance(p, DTensor) else p).detach().to("cpu", torch.float32).contiguous()
        h.update(name.encode())
        h.update(whole.numpy())  # the buffer itself: the same bytes as param_digest's tobytes()
        del whole
    return h.hexdigest()


def sharded_context(ctx: DistContext) -> DistContext:
    return replace(ctx, sharded=True)  # keeps the control group (instructions over gloo)


class ShardedMiner:
    """One rank's sharded miner state (model rows, AdamW, error feedback) and its collective window steps.

    Every rank calls the same methods in the same order (rank 0 from `neurons.miner.Miner`, the
    others from `neurons.miner_ranks.follow` on rank 0's instructions): each is a collective.
    """

    def __init__(self, model: torch.nn.Module, hp: HParams, ctx: DistContext, settings: TrainSettings,
                 presharded: bool = False):
        # presharded: `model` is already `shard_model`-ed with its rows in place (`build_sharded_miner`)
        self.model, self.hp, self.ctx, self.settings = model if presharded else shard_model(model, settings), hp, \
            ctx, settings
        self.slots = plan(model, ctx, hp.sparseloco)
        self.optimizer = make_inner_optimizer(model, hp)  # AdamW over this rank's rows
        self.compressor = ShardedCompressor(hp.sparseloco, ctx, self.slots)
        self.device = local(next(model.parameters())).device

    def window(self, samples: torch.Tensor, window: int, seed: bytes
               ) -> tuple[dict[str, EncodedTensor] | None, torch.Tensor, InnerStats]:
        """Train the window, encode Δ: (the whole shard on rank 0, else None; θ_w's debug sample; stats)."""
        theta_w = snapshot(self.model)
        numels = {name: _prod(slot.shape) for name, slot in self.slots.items()}
        positions = debug_positions(seed, numels, self.hp.shard.debug_sample_size)
        debug = flat_sample(sample_rows(theta_w, self.slots, positions))
        stats = inner_train(self.model, self.optimizer, samples, self.hp, window, self.ctx, self.settings)
        update = deltas(self.model, theta_w, self.slots)
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                local(p).copy_(theta_w[name])  # the outer step starts from θ_w, like everyone else's
        del theta_w
        return self.compressor.encode_all(update), debug, stats

    def apply(self, shards: Mapping[str, Mapping[str, EncodedTensor]], clip_norm: float) -> None:
        """The window's outer step on this rank's rows (bit-identical to an unsharded node's)."""
        apply_rows(self.model, aggregate_rows(shards, self.slots, clip_norm, device=self.device), self.hp.outer.lr)

    def digest(self) -> str:
        return sharded_digest(self.model)


# --- each rank's shard without the whole model on every rank -------------------------------------
#
# Why: the first sharded miner built the whole float32 model on every rank, had rank 0 broadcast its
# restored θ (and its whole AdamW state) into each of them, and only then sharded. Every follower thus
# held the whole model, and `neurons.miner_ranks.follow` kept it alive for the run through its data-parallel
# optimizer; on a model that does not fit one device this cannot even start.
#
# Here only rank 0 holds the whole model: the one it restored or caught up on (θ must be the network's,
# bit for bit; θ_0 itself is `protocol.model.build_model`'s seeded CPU initialisation, which cannot be
# drawn row by row). Every rank, rank 0 included, builds the model on the meta device (no memory),
# `fully_shard`s it, allocates only its own rows (`to_empty`), and receives them from rank 0 tensor
# by tensor (`dist.scatter` of ⌈d0/R⌉-row pieces, FSDP2's Shard(0) split); buffers (rotary tables)
# are broadcast. Rank 0 frees each whole tensor as soon as its rows are sent, so its peak is the whole
# model plus one tensor, before training; the followers' is their shard. The result is the same θ as
# sharding the whole model in place (`sharded_digest` equals `param_digest` of the whole model).


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
