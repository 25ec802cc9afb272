"""How this node talks to buckets: timeouts, retries, multipart sizes (local tuning, not hparams).

Every node may tune these for its own link; none of them changes what other participants see, so
they are not network hyperparameters and not part of `protocol/`.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from protocol.storage_config import S3_MIN_PART, MiB

S3_MAX_PARTS = 10_000


class StorageConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    connect_timeout_s: float = Field(5.0, gt=0, description="TCP connect timeout per request (seconds).")
    read_timeout_s: float = Field(60.0, gt=0, description="Socket read timeout per request (seconds).")
    max_attempts: int = Field(5, ge=1, le=1000, description="Attempts per request, first one included.")
    backoff_base_s: float = Field(
        0.5, ge=0, description="Wait after the first transient failure (doubles each time)."
    )
    backoff_max_s: float = Field(20.0, ge=0, description="Cap on the wait between two attempts.")
    multipart_threshold: int = Field(
        64 * MiB,
        ge=S3_MIN_PART,
        description="Objects of at least this many bytes "
        "are uploaded in parts and downloaded in parallel ranges.",
    )
    part_size: int = Field(
        16 * MiB,
        ge=S3_MIN_PART,
        le=5 << 30,
        description="Bytes per multipart part / range "
        "(raised automatically if an object would need more than 10,000 parts).",
    )
    max_concurrency: int = Field(
        8, ge=1, le=64, description="Parallel part uploads / range downloads per object."
    )
    list_page_size: int = Field(1000, ge=1, le=1000, description="Keys per ListObjectsV2 page.")
    delete_batch_size: int = Field(1000, ge=1, le=1000, description="Keys per DeleteObjects request.")

    @model_validator(mode="after")
    def _backoff_order(self) -> StorageConfig:
        if self.backoff_max_s < self.backoff_base_s:
            raise ValueError("backoff_max_s must be ≥ backoff_base_s")
        return self

    def part_size_for(self, size: int) -> int:
        """The part size to use for an object of `size` bytes (at most 10,000 parts)."""
        return max(self.part_size, -(-size // S3_MAX_PARTS))
