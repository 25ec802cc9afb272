"""SparseLoCo codec: chunk layouts, bit packing, top-k + quantisation round trip, error feedback."""

from __future__ import annotations

import math

import pytest
import torch

from protocol.codec import (
    ChunkLayout,
    Compressor,
    compress,
    decode,
    largest_divisor_at_most,
    layouts_for,
    pack2,
    pack12,
    quantize,
    unpack2,
    unpack12,
)
from protocol.hparams import SparseLoCoHParams, load_hparams

ANCHOR = SparseLoCoHParams()
SMALL = SparseLoCoHParams(chunk_2d=8, chunk_1d=16, topk=4)


def reference_topk_positions(x: torch.Tensor, lay: ChunkLayout) -> set[int]:
    """Flat positions of the k largest |x| of every chunk, by explicit loops (the slow, obvious way)."""
    x2 = x.reshape(lay.rows, lay.cols)
    kept: set[int] = set()
    for r0 in range(0, lay.rows, lay.block_rows):
        for c0 in range(0, lay.cols, lay.block_cols):
            block = x2[r0 : r0 + lay.block_rows, c0 : c0 + lay.block_cols]
            for i in block.abs().reshape(-1).topk(lay.k).indices.tolist():
                r, c = divmod(i, lay.block_cols)
                kept.add((r0 + r) * lay.cols + c0 + c)
    return kept


@pytest.mark.parametrize(
    ("shape", "hp", "blocks", "k"),
    [
        ((768, 2048), ANCHOR, (64, 64), 64),
        ((100, 30), ANCHOR, (50, 30), 64),  # largest divisors ≤ 64
        ((4099,), ANCHOR, (1, 1), 1),  # a prime above the 1-D target: chunks of one, k capped
        ((7,), ANCHOR, (1, 7), 7),  # smaller than a chunk: k capped at the chunk size
        ((768,), ANCHOR, (1, 768), 64),
        ((2, 3, 4), ANCHOR, (2, 12), 24),  # 3-D: (shape[0], rest)
        ((), ANCHOR, (1, 1), 1),
        ((24, 18), SMALL, (8, 6), 4),
    ],
)
def test_layout_follows_largest_divisor_rule(shape, hp, blocks, k):
    lay = ChunkLayout.for_shape(shape, hp)
    assert (lay.block_rows, lay.block_cols) == blocks
    assert lay.k == k
    assert lay.n_chunks * lay.chunk_size == math.prod(shape)
    assert lay.chunk_size <= 4096


def test_largest_divisor_and_empty_tensor():
    assert largest_divisor_at_most(32000, 64) == 64
    assert largest_divisor_at_most(688, 64) == 43
    assert largest_divisor_at_most(13, 64) == 13
    assert largest_divisor_at_most(4099, 4096) == 1
    with pytest.raises(ValueError):
        ChunkLayout.for_shape((0, 5), ANCHOR)


