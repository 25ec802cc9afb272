"""The shard file: signed round trip, and one targeted forgery per rejection reason."""

from __future__ import annotations

import json
import pickle
import tracemalloc

import pytest
import torch
from bittensor.sp_core import Keypair
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

import protocol.wire as wire
from protocol.codec import ChunkLayout, Compressor, EncodedTensor, decode, pack2, pack12
from protocol.hparams import load_hparams
from protocol.wire import (
    META_KEY,
    Rejection,
    RejectReason,
    Shard,
    ShardExpectation,
    ShardRules,
    check_size,
    max_shard_bytes,
    read_shard,
    write_shard,
)

HP = load_hparams("tiny")
SHAPES = {"layer.w": (128, 96), "layer.b": (96,), "norm": (7,), "odd": (65, 3)}
ALICE = Keypair.create_from_uri("//Alice")
BOB = Keypair.create_from_uri("//Bob")
NETUID, WINDOW = 7, 42
DEBUG = 16


def encoded_update(seed: int = 0) -> dict[str, EncodedTensor]:
    gen = torch.Generator().manual_seed(seed)
    comp = Compressor(HP.sparseloco)
    return comp.encode_all({n: torch.randn(s, generator=gen) for n, s in SHAPES.items()})


def make_shard(encoded=None, keypair=ALICE, **overrides) -> bytes:
    args = dict(
        keypair=keypair, netuid=NETUID, window=WINDOW, revision=HP.revision(), data_digest="d1" * 16,
        debug_values=torch.linspace(-1, 1, DEBUG), debug_positions=torch.arange(DEBUG) * 3,
    )
    args.update(overrides)
    return write_shard(encoded if encoded is not None else encoded_update(), **args)


def expectation(shapes=SHAPES, revision=None, **overrides) -> ShardExpectation:
    rules = ShardRules(HP.sparseloco, HP.shard.debug_sample_size, revision or HP.revision(), shapes)
    args = dict(netuid=NETUID, window=WINDOW, hotkey=ALICE.ss58_address, rules=rules)
    args.update(overrides)
    return ShardExpectation(**args)


def split(data: bytes) -> tuple[dict[str, torch.Tensor], dict]:
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    return st_load(data), json.loads(header["__metadata__"][META_KEY])


def forge(tensors: dict[str, torch.Tensor], fields: dict, keypair=ALICE, sign: bool = True) -> bytes:
    """Re-serialise tensors under a header; with sign=True hash and signature are made valid again."""
    fields = dict(fields)
    if sign:
        plain = {k: fields[k] for k in ("format_version", "netuid", "window", "hotkey", "revision", "data_digest")}
        digest = wire._content_hash(plain, [
            (name, {**wire._DTYPE_NAMES, torch.float64: "F64"}[t.dtype], tuple(t.shape),
             t.contiguous().numpy().tobytes())
            for name, t in tensors.items()
        ])
        fields["content_hash"] = digest.hex()
        fields["signature"] = bytes(keypair.sign(wire._SIGN_PREFIX + digest)).hex()
    return st_save(tensors, metadata={META_KEY: json.dumps(fields)})


def rejected(data: bytes, reason: RejectReason, exp: ShardExpectation | None = None) -> Rejection:
    result = read_shard(data, exp or expectation())
    assert isinstance(result, Rejection), "expected a rejection"
    assert result.reason == reason, result
    assert result.detail
    return result


def test_roundtrip_verifies_and_decodes():
    encoded = encoded_update()
    data = make_shard(encoded)
    shard = read_shard(data, expectation())
    assert isinstance(shard, Shard), shard
    assert shard.header.hotkey == ALICE.ss58_address and shard.header.window == WINDOW
    assert shard.header.revision == HP.revision() and shard.header.data_digest == "d1" * 16
    assert shard.size == len(data)
    for name in SHAPES:
        assert torch.equal(decode(shard.tensors[name]), decode(encoded[name]))
    assert torch.equal(shard.debug_values, torch.linspace(-1, 1, DEBUG))
    assert torch.equal(shard.debug_positions, torch.arange(DEBUG) * 3)
    no_positions = read_shard(make_shard(encoded, debug_positions=None), expectation(debug_size=DEBUG))
    assert isinstance(no_positions, Shard) and no_positions.debug_positions is None


def test_size_limit_is_exact_wire_size_plus_a_small_header_allowance():
    full = make_shard(debug_values=torch.zeros(HP.shard.debug_sample_size),
                      debug_positions=torch.zeros(HP.shard.debug_sample_size, dtype=torch.int64))
    cap = max_shard_bytes(HP.sparseloco, HP.shard.debug_sample_size, SHAPES)
    assert len(full) <= cap < len(full) + 8192
    assert isinstance(read_shard(full, expectation()), Shard)
    assert check_size(cap, expectation()) is None
    assert check_size(cap + 1, expectation()).reason == RejectReason.TOO_LARGE
    rejected(full + b"\0" * (cap - len(full) + 1), RejectReason.TOO_LARGE)


