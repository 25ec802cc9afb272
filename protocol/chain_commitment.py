"""Bucket read credentials as an on-chain commitment: a compact, versioned, strictly parsed string.

Every miner publishes where its shards can be read — endpoint, region, bucket, a read-only access key
id and its secret — in the Commitments pallet, so any validator (and any peer) can download them.
Only read credentials ever go on chain. The wire form is

    c1|<endpoint>|<region>|<bucket>|<access_key_id>|<secret>

UTF-8, split into `Raw` data fields of at most 128 bytes (the pallet's largest `Data` variant);
the SDK's commitment reader concatenates them back. Commitments are written by strangers, so
`parse_credentials` accepts only this exact shape and raises `CommitmentParseError` with a reason
for anything else; it never trusts lengths, schemes or characters it did not check.

The endpoint is a stranger's choice too: `parse_credentials` applies the endpoint policy
(`protocol.endpoint_policy`, docs/protocol.md §5) under the network's allowance, strict unless the
caller passes the hparams' (`HParams.endpoints.allowance()`), so a commitment naming loopback,
link-local, private or other non-public addresses, in any spelling, or plain http, is refused
with its reason (`transport.chain.Chain.read_credentials` files it under the uid in
`CredentialsRead.errors`). The accepted credentials remember that allowance and hand it to their
`BucketConfig`, so the transport checks the resolved address against the same rule before connecting.
"""

from __future__ import annotations

import re
from urllib.parse import urlparse

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from protocol.endpoint_policy import STRICT, EndpointAllowance, endpoint_problem
from protocol.storage_config import BucketConfig

COMMITMENT_VERSION = "c1"
RAW_FIELD_MAX = 128  # bytes in the pallet's largest Raw variant (Raw128)
_SEP = "|"
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
_REGION_RE = re.compile(r"^[a-z0-9\-]{1,32}$")
_KEY_ID_RE = re.compile(r"^[A-Za-z0-9_+/=-]{16,128}$")  # what storage_config.BucketConfig accepts
_SECRET_RE = re.compile(r"^[A-Za-z0-9_+/=.-]{16,128}$")


class CommitmentParseError(ValueError):
    """Someone's commitment is not valid `c1` bucket credentials; the message says why."""


class ReadCredentials(BaseModel):
    """Read access to one participant's bucket, as published on chain (the secret never prints).

    The on-chain twin of `protocol.storage_config.BucketConfig` (read pair only): `bucket_config()`
    and `from_bucket_config()` convert, and anything this class accepts, BucketConfig accepts too.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")
    endpoint: str = Field(description="S3 endpoint URL, http(s)://host[:port], no path.")
    region: str = Field("auto", description="S3 region name (R2 uses 'auto').")
    bucket: str = Field(description="Bucket name (S3 naming rules).")
    access_key_id: str = Field(description="Read-only access key id.")
    secret_access_key: SecretStr = Field(description="Secret of the read-only access key.")
    endpoint_allowance: EndpointAllowance | None = Field(
        None, exclude=True, repr=False,
        description="The allowance the endpoint was accepted under (parse_credentials sets it); None: "
        "built locally, not checked. Passed on to bucket_config(); ignored by ==.",
    )

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, v: str) -> str:
        try:
            url = urlparse(v)
            port = url.port  # raises on a malformed port
        except ValueError as exc:
            raise ValueError(f"endpoint is not a URL: {exc}") from None
        if url.scheme not in ("http", "https") or not url.hostname or url.path not in ("", "/"):
            raise ValueError("endpoint must be http(s)://host[:port] without a path")
        if url.query or url.fragment or url.username or url.password or _SEP in v or len(v) > 256:
            raise ValueError("endpoint must not carry credentials, a query, a fragment or '|'")
        if port is not None and not 0 < port < 65536:
            raise ValueError("endpoint port out of range")
        return v.rstrip("/")

    @field_validator("region")
    @classmethod
    def _region(cls, v: str) -> str:
        if not _REGION_RE.match(v):
            raise ValueError("region must be 1-32 characters of [a-z0-9-]")
        return v

    @field_validator("bucket")
    @classmethod
    def _bucket(cls, v: str) -> str:
        if not _BUCKET_RE.match(v) or ".." in v:
            raise ValueError("bucket must follow S3 naming: 3-63 of [a-z0-9.-], alphanumeric at both ends")
        return v

    @field_validator("access_key_id")
    @classmethod
    def _access_key(cls, v: str) -> str:
        if not _KEY_ID_RE.match(v):
            raise ValueError("access key id must be 16-128 characters of [A-Za-z0-9_+/=-]")
        return v

    @field_validator("secret_access_key")
    @classmethod
    def _secret(cls, v: SecretStr) -> SecretStr:
        if not _SECRET_RE.match(v.get_secret_value()):
            raise ValueError("secret must be 16-128 characters of [A-Za-z0-9_+/=.-]")
        return v

    def secret(self) -> str:
        return self.secret_access_key.get_secret_value()

    def __eq__(self, other: object) -> bool:
        """What is on chain decides equality; the allowance it was read under does not."""
        if not isinstance(other, ReadCredentials):
            return NotImplemented
        return encode_credentials(self) == encode_credentials(other)

    def __hash__(self) -> int:
        return hash(encode_credentials(self))

    def bucket_config(self) -> BucketConfig:
        """The storage layer's view of this bucket (read-only key pair), checked under the same allowance."""
        return BucketConfig(endpoint_url=self.endpoint, region=self.region, bucket=self.bucket,
                            access_key_id=self.access_key_id, secret_access_key=self.secret_access_key,
                            endpoint_allowance=self.endpoint_allowance)

    @classmethod
    def from_bucket_config(cls, cfg: BucketConfig) -> ReadCredentials:
        """What to publish for a bucket: pass the READ pair only (`BucketCredentials.read`), never the write one."""
        endpoint = cfg.endpoint_url or f"https://s3.{cfg.region}.amazonaws.com"
        return cls(endpoint=endpoint, region=cfg.region, bucket=cfg.bucket, access_key_id=cfg.access_key_id,
                   secret_access_key=cfg.secret_access_key, endpoint_allowance=cfg.endpoint_allowance)