@pytest.mark.parametrize("n", [4096, 4095, 1, 2, 3])
def test_pack12_is_lossless_for_every_index(n):
    gen = torch.Generator().manual_seed(n)
    values = torch.arange(4096)[torch.randperm(4096, generator=gen)][:n] if n < 4096 else torch.arange(4096)
    packed = pack12(values)
    assert packed.dtype == torch.uint8 and packed.numel() == 3 * ((n + 1) // 2)
    assert torch.equal(unpack12(packed, n), values)
    if n == 4096:  # every index, in both slots of a pair
        assert torch.equal(unpack12(pack12(values.roll(1)), n), values.roll(1))


def test_pack2_is_lossless_for_every_code_and_length():
    for n in range(1, 13):
        for offset in range(4):
            codes = ((torch.arange(n) + offset) % 4).to(torch.uint8)
            packed = pack2(codes)
            assert packed.numel() == (n + 3) // 4
            assert torch.equal(unpack2(packed, n), codes)
    codes = torch.randint(0, 4, (1001,), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    assert torch.equal(unpack2(pack2(codes), 1001), codes)


SHAPES = [(64, 128), (100, 30), (24, 18), (33,), (7,), (4099,), (2, 3, 4), (1,), (65, 3)]


@pytest.mark.parametrize("hp", [ANCHOR, SMALL], ids=["anchor", "small"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_roundtrip_keeps_exactly_the_topk_of_every_chunk(shape, hp):
    gen = torch.Generator().manual_seed(hash(shape) % 1000)
    x = torch.randn(shape, generator=gen)
    lay = ChunkLayout.for_shape(shape, hp)
    enc = compress(x, lay, hp)
    assert enc.idx.numel() == lay.idx_bytes and enc.codes.numel() == lay.code_bytes
    idx = enc.indices()
    assert idx.shape == (lay.n_chunks, lay.k)
    assert bool((idx[:, 1:] > idx[:, :-1]).all()) and int(idx.max()) < lay.chunk_size
    kept = set(enc.positions().reshape(-1).tolist())
    assert kept == reference_topk_positions(x, lay)
    dense = decode(enc)
    assert dense.shape == x.shape and dense.dtype == torch.float32
    mask = torch.zeros(lay.numel, dtype=torch.bool)
    mask[sorted(kept)] = True
    assert not bool(dense.reshape(-1)[~mask].any())  # nothing outside the kept positions
    assert math.isclose(enc.sq_norm(), float(dense.double().square().sum()), rel_tol=1e-12)


def test_quantisation_uses_bin_centroids_and_stays_within_a_bin():
    gen = torch.Generator().manual_seed(3)
    values = torch.cat([torch.randn(2000, generator=gen), torch.tensor([40.0, -35.0])])  # two far outliers
    codes, lookup = quantize(values, levels=4, range_sigma=6.0)
    v = values.double()
    mean, std = float(v.mean()), float(v.std(correction=0))
    width = 2 * 6.0 * std / 4
    order = values.argsort()
    assert bool((codes[order][1:] >= codes[order][:-1]).all())  # codes are monotone in the value
    for level in range(4):
        hit = codes == level
        if hit.any():
            assert math.isclose(float(lookup[level]), float(v[hit].mean()), rel_tol=1e-6, abs_tol=1e-7)
        else:  # an empty bin decodes to its centre
            centre = mean - 6 * std + (level + 0.5) * width
            assert math.isclose(float(lookup[level]), centre, rel_tol=1e-6)
    decoded = lookup[codes.long()].double()
    inside = (v - mean).abs() <= 6 * std
    assert float((decoded - v)[inside].abs().max()) <= width
    assert lookup.dtype == torch.float32 and bool(torch.isfinite(lookup).all())


def test_constant_values_quantise_exactly():
    codes, lookup = quantize(torch.full((64,), 0.3), levels=4, range_sigma=6.0)
    assert torch.equal(lookup[codes.long()], torch.full((64,), 0.3))
    codes, lookup = quantize(torch.zeros(5), levels=4, range_sigma=6.0)
    assert bool((lookup[codes.long()] == 0).all())


def test_error_feedback_subtracts_what_was_sent_and_decays():
    hp = SparseLoCoHParams(chunk_2d=8, chunk_1d=16, topk=4, error_decay=0.9)
    comp = Compressor(hp)
    gen = torch.Generator().manual_seed(5)
    d1, d2 = torch.randn(32, 24, generator=gen), torch.randn(32, 24, generator=gen)
    enc1 = comp.encode("w", d1)
    e1 = comp.error("w").clone()
    assert torch.equal(e1, d1 - decode(enc1))
    enc2 = comp.encode("w", d2)
    assert torch.equal(comp.error("w"), e1.mul(0.9).add(d2) - decode(enc2))


def test_error_feedback_accumulates_what_was_not_sent():
    hp = SparseLoCoHParams(chunk_2d=8, chunk_1d=16, topk=2, error_decay=1.0)
    comp = Compressor(hp)
    gen = torch.Generator().manual_seed(6)
    total_in = torch.zeros(16, 16, dtype=torch.float64)
    total_sent = torch.zeros(16, 16, dtype=torch.float64)
    ever_sent = torch.zeros(16, 16, dtype=torch.bool)
    for _ in range(200):
        delta = torch.randn(16, 16, generator=gen) + 0.1  # a drift: every entry keeps growing until sent
        total_in += delta.double()
        sent = decode(comp.encode("w", delta))
        total_sent += sent.double()
        ever_sent |= sent != 0
    residual = comp.error("w").double()
    assert torch.allclose(total_sent + residual, total_in, atol=1e-4)  # nothing is lost, only delayed
    assert bool(ever_sent.all())  # every position eventually goes out, at k = 2 of 64 per window


def test_compressor_state_roundtrips_through_safetensors(tmp_path):
    comp = Compressor(SMALL)
    gen = torch.Generator().manual_seed(7)
    shapes = {"a": (16, 24), "b": (33,)}
    for _ in range(2):
        comp.encode_all({n: torch.randn(s, generator=gen) for n, s in shapes.items()})
    comp.save(tmp_path / "ef.safetensors")
    again = Compressor(SMALL)
    again.load(tmp_path / "ef.safetensors")
    nxt = {n: torch.randn(s, generator=gen) for n, s in shapes.items()}
    for name in shapes:
        a, b = comp.encode(name, nxt[name]), again.encode(name, nxt[name])
        assert torch.equal(a.idx, b.idx) and torch.equal(a.codes, b.codes) and torch.equal(a.lookup, b.lookup)
    with pytest.raises(ValueError):
        again.load_state_dict({"a": torch.tensor([float("nan")])})


def test_compressor_refuses_non_finite_and_shape_changes():
    comp = Compressor(SMALL)
    with pytest.raises(ValueError, match="non-finite"):
        comp.encode("w", torch.tensor([1.0, float("inf"), 0.0]))
    assert comp.error("w") is None  # the buffer was not poisoned
    comp.encode("w", torch.ones(3))
    with pytest.raises(ValueError):
        comp.encode("w", torch.ones(4))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("where", [0, 777, 128 * 192 - 1])
def test_a_single_non_finite_entry_anywhere_is_refused_and_resets_the_buffer(bad, where):
    """Finiteness is read from the kept values' table (no pass of its own): it must still see ONE bad entry
    in a chunk whose other entries are large, and leave no poisoned buffer behind."""
    comp = Compressor(ANCHOR)
    gen = torch.Generator().manual_seed(3)
    comp.encode("w", torch.randn(128, 192, generator=gen))
    delta = torch.randn(128, 192, generator=gen) * 10
    delta.view(-1)[where] = bad
    with pytest.raises(ValueError, match="non-finite"):
        comp.encode("w", delta)
    assert comp.error("w") is None
    clean = torch.randn(128, 192, generator=gen)
    assert torch.equal(decode(comp.encode("w", clean)), decode(Compressor(ANCHOR).encode("w", clean)))


def test_bf16_deltas_and_full_send_of_tiny_tensors():
    comp = Compressor(ANCHOR)
    x = torch.randn(5, 3).to(torch.bfloat16)
    enc = comp.encode("tiny", x)
    assert enc.layout.k == enc.layout.chunk_size == 15  # a 15-element tensor is sent whole
    assert bool((decode(enc) != 0).all())


def test_150m_payload_meets_the_anchor_ratio():
    from protocol.model import param_shapes

    hp = load_hparams("150m")
    layouts = layouts_for(param_shapes(hp), hp.sparseloco)
    numel = sum(lay.numel for lay in layouts.values())
    payload = sum(lay.wire_bytes for lay in layouts.values())
    assert 4 * numel / payload >= 140  # anchor: 146× (1.75 bytes per kept value at density 1/64)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_encode_decodes_like_cpu():
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(256, 192, generator=gen)
    lay = ChunkLayout.for_shape(x.shape, ANCHOR)
    enc_gpu = compress(x.cuda(), lay, ANCHOR)
    enc_cpu = compress(x, lay, ANCHOR)
    assert torch.equal(enc_gpu.indices().cpu(), enc_cpu.indices())
    assert torch.equal(enc_gpu.idx.cpu(), enc_cpu.idx) and torch.equal(enc_gpu.codes.cpu(), enc_cpu.codes)
    assert torch.equal(decode(enc_gpu).cpu(), decode(enc_gpu.to("cpu")))
    assert torch.allclose(enc_gpu.lookup.cpu(), enc_cpu.lookup, rtol=1e-6)


# --- issue 19: the pass-saving encoder equals the original one bit for bit ------------------------


def _reference_compress(x: torch.Tensor, lay: ChunkLayout, hp: SparseLoCoHParams):
    """The pre-issue-19 `_compress`: chunk copy, |x| temporary, values gathered from the chunks."""
    chunks = lay.chunk(x.to(torch.float32))
    idx = chunks.abs().topk(lay.k, dim=1, sorted=False).indices.sort(dim=1).values
    kept = chunks.gather(1, idx).reshape(-1)
    codes, lookup = quantize(kept, lay.levels, hp.quant_range_sigma)
    return pack12(idx), pack2(codes), lookup, lay.flat_positions(idx).reshape(-1), kept - lookup[codes.to(torch.int64)]


@pytest.mark.parametrize("shape", [(64, 96), (40, 24), (3, 5, 16), (200,), (97,), (128, 4096 + 64)])
@pytest.mark.parametrize("hp", [ANCHOR, SMALL])
def test_encode_is_bit_identical_to_the_reference_encoder(shape, hp):
    from protocol.codec import _compress

    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=g)
    x.view(-1)[::7] = x.view(-1)[::7].round(decimals=1)  # ties in |x|: the selection must still agree
    lay = ChunkLayout.for_shape(shape, hp)
    ref = _reference_compress(x, lay, hp)
    scratch = torch.full((x.numel() + 5,), float("nan"))
    for got in (_compress(x, lay, hp), _compress(x, lay, hp, scratch)):
        enc, positions, residual = got
        for a, b in zip((enc.idx, enc.codes, enc.lookup, positions, residual), ref, strict=True):
            assert a.dtype == b.dtype and torch.equal(a, b)
    # and through the Compressor's error feedback, over several windows and shapes sharing one scratch
    c_new, errors = Compressor(hp), torch.zeros(shape)
    for _ in range(3):
        delta = torch.randn(shape, generator=g)
        errors.mul_(hp.error_decay).add_(delta)
        idx, codes, lookup, pos, res = _reference_compress(errors, lay, hp)
        errors.view(-1)[pos] = res
        enc = c_new.encode("p", delta)
        c_new.encode("other", torch.randn(7, 16, generator=g))
        assert torch.equal(enc.idx, idx) and torch.equal(enc.codes, codes) and torch.equal(enc.lookup, lookup)
        assert torch.equal(c_new.error("p"), errors)


def test_decode_into_a_reused_buffer():
    g = torch.Generator().manual_seed(1)
    c = Compressor(SMALL)
    buf = torch.full((24 * 40,), 3.0)
    for _ in range(2):
        enc = c.encode("w", torch.randn(24, 40, generator=g))
        got = decode(enc, out=buf)
        assert got.shape == (24, 40) and got.data_ptr() == buf.data_ptr()
        assert torch.equal(got, decode(enc))
    with pytest.raises(ValueError):
        decode(enc, out=torch.zeros(5))


FULL = SparseLoCoHParams(chunk_2d=4, chunk_1d=16, topk=16)  # k = chunk size: every value is kept


@pytest.mark.parametrize("hp", [ANCHOR, SMALL, FULL], ids=["anchor", "small", "k=chunk"])
@pytest.mark.parametrize("shape", [(1,), (7,), (33, 17), (2, 3, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_non_finite_in_odd_places_always_raises_and_never_leaves_a_buffer(hp, shape, dtype):
    """The table-based finiteness check against 1-D tensors, tensors smaller than k, k equal to the chunk,
    a chunk (or the whole tensor) non-finite, half-precision deltas, first and later windows, and a fold
    β·e + Δ that overflows float32 from finite inputs: every case raises and the buffer is gone."""
    gen = torch.Generator().manual_seed(sum(shape))
    n = math.prod(shape)
    for bad in (float("nan"), float("inf"), float("-inf")):
        for fill in ("one", "chunk", "all"):
            for first in (True, False):
                comp = Compressor(hp)
                if not first:
                    comp.encode("w", torch.randn(shape, generator=gen).to(dtype))
                delta = (torch.randn(shape, generator=gen) * 100).to(dtype)
                where = {"one": [int(torch.randint(n, (1,), generator=gen))], "chunk": range(min(n, 16)),
                         "all": range(n)}[fill]
                delta.view(-1)[list(where)] = bad
                with pytest.raises(ValueError, match="non-finite"):
                    comp.encode("w", delta)
                assert comp.error("w") is None
    comp = Compressor(hp)
    comp.load_state_dict({"w": torch.full(shape, 3e38)})  # a finite, saved buffer
    with pytest.raises(ValueError, match="non-finite"):  # finite Δ, but β·e + Δ overflows
        comp.encode("w", torch.full(shape, 3e38))
    assert comp.error("w") is None