@pytest.mark.parametrize(
    ("exp", "reason"),
    [
        (dict(window=WINDOW + 1), RejectReason.WRONG_WINDOW),
        (dict(netuid=NETUID + 1), RejectReason.WRONG_NETUID),
        (dict(hotkey=BOB.ss58_address), RejectReason.WRONG_HOTKEY),
        (dict(revision="0123456789abcdef"), RejectReason.WRONG_REVISION),
    ],
)
def test_identity_mismatches(exp, reason):
    rejected(make_shard(), reason, expectation(**exp))


def test_signature_and_hash():
    tensors, fields = split(make_shard())
    bob_sig = forge(tensors, {**fields}, keypair=BOB)  # Bob signs a shard claiming Alice's hotkey
    rejected(bob_sig, RejectReason.BAD_SIGNATURE)
    tampered = {**tensors, "layer.w.scale": tensors["layer.w.scale"] * 2}
    rejected(forge(tampered, fields, sign=False), RejectReason.HASH_MISMATCH)
    rejected(forge(tensors, {**fields, "data_digest": "ee" * 16}, sign=False), RejectReason.HASH_MISMATCH)
    rejected(forge(tensors, {**fields, "signature": "00" * 64}, sign=False), RejectReason.BAD_SIGNATURE)


@pytest.mark.parametrize(
    "change",
    [
        dict(format_version=2), dict(netuid="7"), dict(hotkey="not-an-address" * 4), dict(window=-1),
        dict(revision="XYZ"), dict(content_hash="short"), dict(extra_field=1), dict(signature=None),
    ],
)
def test_bad_headers(change):
    tensors, fields = split(make_shard())
    rejected(forge(tensors, {**fields, **change}, sign=False), RejectReason.BAD_HEADER)


def test_table_checks_come_before_loading(monkeypatch):
    tensors, fields = split(make_shard())

    def no_load(_data):
        raise AssertionError("safetensors.load must not run on a shard that fails the table checks")

    monkeypatch.setattr(wire, "st_load", no_load)
    rejected(forge({**tensors, "layer.w.scale": tensors["layer.w.scale"].double()}, fields), RejectReason.WRONG_DTYPE)
    rejected(forge({**tensors, "layer.w.scale": torch.zeros(5)}, fields), RejectReason.WRONG_SHAPE)
    rejected(forge({**tensors, "layer.w.idx": tensors["layer.w.idx"][:-3]}, fields), RejectReason.WRONG_SHAPE)
    missing = {k: v for k, v in tensors.items() if k != "odd.val"}
    rejected(forge(missing, fields), RejectReason.MISSING_TENSOR)
    rejected(forge({**tensors, "evil": torch.zeros(1)}, fields), RejectReason.UNEXPECTED_TENSOR)
    too_long = torch.zeros(HP.shard.debug_sample_size + 1)
    rejected(forge({**tensors, "debug.values": too_long}, fields), RejectReason.WRONG_SHAPE)
    rejected(make_shard(), RejectReason.WRONG_SHAPE, expectation(debug_size=DEBUG + 1))


def _raw_file(table: dict, body: bytes) -> bytes:
    header = json.dumps(table).encode()
    return len(header).to_bytes(8, "little") + header + body


def test_huge_declared_shape_never_allocates():
    shapes = {"w": (2048, 2048), "b": (2048,)}
    exp = expectation(shapes=shapes)
    gen = torch.Generator().manual_seed(0)
    encoded = Compressor(HP.sparseloco).encode_all({n: torch.randn(s, generator=gen) for n, s in shapes.items()})
    tensors, fields = split(make_shard(encoded))
    table = {"__metadata__": {META_KEY: json.dumps(fields)}}
    for name, t in tensors.items():
        table[name] = {"dtype": wire._DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [0, 0]}
    table["w.idx"] = {"dtype": "U8", "shape": [1 << 40], "data_offsets": [0, 1 << 40]}
    table["debug.values"] = {"dtype": "F32", "shape": [1 << 50], "data_offsets": [0, 1 << 52]}
    tracemalloc.start()
    try:
        result = read_shard(_raw_file(table, b"\0" * 64), exp)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert isinstance(result, Rejection) and result.reason == RejectReason.WRONG_SHAPE
    assert peak < 64 * 1024 < exp.max_bytes  # parsing costs a few KiB, far below even this small cap


