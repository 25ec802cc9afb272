"""What the devnet chain and its SDK backend agree on: JSON values, signing payloads, block hashes.

A real node speaks SCALE over a websocket; the devnet chain speaks canonical JSON over HTTP. Both
sides of that seam (`devnet/substrate.py` in every client, `devnet/chain_server.py` in the chain
process) import this module, so the bytes a client signs are exactly the bytes the server verifies.

    payload = signing_payload(genesis, call, signer, nonce, era)   # what the keypair signs
    block_hash(genesis, 42) -> "0x…"; block_number_of(genesis, that_hash) -> 42
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

WIRE_VERSION = 1
RAO_PER_TAO = 10**9
U16_MAX = 65535


def to_json_value(value: Any) -> Any:
    """A JSON-native copy of a call parameter: bytes become 0x-hex, tuples lists, composed calls dicts."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return "0x" + bytes(value).hex()
    if isinstance(value, DevnetCall):
        return value.as_dict()
    if isinstance(value, dict):
        return {str(k): to_json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [to_json_value(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, (int, float, str)):
        return value
    rao = getattr(value, "rao", None)  # bittensor Balance
    if isinstance(rao, int):
        return rao
    raise TypeError(f"cannot encode a {type(value).__name__} call parameter for the devnet chain")


def canonical_json(value: Any) -> bytes:
    """Deterministic UTF-8 JSON (sorted keys, no whitespace): the bytes that get signed and hashed."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


@dataclass(frozen=True)
class DevnetCall:
    """A composed call: what `Substrate.compose` returns and `submit` accepts.

    `module`/`function`/`params` mirror the SDK's generated `Call`; `data` is the call's canonical
    bytes (the SDK treats anything with `.data` as already composed).
    """

    module: str
    function: str
    params: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"module": self.module, "function": self.function, "params": self.params}

    @property
    def data(self) -> bytes:
        return canonical_json(self.as_dict())

    # The SDK's call-inspection helpers also look for these spellings.
    @property
    def call_module(self) -> str:
        return self.module

    @property
    def call_function(self) -> str:
        return self.function


def compose(module: str, function: str, params: dict[str, Any] | None) -> DevnetCall:
    return DevnetCall(str(module), str(function), to_json_value(dict(params or {})))


def signing_payload(
    genesis: str, call: DevnetCall, signer: str, nonce: int, era: dict[str, int] | None, tip: int = 0
) -> bytes:
    """The exact bytes an extrinsic's signer signs (sr25519/ed25519 over the raw bytes)."""
    body = {
        "v": WIRE_VERSION,
        "genesis": genesis,
        "call": call.as_dict(),
        "signer": signer,
        "nonce": int(nonce),
        "era": era,
        "tip": int(tip),
    }
    return canonical_json(body)


def extrinsic_hash(payload: bytes, signature: bytes) -> str:
    return "0x" + hashlib.blake2b(payload + signature, digest_size=32).hexdigest()


def genesis_hash(seed: str) -> str:
    return "0x" + hashlib.blake2b(f"crucible-devnet:{seed}".encode(), digest_size=32).hexdigest()


def block_hash(genesis: str, number: int) -> str:
    """A 32-byte block hash that also carries its number (last 8 bytes), so it resolves without a table."""
    tag = hashlib.blake2b(bytes.fromhex(genesis[2:]) + number.to_bytes(8, "little"), digest_size=24)
    return "0x" + tag.hexdigest() + number.to_bytes(8, "big").hex()


def block_number_of(genesis: str, hash_: str) -> int | None:
    """The block number a devnet block hash names, or None when it is not one of this chain's."""
    try:
        raw = bytes.fromhex(hash_.removeprefix("0x"))
    except (ValueError, AttributeError):
        return None
    if len(raw) != 32:
        return None
    number = int.from_bytes(raw[24:], "big")
    return number if block_hash(genesis, number) == "0x" + raw.hex() else None


def hex_bytes(value: Any) -> bytes:
    """Bytes from 0x-hex, a list of ints, or bytes; ValueError otherwise."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str) and value.startswith("0x"):
        return bytes.fromhex(value[2:])
    if isinstance(value, list) and all(isinstance(b, int) and 0 <= b < 256 for b in value):
        return bytes(value)
    raise ValueError("expected 0x-hex bytes")
