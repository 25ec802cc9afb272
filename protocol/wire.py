"""The shard file: one signed safetensors file per (hotkey, window), and its paranoid reader.

A shard carries, for every parameter, `{param}.idx` (packed 12-bit indices), `{param}.val` (packed
2-bit codes) and `{param}.scale` (the float32 lookup table), plus the sync debug sample
(`debug.values`, float32, and optionally `debug.positions`, int64 global positions into the
parameters flattened in the model's order). The safetensors `__metadata__` holds one JSON header,
validated by `ShardHeader`: format version, netuid, window, hotkey, model revision, digest of the
samples trained on, the content hash (blake2b over the header fields and every tensor's name, dtype,
shape and bytes, in name order) and the hotkey's sr25519 signature of that hash.

Downloads are hostile until proven otherwise. `read_shard` never unpickles and never lets a declared
size allocate anything: it refuses bodies above `max_shard_bytes` before parsing, parses the
safetensors header itself and checks every name, dtype, shape and offset against the model before
safetensors loads a tensor, then checks identity, hash and signature, then the content (index range,
ordering, canonical padding, finiteness). Every failure is a `Rejection` with a typed reason.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal

import torch
from bittensor.sp_core import Keypair, ss58_decode, verify
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from protocol.codec import ChunkLayout, EncodedTensor, layouts_for
from protocol.hparams import HParams, SparseLoCoHParams

FORMAT_VERSION = 1
META_KEY = "crucible.shard"
DEBUG_VALUES = "debug.values"
DEBUG_POSITIONS = "debug.positions"
_SUFFIXES = (".idx", ".val", ".scale")
_HASH_PERSON = b"crucible.shard"
_SIGN_PREFIX = b"crucible-shard-v1:"
_HEADER_BASE = 4096  # bytes of safetensors header allowed beyond the per-tensor entries
_HEADER_PER_TENSOR = 128  # bytes per tensor entry, on top of its name
_DTYPES: dict[str, tuple[torch.dtype, int]] = {"U8": (torch.uint8, 1), "F32": (torch.float32, 4), "I64": (torch.int64, 8)}
_DTYPE_NAMES = {dtype: name for name, (dtype, _) in _DTYPES.items()}


class RejectReason(StrEnum):
    TOO_LARGE = "too_large"
    NOT_SAFETENSORS = "not_safetensors"
    BAD_HEADER = "bad_header"
    BAD_SIGNATURE = "bad_signature"
    WRONG_WINDOW = "wrong_window"
    WRONG_NETUID = "wrong_netuid"
    WRONG_HOTKEY = "wrong_hotkey"
    WRONG_REVISION = "wrong_revision"
    WRONG_SHAPE = "wrong_shape"
    WRONG_DTYPE = "wrong_dtype"
    MISSING_TENSOR = "missing_tensor"
    UNEXPECTED_TENSOR = "unexpected_tensor"
    INDEX_OUT_OF_RANGE = "index_out_of_range"
    DUPLICATE_INDEX = "duplicate_index"
    NON_CANONICAL = "non_canonical"
    NON_FINITE = "non_finite"
    HASH_MISMATCH = "hash_mismatch"
    MALFORMED = "malformed"


@dataclass(frozen=True)
class Rejection:
    reason: RejectReason
    detail: str

    def __str__(self) -> str:
        return f"{self.reason.value}: {self.detail}"


class _Reject(Exception):
    def __init__(self, reason: RejectReason, detail: str) -> None:
        super().__init__(detail)
        self.rejection = Rejection(reason, detail[:500])


class ShardHeader(BaseModel):
    """The signed JSON header of a shard (safetensors `__metadata__[META_KEY]`)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    format_version: Literal[1] = Field(description="Wire format version.")
    netuid: int = Field(ge=0, le=65535, description="Subnet the shard was made for.")
    window: int = Field(ge=0, lt=1 << 62, description="Training window the update belongs to.")
    hotkey: str = Field(min_length=40, max_length=64, description="SS58 address of the miner's hotkey.")
    revision: str = Field(pattern=r"^[0-9a-f]{1,64}$", description="HParams.revision() the miner trained with.")
    data_digest: str = Field(pattern=r"^[0-9a-f]{16,128}$", description="Digest of the samples trained on (hex).")
    content_hash: str = Field(pattern=r"^[0-9a-f]{64}$", description="blake2b-256 of header fields + tensors (hex).")
    signature: str = Field(pattern=r"^[0-9a-f]{128}$", description="sr25519 signature of the content hash (hex).")

    @field_validator("hotkey")
    @classmethod
    def _ss58(cls, value: str) -> str:
        ss58_decode(value)  # raises ValueError on a bad checksum or length
        return value

    def signed_fields(self) -> dict[str, Any]:
        return self.model_dump(exclude={"content_hash", "signature"})