def test_oversized_body_is_refused_before_parsing():
    cap = max_shard_bytes(HP.sparseloco, HP.shard.debug_sample_size, SHAPES)
    blob = bytearray(b"\xff" * (cap + 1))  # a header length no parser should believe
    tracemalloc.start()
    try:
        result = read_shard(blob, expectation())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.reason == RejectReason.TOO_LARGE
    assert peak < 64 * 1024


@pytest.mark.parametrize(
    "blob",
    [b"", b"\x00" * 7, b"garbage" * 10, pickle.dumps({"w": torch.zeros(3)}), b"\x10" + b"\0" * 7 + b"[1,2,3,4,5,6,7,8]",
     b"\x10" + b"\0" * 7 + b"{\"a\":1,\"a\":2}   "],
)
def test_not_safetensors(blob):
    rejected(blob, RejectReason.NOT_SAFETENSORS)


def test_truncated_and_padded_files():
    data = make_shard()
    for cut in (1, 8, len(data) // 2, len(data) - 1):
        assert isinstance(read_shard(data[:cut], expectation()), Rejection)
    rejected(data + b"\0" * 8, RejectReason.NOT_SAFETENSORS)


def _with(encoded: dict[str, EncodedTensor], name: str, **parts) -> dict[str, EncodedTensor]:
    enc = encoded[name]
    fields = dict(idx=enc.idx, codes=enc.codes, lookup=enc.lookup, layout=enc.layout)
    fields.update(parts)
    return {**encoded, name: EncodedTensor(**fields)}


def test_content_checks_after_a_valid_signature():
    encoded = encoded_update()
    lay: ChunkLayout = encoded["odd"].layout  # (65, 3): 13×3 blocks of 39, a 12-bit index can exceed that
    assert lay.chunk_size == 39
    idx = encoded["odd"].indices().clone()
    idx[0, -1] = 4095
    rejected(make_shard(_with(encoded, "odd", idx=pack12(idx))), RejectReason.INDEX_OUT_OF_RANGE)
    idx = encoded["odd"].indices().clone()
    idx[2, 1] = idx[2, 0]
    rejected(make_shard(_with(encoded, "odd", idx=pack12(idx))), RejectReason.DUPLICATE_INDEX)
    rejected(make_shard(_with(encoded, "layer.w", lookup=torch.tensor([1.0, float("nan"), 0, 0]))),
             RejectReason.NON_FINITE)
    norm = encoded["norm"]  # 7 values: one padding nibble pair in idx, one padding code in val
    bad_idx = norm.idx.clone()
    bad_idx[-1] = 1
    rejected(make_shard(_with(encoded, "norm", idx=bad_idx)), RejectReason.NON_CANONICAL)
    bad_codes = pack2(torch.tensor([0, 1, 2, 3, 0, 1, 2, 3]))
    rejected(make_shard(_with(encoded, "norm", codes=bad_codes)), RejectReason.NON_CANONICAL)
    rejected(make_shard(debug_positions=torch.full((DEBUG,), 10**9)), RejectReason.INDEX_OUT_OF_RANGE)
    tensors, fields = split(make_shard())
    inf_debug = {**tensors, "debug.values": torch.full((DEBUG,), float("inf"))}
    rejected(forge(inf_debug, fields), RejectReason.NON_FINITE)


def test_writer_refuses_bad_input():
    with pytest.raises(ValueError):
        make_shard(debug_values=torch.tensor([float("nan")]))
    with pytest.raises(ValueError):
        make_shard(debug_positions=torch.arange(3))
    with pytest.raises(ValueError):
        make_shard({"debug.values": encoded_update()["norm"]})


# ---- fuzzing: nothing a peer uploads may crash a reader ----------------------------------------

FUZZ = settings(deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])
VALID = make_shard()
VALID_HEADER_END = 8 + int.from_bytes(VALID[:8], "little")
VALID_SHARD = read_shard(VALID, expectation())
NAMES = sorted(expectation().rules.table) + ["debug.values", "debug.positions"]


def _same_content(shard: Shard) -> bool:
    return shard.header == VALID_SHARD.header and all(
        torch.equal(decode(shard.tensors[n]), decode(VALID_SHARD.tensors[n])) for n in SHAPES
    )


def _check(data: bytes) -> Shard | Rejection:
    result = read_shard(data, expectation())
    assert isinstance(result, Shard | Rejection)
    if isinstance(result, Rejection):
        assert isinstance(result.reason, RejectReason) and result.detail
    return result


position = st.one_of(st.integers(0, VALID_HEADER_END + 64), st.integers(0, len(VALID) - 1))
mutation = st.one_of(
    st.tuples(st.just("flip"), st.lists(st.tuples(position, st.integers(1, 255)), min_size=1, max_size=6)),
    st.tuples(st.just("cut"), st.integers(0, len(VALID) - 1)),
    st.tuples(st.just("insert"), st.tuples(position, st.binary(min_size=1, max_size=16))),
)


