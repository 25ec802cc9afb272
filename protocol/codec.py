"""SparseLoCo compression: error feedback, chunked top-k, 2-bit quantisation and bit packing.

A miner's pseudo-gradient Δ is folded into its error-feedback buffer e ← β·e + Δ; each parameter is
cut into chunks (64×64 blocks of a 2-D tensor, runs of 4096 of a 1-D one; a size that does not
divide uses its largest divisor below the target, like the Templar anchor); the k largest-magnitude
entries of every chunk are kept, their values quantised to 2 bits against a per-tensor 4-entry table
of bin centroids (bins split mean ± 6σ into four equal parts), their in-chunk indices packed 12 bits
each (two in three bytes) and the codes four to a byte. What was sent leaves the buffer:
e ← e − decode(encoded). Every knob is a field of `SparseLoCoHParams`.

Everything is vectorised over chunks (the only Python loop is over parameters) and runs on whatever
device the tensors live on. Encoded indices are sorted ascending inside each chunk, so a shard has
one canonical form and the validator can check uniqueness with one comparison.

Aggregation across peers and the outer step live in `protocol.codec_aggregate`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from protocol.hparams import SparseLoCoHParams


@functools.lru_cache(maxsize=4096)
def largest_divisor_at_most(n: int, limit: int) -> int:
    """The largest divisor of n that is ≤ limit (1 for a prime larger than limit)."""
    for d in range(min(n, limit), 0, -1):
        if n % d == 0:
            return d
    raise ValueError(f"no divisor of {n} ≤ {limit}")


@dataclass(frozen=True)
class ChunkLayout:
    """How one parameter is cut into chunks: the tensor seen as a (rows, cols) matrix of blocks.

    A 1-D tensor is one row; a tensor of 3+ dims is (shape[0], rest). Chunk c covers block row
    c // grid_cols and block column c % grid_cols; in-chunk index i is (i // block_cols, i % block_cols).
    """

    shape: tuple[int, ...]
    rows: int
    cols: int
    block_rows: int
    block_cols: int
    k: int
    levels: int

    @classmethod
    def for_shape(cls, shape: tuple[int, ...] | torch.Size, hp: SparseLoCoHParams) -> ChunkLayout:
        dims = tuple(int(s) for s in shape)
        numel = math.prod(dims)
        if numel < 1:
            raise ValueError(f"cannot chunk an empty tensor of shape {dims}")
        if len(dims) >= 2:
            rows, cols = dims[0], numel // dims[0]
            block_rows = largest_divisor_at_most(rows, hp.chunk_2d)
            block_cols = largest_divisor_at_most(cols, hp.chunk_2d)
        else:
            rows, cols = 1, numel
            block_rows, block_cols = 1, largest_divisor_at_most(numel, hp.chunk_1d)
        k = min(hp.topk, block_rows * block_cols)
        return cls(dims, rows, cols, block_rows, block_cols, k, 1 << hp.quant_bits)

    @property
    def numel(self) -> int:
        return self.rows * self.cols

    @property
    def chunk_size(self) -> int:
        return self.block_rows * self.block_cols

    @property
    def grid_cols(self) -> int:
        return self.cols // self.block_cols

    @property
    def n_chunks(self) -> int:
        return self.numel // self.chunk_size

    @property
    def n_values(self) -> int:
        return self.n_chunks * self.k

    @property
    def idx_bytes(self) -> int:
        return 3 * ((self.n_values + 1) // 2)

    @property
    def code_bytes(self) -> int:
        return (self.n_values + 3) // 4

    @property
    def wire_bytes(self) -> int:
        """Payload bytes on the wire: packed indices + packed codes + float32 lookup table."""
        return self.idx_bytes + self.code_bytes + 4 * self.levels

    def chunk(self, x: torch.Tensor) -> torch.Tensor:
        """View x as [n_chunks, chunk_size] (a copy when blocks are not contiguous)."""
        grid = x.reshape(self.rows // self.block_rows, self.block_rows, self.grid_cols, self.block_cols)
        return grid.transpose(1, 2).reshape(self.n_chunks, self.chunk_size)

    def flat_positions(self, idx: torch.Tensor) -> torch.Tensor:
        """In-chunk indices [n_chunks, k] → positions in the flattened tensor (int64, same shape).

        Two small per-layout tables (each chunk's first position, each in-chunk index's offset from
        it) turn this into one gather and one add.
        """
        base, offset = _position_tables(self, idx.device)
        return base[:, None] + offset[idx.long() if idx.dtype not in (torch.int32, torch.int64) else idx]


@functools.lru_cache(maxsize=256)
def _position_tables(layout: ChunkLayout, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The first flat position of every chunk [n_chunks] and the flat offset of every in-chunk index."""
    chunk_ids = torch.arange(layout.n_chunks, device=device, dtype=torch.int64)
    base = (chunk_ids // layout.grid_cols) * (layout.block_rows * layout.cols) + (
        chunk_ids % layout.grid_cols
    ) * layout.block_cols
    i = torch.arange(layout.chunk_size, device=device, dtype=torch.int64)
    return base, (i // layout.block_cols) * layout.cols + i % layout.block_cols


# ---- bit packing ---------------------------------------------------------------------------------


def pack12(values: torch.Tensor) -> torch.Tensor:
    """Pack integers in [0, 4096) two per three bytes (uint8); an odd count is padded with a 0."""
    v = values.reshape(-1).to(torch.int32)
    if v.numel() % 2:
        v = torch.cat([v, v.new_zeros(1)])
    a, b = v[0::2], v[1::2]
    packed = torch.stack([a & 0xFF, (a >> 8) | ((b & 0xF) << 4), b >> 4], dim=1)
    return packed.to(torch.uint8).reshape(-1)


def unpack12(data: torch.Tensor, n: int, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """Inverse of pack12: the first n 12-bit values of a uint8 buffer whose length is a multiple of 3.

    Computed in int32 (half the memory traffic of int64) and returned as `dtype`.
    """
    t = data.reshape(-1, 3).to(torch.int32)
    out = torch.empty(t.shape[0], 2, dtype=torch.int32, device=data.device)
    torch.bitwise_or(t[:, 0], (t[:, 1] & 0xF) << 8, out=out[:, 0])
    torch.bitwise_or(t[:, 1] >> 4, t[:, 2] << 4, out=out[:, 1])
    return out.reshape(-1)[:n].to(dtype)


def pack2(codes: torch.Tensor) -> torch.Tensor:
    """Pack 2-bit codes four per byte, first code in the low bits; the tail is padded with 0."""
    c = codes.reshape(-1).to(torch.uint8)
    pad = (-c.numel()) % 4
    if pad:
        c = torch.cat([c, c.new_zeros(pad)])
    c = c.reshape(-1, 4)
    return c[:, 0] | (c[:, 1] << 2) | (c[:, 2] << 4) | (c[:, 3] << 6)


def unpack2(data: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of pack2: the first n codes (uint8 in [0, 4))."""
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=data.device)
    return ((data.reshape(-1, 1) >> shifts) & 3).reshape(-1)[:n]


# ---- quantisation ------------------------------------------------------------------------------


def quantize(values: torch.Tensor, levels: int, range_sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (uint8) and the float32 lookup table of bin centroids for one tensor's kept values.

    Bins split [mean − r·σ, mean + r·σ] into `levels` equal parts, values outside fall in the end
    bins; each code decodes to the mean of the values in its bin (an empty bin to its centre).
    Statistics are taken in float64 with fixed-order reductions, so encoding is reproducible.
    """
    v = values.reshape(-1).to(torch.float64)
    mean = v.mean()
    std = v.std(correction=0)
    lo = mean - range_sigma * std
    width = (2 * range_sigma * std / levels).clamp_min(torch.finfo(torch.float64).tiny)
    codes = ((v - lo) / width).floor_().clamp_(0, levels - 1).to(torch.uint8)
    sums, counts = [], []
    for level in range(levels):
        hit = codes == level
        sums.append(torch.where(hit, v, 0.0).sum())
        counts.append(hit.sum())
    sum_t, count_t = torch.stack(sums), torch.stack(counts)
    centres = lo + (torch.arange(levels, device=v.device, dtype=torch.float64) + 0.5) * width
    lookup = torch.where(count_t > 0, sum_t / count_t.clamp_min(1), centres)
    return codes, lookup.to(torch.float32)


Reduce = Callable[[torch.Tensor], torch.Tensor]
"""Sums a float64 vector over every holder of a tensor's pieces (identity for a whole tensor)."""


def quantize_shared(
    values: torch.Tensor, levels: int, range_sigma: float, reduce: Reduce
) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize` for a tensor whose kept values are split across processes (FSDP2 row shards).

    Every statistic the table needs is a sum, so each holder computes its local sums and `reduce`
    adds them up (an all-reduce): count and Σv give the mean, Σ(v − mean)² the standard deviation,
    and the per-bin Σv and counts the centroids. Every holder builds the same table from the same
    reduced sums and codes its own values against it. The statistics are the same as `quantize`'s up
    to float64 summation order (a table entry may differ in its last bits, which can move a value
    lying exactly on a bin edge); `quantize` itself stays the single-process rule.
    """
    v = values.reshape(-1).to(torch.float64)
    first = reduce(torch.stack([v.new_tensor(float(v.numel())), v.sum()]))
    count = first[0].clamp_min(1)
    mean = first[1] / count
    std = (reduce(((v - mean) ** 2).sum().reshape(1))[0] / count).sqrt()
    lo = mean - range_sigma * std
    width = (2 * range_sigma * std / levels).clamp_min(torch.finfo(torch.float64).tiny)
    codes = ((v - lo) / width).floor_().clamp_(0, levels - 1).to(torch.uint8)
    hit = [codes == level for level in range(levels)]
    bins = reduce(torch.stack([torch.where(h, v, 0.0).sum() for h in hit] + [h.sum().to(v.dtype) for h in hit]))
    sum_t, count_t = bins[:levels], bins[levels:]
    centres = lo + (torch.arange(levels, device=v.device, dtype=torch.float64) + 0.5) * width
    lookup = torch.where(count_t > 0, sum_t / count_t.clamp_min(1), centres)
    return codes, lookup.to(torch.float32)


# ---- encoded tensors -----------------------------------------------------------------------------


@dataclass(frozen=True)
class EncodedTensor:
    """One parameter's compressed update: what goes on the wire, plus the layout it was cut with."""

    idx: torch.Tensor  # uint8 [layout.idx_bytes]: 12-bit in-chunk indices, ascending per chunk
    codes: torch.Tensor  # uint8 [layout.code_bytes]: 2-bit codes, four per byte
    lookup: torch.Tensor  # float32 [layout.levels]: the value each code decodes to
    layout: ChunkLayout

    def indices(self) -> torch.Tensor:
        """In-chunk indices, int64 [n_chunks, k]."""
        lay = self.layout
        return unpack12(self.idx, lay.n_values).reshape(lay.n_chunks, lay.k)

    def code_values(self) -> torch.Tensor:
        """Codes as int64 [n_values]."""
        return unpack2(self.codes, self.layout.n_values).to(torch.int64)

    def values(self) -> torch.Tensor:
        """Dequantised kept values, float32 [n_chunks, k]."""
        return self.lookup[self.code_values()].reshape(self.layout.n_chunks, self.layout.k)

    def positions(self) -> torch.Tensor:
        """Kept positions in the flattened parameter, int64 [n_chunks, k]."""
        lay = self.layout
        return lay.flat_positions(unpack12(self.idx, lay.n_values, torch.int32).reshape(lay.n_chunks, lay.k))

    def sq_norm(self) -> float:
        """Squared L2 norm of the decoded tensor, in float64, bit-identical on every device.

        Counts per code are exact integers and the table entries float32, and Σ count·lookup² is
        summed on the host with `math.fsum`, so no device's reduction order enters. Assumes unique
        indices per chunk (the wire checks it).
        """
        counts = torch.bincount(self.code_values(), minlength=self.layout.levels).tolist()
        return math.fsum(c * v * v for c, v in zip(counts, self.lookup.tolist(), strict=True))

    @property
    def nbytes(self) -> int:
        return self.idx.numel() + self.codes.numel() + 4 * self.lookup.numel()

    def to(self, device: torch.device | str) -> EncodedTensor:
        return EncodedTensor(self.idx.to(device), self.codes.to(device), self.lookup.to(device), self.layout)


@torch.no_grad()
def _compress(
    x: torch.Tensor, layout: ChunkLayout, hp: SparseLoCoHParams, scratch: torch.Tensor | None = None,
    reduce: Reduce | None = None,
) -> tuple[EncodedTensor, torch.Tensor, torch.Tensor]:
    """Encoded tensor, kept flat positions and the residual there (kept value − sent value), float32.

    |x| is written block by block straight from x into `scratch` (float32, ≥ numel elements, reused
    across calls) or a fresh buffer, so x is never copied into chunks; the kept values are then read
    from x by flat position. The top-k input is the same |x| chunk matrix as a chunk copy's, so the
    selection is bit-identical to chunking x first. With `reduce`, x is one holder's rows of a
    sharded tensor and the table comes from the shared sums (`quantize_shared`).
    """
    if tuple(x.shape) != layout.shape:
        raise ValueError(f"tensor of shape {tuple(x.shape)} does not match layout {layout.shape}")
    xf = x if x.dtype == torch.float32 else x.to(torch.float32)
    n, cs = layout.n_chunks, layout.chunk_size
    if scratch is None or scratch.numel() < layout.numel or scratch.device != xf.device:
        scratch = torch.empty(layout.numel, dtype=torch.float32, device=xf.device)
    grid = xf.reshape(layout.rows // layout.block_rows, layout.block_rows, layout.grid_cols, layout.block_cols)
    mag = scratch[: layout.numel].view(grid.shape[0], grid.shape[2], grid.shape[1], grid.shape[3])
    torch.abs(grid.transpose(1, 2), out=mag)
    idx = mag.view(n, cs).topk(layout.k, dim=1, sorted=False).indices
    idx = idx.sort(dim=1).values
    positions = layout.flat_positions(idx).reshape(-1)
    kept = xf.reshape(-1)[positions]
    if reduce is None:
        codes, lookup = quantize(kept, layout.levels, hp.quant_range_sigma)
    else:
        codes, lookup = quantize_shared(kept, layout.levels, hp.quant_range_sigma, reduce)
    encoded = EncodedTensor(pack12(idx), pack2(codes), lookup, layout)
    return encoded, positions, kept - lookup[codes.to(torch.int64)]


def compress(x: torch.Tensor, layout: ChunkLayout, hp: SparseLoCoHParams) -> EncodedTensor:
    """Chunked top-k + 2-bit quantisation of x (no error feedback; see Compressor for that)."""
    return _compress(x, layout, hp)[0]


@torch.no_grad()
def decode(
    encoded: EncodedTensor,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dense tensor of the layout's shape: kept values at their positions, zeros elsewhere.

    With `out` (a contiguous tensor of the layout's numel, any shape, on the target device) the
    result is written there, zero-filled first, and returned as a view of it: one reused buffer per
    tensor instead of a fresh allocation (and its page faults) per decode.
    """
    enc = encoded if device is None else encoded.to(device)
    lay = enc.layout
    values = enc.lookup.to(dtype)[enc.code_values()]  # = values().to(dtype): the same per-element cast
    if out is None:
        flat = torch.zeros(lay.numel, dtype=dtype, device=enc.idx.device)
    else:
        if out.numel() != lay.numel or out.dtype != dtype or not out.is_contiguous():
            raise ValueError(f"decode: out must be a contiguous {dtype} tensor of {lay.numel} elements")
        flat = out.view(-1).zero_()
    flat[enc.positions().reshape(-1)] = values
    return flat.view(lay.shape)


class Compressor:
    """A miner's SparseLoCo state: one float32 error-feedback buffer per parameter.

    `encode(name, delta)` folds Δ into the buffer (e ← β·e + Δ), compresses it and subtracts what
    was sent (e ← e − decode(encoded)). The buffers live on Δ's device and persist across windows;
    save them with `state_dict()` / `save()`.
    """

    def __init__(self, hp: SparseLoCoHParams) -> None:
        self.hp = hp
        self._error: dict[str, torch.Tensor] = {}
        self._scratch: dict[torch.device, torch.Tensor] = {}  # one |x| buffer per device, grown to the largest tensor

    def _scratch_for(self, like: torch.Tensor) -> torch.Tensor:
        buf = self._scratch.get(like.device)
        if buf is None or buf.numel() < like.numel():
            buf = self._scratch[like.device] = torch.empty(like.numel(), dtype=torch.float32, device=like.device)
        return buf

    def layout(self, shape: tuple[int, ...] | torch.Size) -> ChunkLayout:
        return _layout_cached(tuple(int(s) for s in shape), self.hp)

    @torch.no_grad()
    def encode(self, name: str, delta: torch.Tensor, reduce: Reduce | None = None) -> EncodedTensor:
        """Fold Δ into e, compress e, keep the residual. With `reduce`, Δ is this holder's rows of a
        sharded tensor (`neurons.sharding`): the quantisation table comes from the shared sums."""
        error = self._error.get(name)
        if error is None:
            error = torch.empty(delta.shape, dtype=torch.float32, device=delta.device).copy_(delta)  # β·0 + Δ
        elif error.shape != delta.shape:
            raise ValueError(f"{name}: shape {tuple(delta.shape)} differs from its error buffer")
        else:
            error = error.to(delta.device)
            error.mul_(self.hp.error_decay).add_(delta.to(torch.float32))
        encoded, positions, residual = _compress(error, self.layout(delta.shape), self.hp, self._scratch_for(error),
                                                 reduce)
        # Finiteness without a pass of its own: torch.topk ranks NaN above +inf above every number, so a
        # chunk holding a non-finite entry of e keeps one, and a non-finite kept value makes the float64
        # mean, hence the bin edges, NaN: every value then falls in one bin and the others' centres are NaN,
        # so the table is non-finite. With `reduce` the table comes from shared sums, so every
        # holder of the tensor sees the same verdict and raises at the same tensor (no rank is left
        # waiting in a collective). The folded buffer is unusable then: it is dropped (error feedback of
        # this tensor restarts from zero), never kept poisoned.
        if not bool(torch.isfinite(encoded.lookup).all()):
            self._error.pop(name, None)
            raise ValueError(f"pseudo-gradient of {name} has non-finite values; refusing to encode "
                             "(its error-feedback buffer is reset)")
        self._error[name] = error
        error.view(-1)[positions] = residual  # e ← e − decode(encoded): only kept positions change
        return encoded

    def encode_all(self, deltas: Mapping[str, torch.Tensor]) -> dict[str, EncodedTensor]:
        return {name: self.encode(name, delta) for name, delta in deltas.items()}

    def error(self, name: str) -> torch.Tensor | None:
        return self._error.get(name)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self._error)

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        loaded: dict[str, torch.Tensor] = {}
        for name, tensor in state.items():
            if not tensor.is_floating_point() or not bool(torch.isfinite(tensor).all()):
                raise ValueError(f"error-feedback state for {name} is not a finite float tensor")
            loaded[name] = tensor.detach().to(torch.float32).contiguous().clone()
        self._error = loaded

    def save(self, path: str | Path) -> None:
        save_file({k: v.contiguous().cpu() for k, v in self._error.items()}, str(path))

    def load(self, path: str | Path, device: torch.device | str = "cpu") -> None:
        self.load_state_dict(load_file(str(path), device=str(device)))


@functools.lru_cache(maxsize=4096)
def _layout_cached(shape: tuple[int, ...], hp: SparseLoCoHParams) -> ChunkLayout:
    return ChunkLayout.for_shape(shape, hp)


def layouts_for(shapes: Mapping[str, tuple[int, ...] | torch.Size], hp: SparseLoCoHParams) -> dict[str, ChunkLayout]:
    """The chunk layout of every parameter of a model, by name."""
    return {name: _layout_cached(tuple(int(s) for s in shape), hp) for name, shape in shapes.items()}