@dataclass(frozen=True)
class Shard:
    """A verified shard: every tensor checked against the model, ready to decode."""

    header: ShardHeader
    tensors: dict[str, EncodedTensor]
    debug_values: torch.Tensor
    debug_positions: torch.Tensor | None
    size: int


def _content_hash(fields: Mapping[str, Any], tensors: list[tuple[str, str, tuple[int, ...], Any]]) -> bytes:
    h = hashlib.blake2b(digest_size=32, person=_HASH_PERSON)
    head = json.dumps(dict(fields), sort_keys=True, separators=(",", ":")).encode()
    h.update(len(head).to_bytes(8, "little") + head)
    for name, dtype, shape, data in sorted(tensors, key=lambda t: t[0]):
        entry = json.dumps([name, dtype, list(shape)], separators=(",", ":")).encode()
        h.update(len(entry).to_bytes(8, "little") + entry)
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.digest()


def _expected_tables(
    layouts: Mapping[str, ChunkLayout],
) -> dict[str, tuple[str, tuple[int, ...]]]:
    table: dict[str, tuple[str, tuple[int, ...]]] = {}
    for name, lay in layouts.items():
        table[f"{name}.idx"] = ("U8", (lay.idx_bytes,))
        table[f"{name}.val"] = ("U8", (lay.code_bytes,))
        table[f"{name}.scale"] = ("F32", (lay.levels,))
    return table


def header_allowance(tensor_names: list[str]) -> int:
    """Upper bound on the safetensors JSON header of a shard holding these tensors."""
    return _HEADER_BASE + sum(len(n.encode()) + _HEADER_PER_TENSOR for n in tensor_names)


def max_shard_bytes(
    sparseloco: SparseLoCoHParams, debug_sample_size: int, shapes: Mapping[str, tuple[int, ...] | torch.Size]
) -> int:
    """Exact wire size of a full shard (full debug sample with positions) plus the header allowance."""
    layouts = layouts_for(shapes, sparseloco)
    names = list(_expected_tables(layouts)) + [DEBUG_VALUES, DEBUG_POSITIONS]
    payload = sum(lay.wire_bytes for lay in layouts.values()) + 12 * debug_sample_size
    return 8 + header_allowance(names) + payload


