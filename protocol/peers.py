"""Peer lists and aggregate records: which miners' shards everybody aggregates in a window.

A validator publishes, in its own bucket under `peers_key(window)`, a small JSON document naming the
primary and reserve peers (hotkeys, best first) for that window, signed with its hotkey. Miners and
validators read the list of the highest-stake validator that published one and gather the shards of
the primaries, filling gaps left by missing or invalid primaries from the reserve in order, so every
honest node picks the same set and computes the same θ.

Right after a window's upload deadline the validator publishes an `AggregateRecord` under
`aggregate_key(window)`: the hotkeys and content hashes of the shards that window aggregates and the
clip norm, with a copy of each of those shards in its own bucket (`mirror_key`). The record is the
window's update, exactly and cheaply (a dense copy would be a model's size per window): every node —
live miners, the validators, a node catching up — applies what the record names and checks every
shard's hash, so a miner whose server shows different nodes different bytes cannot split them.

Like every download, both are untrusted bytes: size-capped, schema-validated and signature-checked
before use.
"""

from __future__ import annotations

import hashlib
import json
from typing import ClassVar, Literal

from bittensor.sp_core import Keypair, ss58_decode, verify
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

PEER_LIST_VERSION = 1
MAX_PEER_LIST_BYTES = 256 * 1024


class PeerListError(ValueError):
    """A peer list that cannot be trusted; the message says why."""


def _check_ss58(value: str) -> str:
    ss58_decode(value)
    return value


class _SignedDoc(BaseModel):
    """A small JSON document for one (netuid, window), signed by the publishing validator's hotkey."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
    SIGN_PREFIX: ClassVar[bytes] = b""

    version: Literal[1] = Field(PEER_LIST_VERSION, description="Document format version.")
    netuid: int = Field(ge=0, le=65535, description="Subnet the document is for.")
    window: int = Field(ge=0, description="Window whose shards the document is about.")
    validator: str = Field(description="SS58 hotkey of the publishing validator.")
    signature: str = Field("", description="sr25519 signature (hex) of the document by the validator's hotkey.")

    @field_validator("validator")
    @classmethod
    def _validator_ss58(cls, value: str) -> str:
        return _check_ss58(value)

    def digest(self) -> bytes:
        payload = self.model_dump(exclude={"signature"})
        blob = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.blake2b(self.SIGN_PREFIX + blob, digest_size=32).digest()

    def signed(self, keypair: Keypair) -> bytes:
        if keypair.ss58_address != self.validator:
            raise ValueError("the signing keypair is not the document's validator")
        signature = bytes(keypair.sign(self.SIGN_PREFIX + self.digest())).hex()
        return self.model_copy(update={"signature": signature}).model_dump_json().encode()

    @classmethod
    def parse(cls, data: bytes, *, netuid: int, window: int, validator: str):
        """Parse and verify downloaded bytes; PeerListError with the reason otherwise."""
        what = cls.__name__
        if len(data) > MAX_PEER_LIST_BYTES:
            raise PeerListError(f"{what} of {len(data)} bytes exceeds {MAX_PEER_LIST_BYTES}")
        try:
            doc = cls.model_validate_json(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            raise PeerListError(f"bad {what}: {'.'.join(map(str, first['loc']))}: {first['msg']}") from None
        if (doc.netuid, doc.window, doc.validator) != (netuid, window, validator):
            raise PeerListError(
                f"{what} is for netuid {doc.netuid} window {doc.window} by {doc.validator}, "
                f"expected netuid {netuid} window {window} by {validator}"
            )
        try:
            ok = verify(cls.SIGN_PREFIX + doc.digest(), bytes.fromhex(doc.signature), validator)
        except (ValueError, TypeError):
            ok = False
        if not ok:
            raise PeerListError(f"{what} signature does not verify for {validator}")
        return doc


class PeerList(_SignedDoc):
    SIGN_PREFIX: ClassVar[bytes] = b"crucible-peers-v1:"

    primary: list[str] = Field(max_length=1024, description="Primary peers' hotkeys, best first.")
    reserve: list[str] = Field(default_factory=list, max_length=1024, description="Reserve peers, best first.")
    @field_validator("primary", "reserve")
    @classmethod
    def _peers_ss58(cls, value: list[str]) -> list[str]:
        for hotkey in value:
            _check_ss58(hotkey)
        if len(set(value)) != len(value):
            raise ValueError("duplicate hotkey")
        return value

    @property
    def candidates(self) -> list[str]:
        """Every named peer in the order they are tried: primaries, then reserves."""
        return self.primary + [h for h in self.reserve if h not in self.primary]


class AggregateRecord(_SignedDoc):
    SIGN_PREFIX: ClassVar[bytes] = b"crucible-aggregate-v1:"

    peers: list[str] = Field(max_length=1024, description="Hotkeys whose shards were aggregated, sorted.")
    content_hashes: list[str] = Field(max_length=1024, description="Each used shard's content hash, same order.")
    clip_norm: float = Field(ge=0, allow_inf_nan=False, description="Clip norm every node uses for this window.")
    theta_digest: str | None = Field(
        None, pattern=r"^[0-9a-f]{32}$",
        description="param_digest of θ at the start of the window (before this record is applied), as the "
                    "validator held it; None when it did not hold that θ yet when it published.",
    )

    @field_validator("content_hashes")
    @classmethod
    def _hashes(cls, value: list[str]) -> list[str]:
        if not all(isinstance(h, str) and len(h) == 64 and all(c in "0123456789abcdef" for c in h) for h in value):
            raise ValueError("content hashes must be 64 lowercase hex characters")
        return value

    @model_validator(mode="after")
    def _aligned(self) -> AggregateRecord:
        if len(self.content_hashes) != len(self.peers):
            raise ValueError(f"{len(self.peers)} peers but {len(self.content_hashes)} content hashes")
        return self

    @property
    def pinned(self) -> dict[str, str]:
        """hotkey → content hash of every shard the window aggregates."""
        return dict(zip(self.peers, self.content_hashes, strict=True))

    @field_validator("peers")
    @classmethod
    def _sorted_ss58(cls, value: list[str]) -> list[str]:
        for hotkey in value:
            _check_ss58(hotkey)
        if value != sorted(set(value)):
            raise ValueError("peers must be sorted and unique")
        return value


def make_peer_list(keypair: Keypair, netuid: int, window: int, primary: list[str], reserve: list[str]) -> bytes:
    doc = PeerList(netuid=netuid, window=window, validator=keypair.ss58_address,
                   primary=list(primary), reserve=list(reserve))
    return doc.signed(keypair)


def read_peer_list(data: bytes, *, netuid: int, window: int, validator: str) -> PeerList:
    return PeerList.parse(data, netuid=netuid, window=window, validator=validator)
