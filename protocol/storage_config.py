"""Typed configuration of bucket access: where a bucket is, who may read or write it, how we talk to it.

`BucketConfig` is one bucket with one key pair (R2 through `BucketConfig.for_r2`). A participant
holds `BucketCredentials`: a read pair and a write pair for its own bucket. Only the read-only view
(`BucketCredentials.read_only`) ever leaves the machine, as the chain commitment (see
`protocol.chain_commitment`) others use to
download from it; the write secret stays local. Secrets are `SecretStr` and validation errors never
echo inputs, so neither printing a config nor a bad value can leak a secret.

Whose endpoint may be trusted how far travels with the config: `endpoint_allowance` is None for a
bucket this machine's operator or code configured directly (not checked), and set for every bucket
read from a chain commitment (`protocol.chain_commitment.parse_credentials`: the network's
allowance) and for the node's own bucket (`neurons.node_config.bucket_credentials`). A config with
an allowance is checked against it when it is built (`protocol.endpoint_policy`) and again, after
resolving the name, before every new connection (`transport.endpoint_guard`). The allowance is not
part of a bucket's identity: two configs naming the same bucket with the same keys are equal.

The transport knobs of a node (timeouts, retries, multipart sizes) are local tuning, not part of
the contract: they are `transport.bucket_config.StorageConfig`.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)

from protocol.endpoint_policy import EndpointAllowance, endpoint_problem

MiB = 1 << 20
S3_MIN_PART = 5 * MiB  # S3 and R2 refuse multipart parts below 5 MiB (except the last)

_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_R2_ACCOUNT_RE = re.compile(r"[0-9a-f]{32}")


def check_bucket_name(name: str) -> str:
    """`name` if it is a valid S3 bucket name, else ValueError."""
    if not isinstance(name, str) or not _BUCKET_RE.fullmatch(name) or ".." in name:
        raise ValueError("bucket name must be 3-63 chars of a-z, 0-9, '.', '-'")
    return name


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)


class BucketConfig(_Frozen):
    endpoint_url: str | None = Field(
        None,
        description="S3 endpoint, e.g. http://127.0.0.1:9000 or https://ACCOUNT.r2.cloudflarestorage.com; "
        "None means AWS S3 itself.",
    )
    region: str = Field(
        "us-east-1", min_length=1, max_length=32, description="Signing region ('auto' on R2)."
    )
    bucket: str = Field(description="Bucket name (3-63 chars of a-z, 0-9, '.', '-').")
    access_key_id: str = Field(
        min_length=16,
        max_length=128,
        pattern=r"^[A-Za-z0-9_+/=-]+$",
        description="Access key id (not secret, but never logged either).",
    )
    secret_access_key: SecretStr = Field(
        min_length=16, max_length=256, description="Secret key; never printed."
    )
    endpoint_allowance: EndpointAllowance | None = Field(
        None,
        exclude=True,
        repr=False,
        description="How far the endpoint is trusted (protocol.endpoint_policy); None: configured "
        "locally, not checked. Not part of the bucket's identity (ignored by ==).",
    )

    @field_validator("bucket")
    @classmethod
    def _bucket_name(cls, v: str) -> str:
        return check_bucket_name(v)

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint(cls, v: str | None) -> str | None:
        if v is None:
            return v
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("endpoint_url must be an http(s) URL with a host")
        if parts.username or parts.password or parts.query or parts.fragment or parts.path not in ("", "/"):
            raise ValueError("endpoint_url must be scheme://host[:port] only")
        return v.rstrip("/")

    @model_validator(mode="after")
    def _endpoint_allowed(self) -> BucketConfig:
        if self.endpoint_allowance is not None and self.endpoint_url is not None:
            problem = endpoint_problem(self.endpoint_url, self.endpoint_allowance)
            if problem is not None:
                raise ValueError(problem)
        return self

    def _identity(self) -> tuple[str | None, str, str, str, str]:
        return (self.endpoint_url, self.region, self.bucket, self.access_key_id,
                self.secret_access_key.get_secret_value())

    def __eq__(self, other: object) -> bool:
        """Same bucket, same keys; the allowance says how far THIS machine trusts the address, not which bucket."""
        if not isinstance(other, BucketConfig):
            return NotImplemented
        return self._identity() == other._identity()

    def __hash__(self) -> int:
        return hash(self._identity())

    @classmethod
    def for_r2(cls, account_id: str, bucket: str, access_key_id: str, secret_access_key: str) -> BucketConfig:
        """A Cloudflare R2 bucket: endpoint derived from the account id, region 'auto'."""
        if not _R2_ACCOUNT_RE.fullmatch(account_id):
            raise ValueError("R2 account id must be 32 lowercase hex chars")
        return cls(
            endpoint_url=f"https://{account_id}.r2.cloudflarestorage.com",
            region="auto",
            bucket=bucket,
            access_key_id=access_key_id,
            secret_access_key=SecretStr(secret_access_key),
        )

    def same_bucket(self, other: BucketConfig) -> bool:
        return (self.endpoint_url, self.region, self.bucket) == (
            other.endpoint_url,
            other.region,
            other.bucket,
        )


class BucketCredentials(_Frozen):
    read: BucketConfig = Field(description="Read-only key pair: published on chain for others to download.")
    write: BucketConfig | None = Field(
        None, description="Write key pair: stays on this machine, never published."
    )

    @model_validator(mode="after")
    def _one_bucket(self) -> BucketCredentials:
        if self.write is not None and not self.write.same_bucket(self.read):
            raise ValueError("read and write credentials must name the same endpoint, region and bucket")
        return self

    def read_only(self) -> BucketCredentials:
        """The view that may leave this machine: the write pair dropped."""
        return BucketCredentials(read=self.read)

    def write_config(self) -> BucketConfig:
        if self.write is None:
            raise ValueError(f"no write credentials for bucket '{self.read.bucket}'")
        return self.write