@dataclass(frozen=True)
class ShardRules:
    """What every shard of one network looks like: compression, debug sample size, model, revision.

    Built once per node (`from_hparams`); the layouts and limits derived from it are cached.
    """

    sparseloco: SparseLoCoHParams
    debug_sample_size: int
    revision: str
    shapes: Mapping[str, tuple[int, ...]]

    def __post_init__(self) -> None:
        object.__setattr__(self, "shapes", {n: tuple(int(s) for s in shape) for n, shape in self.shapes.items()})

    @classmethod
    def from_hparams(cls, hp: HParams, shapes: Mapping[str, tuple[int, ...] | torch.Size]) -> ShardRules:
        return cls(hp.sparseloco, hp.shard.debug_sample_size, hp.revision(), shapes)

    @functools.cached_property
    def layouts(self) -> dict[str, ChunkLayout]:
        return layouts_for(self.shapes, self.sparseloco)

    @functools.cached_property
    def table(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        return _expected_tables(self.layouts)

    @functools.cached_property
    def max_bytes(self) -> int:
        return max_shard_bytes(self.sparseloco, self.debug_sample_size, self.shapes)

    @functools.cached_property
    def header_cap(self) -> int:
        return header_allowance(list(self.table) + [DEBUG_VALUES, DEBUG_POSITIONS])

    @functools.cached_property
    def total_numel(self) -> int:
        return sum(math.prod(shape) for shape in self.shapes.values())


@dataclass(frozen=True)
class ShardExpectation:
    """What a reader knows before downloading: who should have sent what, for which model."""

    netuid: int
    window: int
    hotkey: str
    rules: ShardRules
    debug_size: int | None = None  # exact debug sample length; None: 1..rules.debug_sample_size

    @property
    def max_bytes(self) -> int:
        return self.rules.max_bytes


def check_size(size: int, expected: ShardExpectation) -> Rejection | None:
    """Refuse an object by its size alone (call with the object's content length before downloading)."""
    if size > expected.max_bytes:
        return Rejection(RejectReason.TOO_LARGE, f"{size} bytes exceeds the limit of {expected.max_bytes}")
    return None


def write_shard(
    encoded: Mapping[str, EncodedTensor],
    *,
    keypair: Keypair,
    netuid: int,
    window: int,
    revision: str,
    data_digest: str,
    debug_values: torch.Tensor,
    debug_positions: torch.Tensor | None = None,
) -> bytes:
    """Serialise and sign one shard; the header's hotkey is the keypair's address."""
    tensors: dict[str, torch.Tensor] = {}
    for name, enc in encoded.items():
        if not name or name.startswith("debug."):
            raise ValueError(f"parameter name {name!r} is reserved or empty")
        tensors[f"{name}.idx"] = enc.idx.detach().to("cpu", torch.uint8).contiguous()
        tensors[f"{name}.val"] = enc.codes.detach().to("cpu", torch.uint8).contiguous()
        tensors[f"{name}.scale"] = enc.lookup.detach().to("cpu", torch.float32).contiguous()
    values = debug_values.detach().to("cpu", torch.float32).reshape(-1).contiguous()
    if not bool(torch.isfinite(values).all()):
        raise ValueError("debug sample has non-finite values")
    tensors[DEBUG_VALUES] = values
    if debug_positions is not None:
        positions = debug_positions.detach().to("cpu", torch.int64).reshape(-1).contiguous()
        if positions.numel() != values.numel():
            raise ValueError("debug positions and values differ in length")
        tensors[DEBUG_POSITIONS] = positions
    fields = dict(
        format_version=FORMAT_VERSION, netuid=int(netuid), window=int(window), hotkey=str(keypair.ss58_address),
        revision=str(revision), data_digest=str(data_digest),
    )
    digest = _content_hash(fields, [
        (name, _DTYPE_NAMES[t.dtype], tuple(t.shape), t.numpy().tobytes()) for name, t in tensors.items()
    ])
    signature = bytes(keypair.sign(_SIGN_PREFIX + digest))
    header = ShardHeader(**fields, content_hash=digest.hex(), signature=signature.hex())
    return st_save(tensors, metadata={META_KEY: header.model_dump_json()})


def read_shard(data: bytes | bytearray | memoryview, expected: ShardExpectation) -> Shard | Rejection:
    """Verify and parse a downloaded shard; never raises, never allocates beyond the size limit."""
    try:
        return _read(data, expected)
    except _Reject as exc:
        return exc.rejection
    except Exception as exc:  # the contract: a bad shard is a rejection, never a crash
        return Rejection(RejectReason.MALFORMED, f"{type(exc).__name__}: {exc}"[:500])


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("duplicate key in safetensors header")
    return out


def _is_int_list(value: Any, length: int | None = None) -> bool:
    return (
        isinstance(value, list)
        and (length is None or len(value) == length)
        and all(type(v) is int and v >= 0 for v in value)
    )


def _parse_table(data: memoryview, expected: ShardExpectation) -> tuple[dict[str, Any], dict[str, str], int]:
    """The safetensors JSON header (tensor entries, metadata) and the body's start, size-checked."""
    size = len(data)
    if size > expected.max_bytes:
        raise _Reject(RejectReason.TOO_LARGE, f"{size} bytes exceeds the limit of {expected.max_bytes}")
    if size < 8:
        raise _Reject(RejectReason.NOT_SAFETENSORS, f"only {size} bytes")
    n = int.from_bytes(data[:8], "little")
    if n > expected.rules.header_cap or 8 + n > size:
        raise _Reject(RejectReason.NOT_SAFETENSORS, f"declared header length {n} is out of bounds")
    try:
        table = json.loads(bytes(data[8 : 8 + n]).decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (ValueError, RecursionError) as exc:
        raise _Reject(RejectReason.NOT_SAFETENSORS, f"header is not valid JSON: {exc}") from None
    if not isinstance(table, dict):
        raise _Reject(RejectReason.NOT_SAFETENSORS, "header is not a JSON object")
    meta = table.pop("__metadata__", None)
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise _Reject(RejectReason.BAD_HEADER, "missing or malformed __metadata__")
    if set(meta) != {META_KEY}:
        raise _Reject(RejectReason.BAD_HEADER, f"metadata must hold exactly '{META_KEY}'")
    return table, meta, 8 + n


def _check_entries(table: dict[str, Any], body_len: int, expected: ShardExpectation) -> dict[str, tuple[int, int]]:
    """Names, dtypes, shapes and offsets of every tensor entry, against the model; returns offsets."""
    for name, entry in table.items():
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise _Reject(RejectReason.NOT_SAFETENSORS, f"{name[:128]}: malformed tensor entry")
        if not isinstance(entry["dtype"], str) or not _is_int_list(entry["shape"]) or not _is_int_list(
            entry["data_offsets"], 2
        ):
            raise _Reject(RejectReason.NOT_SAFETENSORS, f"{name[:128]}: malformed dtype, shape or offsets")
    want = dict(expected.rules.table)
    missing = sorted(set(want) - set(table)) + ([] if DEBUG_VALUES in table else [DEBUG_VALUES])
    if missing:
        raise _Reject(RejectReason.MISSING_TENSOR, f"missing {missing[:3]} ({len(missing)} in all)")
    extra = sorted(set(table) - set(want) - {DEBUG_VALUES, DEBUG_POSITIONS})
    if extra:
        raise _Reject(RejectReason.UNEXPECTED_TENSOR, f"unexpected {[n[:128] for n in extra[:3]]} ({len(extra)} in all)")
    debug_shape = tuple(table[DEBUG_VALUES]["shape"])
    want[DEBUG_VALUES] = ("F32", debug_shape)
    if DEBUG_POSITIONS in table:
        want[DEBUG_POSITIONS] = ("I64", debug_shape)
    limit = expected.rules.debug_sample_size
    length = debug_shape[0] if len(debug_shape) == 1 else -1
    if (expected.debug_size is not None and length != expected.debug_size) or not 1 <= length <= limit:
        want_len = expected.debug_size if expected.debug_size is not None else f"1..{limit}"
        raise _Reject(RejectReason.WRONG_SHAPE, f"{DEBUG_VALUES}: shape {str(list(debug_shape))[:64]}, want [{want_len}]")
    spans: list[tuple[int, int, str]] = []
    for name in sorted(table):
        dtype, shape, (start, end) = table[name]["dtype"], table[name]["shape"], table[name]["data_offsets"]
        want_dtype, want_shape = want[name]
        if dtype != want_dtype:
            raise _Reject(RejectReason.WRONG_DTYPE, f"{name}: dtype {dtype[:16]}, want {want_dtype}")
        if tuple(shape) != want_shape:
            raise _Reject(RejectReason.WRONG_SHAPE, f"{name}: shape {str(shape)[:64]}, want {list(want_shape)[:4]}")
        if end - start != math.prod(want_shape) * _DTYPES[dtype][1]:
            raise _Reject(RejectReason.NOT_SAFETENSORS, f"{name}: offsets {[start, end]} do not match its shape")
        spans.append((start, end, name))
    spans.sort()
    cursor = 0
    for start, end, name in spans:
        if start != cursor:
            raise _Reject(RejectReason.NOT_SAFETENSORS, f"{name}: data is not contiguous at offset {start}")
        cursor = end
    if cursor != body_len:
        raise _Reject(RejectReason.NOT_SAFETENSORS, f"body is {body_len} bytes, tensors cover {cursor}")
    return {name: (start, end) for start, end, name in spans}


def header_prefix_bytes(expected: ShardExpectation) -> int:
    """How many leading bytes of a shard always hold its whole signed header (for `read_header`)."""
    return 8 + expected.rules.header_cap


def read_header(prefix: bytes | bytearray | memoryview, expected: ShardExpectation) -> ShardHeader | Rejection:
    """The signed header from a shard's first bytes: identity checked, signature of its content hash verified.

    A valid header commits its hotkey to one content hash for (netuid, window) without the body:
    whoever reads it knows which bytes the miner stands behind, before downloading them.
    """
    try:
        data = memoryview(prefix).cast("B")
        _table, meta, _start = _parse_table(data, expected)
        header = _identity(meta, expected)
        if not _signed(bytes.fromhex(header.content_hash), header):
            raise _Reject(RejectReason.BAD_SIGNATURE, f"signature does not verify for {header.hotkey}")
        return header
    except _Reject as rej:
        return rej.rejection
    except Exception as exc:  # a malformed prefix must give a reason, never an exception
        return Rejection(RejectReason.MALFORMED, f"{type(exc).__name__}: {exc}"[:500])


def _identity(meta: dict[str, str], expected: ShardExpectation) -> ShardHeader:
    try:
        header = ShardHeader.model_validate_json(meta[META_KEY])
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "header"
        raise _Reject(RejectReason.BAD_HEADER, f"{where}: {first['msg']}") from None
    for reason, got, want in (
        (RejectReason.WRONG_NETUID, header.netuid, expected.netuid),
        (RejectReason.WRONG_WINDOW, header.window, expected.window),
        (RejectReason.WRONG_HOTKEY, header.hotkey, expected.hotkey),
        (RejectReason.WRONG_REVISION, header.revision, expected.rules.revision),
    ):
        if got != want:
            raise _Reject(reason, f"header says {got}, expected {want}")
    return header


def _signed(digest: bytes, header: ShardHeader) -> bool:
    try:
        return bool(verify(_SIGN_PREFIX + digest, bytes.fromhex(header.signature), header.hotkey))
    except ValueError:
        return False


def _read(raw: bytes | bytearray | memoryview, expected: ShardExpectation) -> Shard:
    data = memoryview(raw).cast("B")
    table, meta, body_start = _parse_table(data, expected)
    header = _identity(meta, expected)
    offsets = _check_entries(table, len(data) - body_start, expected)

    body = data[body_start:]
    digest = _content_hash(header.signed_fields(), [
        (name, table[name]["dtype"], tuple(table[name]["shape"]), body[start:end])
        for name, (start, end) in offsets.items()
    ])
    if not hmac.compare_digest(digest.hex(), header.content_hash):
        raise _Reject(RejectReason.HASH_MISMATCH, "content hash does not match the tensors and header")
    if not _signed(digest, header):
        raise _Reject(RejectReason.BAD_SIGNATURE, f"signature does not verify for {header.hotkey}")

    loaded = st_load(bytes(data) if not isinstance(raw, bytes) else raw)
    for name, (dtype, _) in ((n, _DTYPES[table[n]["dtype"]]) for n in offsets):
        if loaded[name].dtype != dtype or list(loaded[name].shape) != table[name]["shape"]:
            raise _Reject(RejectReason.NOT_SAFETENSORS, f"{name}: loaded tensor disagrees with its header")
    tensors = {name: _check_content(name, loaded, lay) for name, lay in sorted(expected.rules.layouts.items())}
    debug_values = loaded[DEBUG_VALUES]
    if not bool(torch.isfinite(debug_values).all()):
        raise _Reject(RejectReason.NON_FINITE, f"{DEBUG_VALUES} has non-finite values")
    positions = loaded.get(DEBUG_POSITIONS)
    if positions is not None and positions.numel() and (
        int(positions.min()) < 0 or int(positions.max()) >= expected.rules.total_numel
    ):
        raise _Reject(RejectReason.INDEX_OUT_OF_RANGE, f"{DEBUG_POSITIONS} outside [0, {expected.rules.total_numel})")
    return Shard(header, tensors, debug_values, positions, len(data))


def _check_content(name: str, loaded: Mapping[str, torch.Tensor], layout: ChunkLayout) -> EncodedTensor:
    enc = EncodedTensor(loaded[f"{name}.idx"], loaded[f"{name}.val"], loaded[f"{name}.scale"], layout)
    if not bool(torch.isfinite(enc.lookup).all()):
        raise _Reject(RejectReason.NON_FINITE, f"{name}.scale has non-finite values")
    idx = enc.indices()
    if int(idx.max()) >= layout.chunk_size:
        raise _Reject(RejectReason.INDEX_OUT_OF_RANGE, f"{name}: index {int(idx.max())} ≥ chunk size {layout.chunk_size}")
    if layout.k > 1 and not bool((idx[:, 1:] > idx[:, :-1]).all()):
        raise _Reject(RejectReason.DUPLICATE_INDEX, f"{name}: indices are not strictly increasing in every chunk")
    if layout.n_values % 2 and (int(enc.idx[-2]) >> 4 or int(enc.idx[-1])):
        raise _Reject(RejectReason.NON_CANONICAL, f"{name}.idx: padding bits are not zero")
    tail = layout.n_values % 4
    if tail and int(enc.codes[-1]) >> (2 * tail):
        raise _Reject(RejectReason.NON_CANONICAL, f"{name}.val: padding bits are not zero")
    return enc