def encode_credentials(creds: ReadCredentials) -> str:
    parts = [COMMITMENT_VERSION, creds.endpoint, creds.region, creds.bucket, creds.access_key_id, creds.secret()]
    return _SEP.join(parts)


def parse_credentials(text: str | None, max_bytes: int | None = None,
                      allowance: EndpointAllowance = STRICT) -> ReadCredentials:
    """Strictly parse a commitment string; CommitmentParseError with a one-line reason otherwise.

    The endpoint must pass the endpoint policy under `allowance` (strict by default: https:// and a
    public address or DNS name); the result carries `allowance` on to its `bucket_config()`.
    """
    if text is None or text == "":
        raise CommitmentParseError("no commitment")
    if not isinstance(text, str):
        raise CommitmentParseError(f"commitment is a {type(text).__name__}, not text")
    size = len(text.encode("utf-8", errors="replace"))
    if max_bytes is not None and size > max_bytes:
        raise CommitmentParseError(f"commitment is {size} bytes, more than {max_bytes}")
    parts = text.split(_SEP)
    if parts[0] != COMMITMENT_VERSION:
        shown = parts[0][:12].encode("unicode_escape").decode()
        raise CommitmentParseError(f"unknown commitment version {shown!r} (expected {COMMITMENT_VERSION!r})")
    if len(parts) != 6:
        raise CommitmentParseError(f"{COMMITMENT_VERSION} commitment needs 6 '|'-separated parts, got {len(parts)}")
    _, endpoint, region, bucket, access_key_id, secret = parts
    try:
        creds = ReadCredentials(endpoint=endpoint, region=region, bucket=bucket, access_key_id=access_key_id,
                                secret_access_key=SecretStr(secret))
        if (problem := endpoint_problem(creds.endpoint, allowance)) is not None:
            raise CommitmentParseError(problem)
        creds = creds.model_copy(update={"endpoint_allowance": allowance})
        creds.bucket_config()  # the storage layer must accept whatever we hand it
        return creds
    except CommitmentParseError:
        raise
    except ValueError as exc:  # pydantic.ValidationError is a ValueError
        first = exc.errors()[0] if hasattr(exc, "errors") else {"loc": (), "msg": "rejected by the storage layer"}
        where = ".".join(str(p) for p in first["loc"]) or "commitment"
        raise CommitmentParseError(f"{where}: {first['msg']}") from None


def commitment_fields(text: str, max_fields: int) -> list[dict[str, bytes]]:
    """`CommitmentInfo.fields` for `text`: Raw chunks of ≤128 bytes; ValueError when it cannot fit."""
    data = text.encode("utf-8")
    if not data:
        raise ValueError("empty commitment")
    chunks = [data[i : i + RAW_FIELD_MAX] for i in range(0, len(data), RAW_FIELD_MAX)]
    if len(chunks) > max_fields:
        raise ValueError(
            f"commitment is {len(data)} bytes; the chain holds at most {max_fields} × {RAW_FIELD_MAX} bytes"
        )
    return [{f"Raw{len(c)}": c} for c in chunks]