@settings(FUZZ, max_examples=800)
@given(mutation)
def test_fuzz_mutated_shards(change):
    kind, arg = change
    data = bytearray(VALID)
    if kind == "flip":
        for pos, mask in arg:
            data[pos] ^= mask
    elif kind == "cut":
        data = data[:arg]
    else:
        pos, blob = arg
        data[pos:pos] = blob
    result = _check(bytes(data))
    if isinstance(result, Shard):  # only harmless edits (e.g. JSON whitespace) may survive
        assert _same_content(result)


big_int = st.one_of(st.integers(0, 4096), st.integers(0, 1 << 64), st.integers(-5, -1))
entry = st.one_of(
    st.fixed_dictionaries({
        "dtype": st.sampled_from(["U8", "F32", "I64", "F64", "BOOL", "F8_E4M3", "", "x" * 40]),
        "shape": st.lists(big_int, max_size=3),
        "data_offsets": st.lists(big_int, min_size=2, max_size=3),
    }),
    st.none(), st.integers(), st.text(max_size=8), st.lists(st.integers(), max_size=3),
)
VALID_META = {META_KEY: json.dumps(split(VALID)[1])}
metadata = st.one_of(  # mostly the valid header, so the tensor table checks get exercised
    st.just(VALID_META), st.just(VALID_META), st.just(VALID_META),
    st.dictionaries(st.text(max_size=12), st.text(max_size=40), max_size=3),
    st.integers(),
)


VALID_TABLE = json.loads(VALID[8:VALID_HEADER_END])


@settings(FUZZ, max_examples=500)
@given(st.booleans(), st.dictionaries(st.one_of(st.sampled_from(NAMES), st.text(max_size=20)), entry, max_size=8),
       metadata, st.one_of(st.just(VALID[VALID_HEADER_END:]), st.binary(max_size=256)))
def test_fuzz_forged_tables(on_valid, table, meta, body):
    """Hostile tensor tables, alone or patched into the valid one (to reach the dtype/shape/offset checks)."""
    base = {k: v for k, v in VALID_TABLE.items() if k != "__metadata__"} if on_valid else {}
    result = _check(_raw_file({**base, **table, "__metadata__": meta}, body))
    assert isinstance(result, Rejection) or (on_valid and not table and _same_content(result))


def _pickles(obj) -> bytes:
    return pickle.dumps(obj)


blobs = st.one_of(
    st.binary(max_size=1024),
    st.builds(_pickles, st.recursive(st.integers() | st.text(max_size=8) | st.floats(),
                                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=4),
                                     max_leaves=10)),
    st.builds(lambda n, tail: n.to_bytes(8, "little") + tail, big_int.filter(lambda v: v >= 0 and v < 1 << 64),
              st.binary(max_size=512)),
)


@settings(FUZZ, max_examples=300)
@given(blobs)
def test_fuzz_random_bytes_and_pickles(blob):
    assert isinstance(_check(blob), Rejection)


NORM = VALID_SHARD.tensors["norm"].layout
ODD = VALID_SHARD.tensors["odd"].layout
floats = st.floats(allow_nan=True, allow_infinity=True, width=32)


@settings(FUZZ, max_examples=400)
@given(st.binary(min_size=ODD.idx_bytes, max_size=ODD.idx_bytes),
       st.binary(min_size=NORM.code_bytes, max_size=NORM.code_bytes),
       st.lists(floats, min_size=4, max_size=4))
def test_fuzz_signed_but_hostile_content(odd_idx, norm_codes, lookup):
    encoded = dict(VALID_SHARD.tensors)
    encoded = _with(encoded, "odd", idx=torch.frombuffer(bytearray(odd_idx), dtype=torch.uint8))
    encoded = _with(encoded, "norm", codes=torch.frombuffer(bytearray(norm_codes), dtype=torch.uint8),
                    lookup=torch.tensor(lookup, dtype=torch.float32))
    result = _check(make_shard(encoded))
    if isinstance(result, Rejection):
        assert result.reason in {RejectReason.INDEX_OUT_OF_RANGE, RejectReason.DUPLICATE_INDEX,
                                 RejectReason.NON_CANONICAL, RejectReason.NON_FINITE}
    else:  # whatever passes is safe to decode: unique, in-range indices and finite values
        idx = result.tensors["odd"].indices()
        assert int(idx.max()) < ODD.chunk_size and bool((idx[:, 1:] > idx[:, :-1]).all())
        assert bool(torch.isfinite(decode(result.tensors["norm"])).all())
