"""What a bucket reports: object metadata (size, millisecond upload time, ETag) and transfer counters.

Split from storage.py so the metrics exporter and tests can read `StorageStats` without boto3 in sight;
both names are re-exported by transport.bucket.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    last_modified: datetime  # UTC
    etag: str | None = None


class StorageStats:
    """Counters of one Bucket (thread-safe): requests made, retries, payload bytes moved and the
    wall-clock seconds spent in uploads and downloads (retries included)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests = self.retries = self.bytes_uploaded = self.bytes_downloaded = 0
        self.upload_seconds = self.download_seconds = 0.0
        self.by_operation: dict[str, int] = {}

    def add(self, **counts: float) -> None:
        with self._lock:
            for name, n in counts.items():
                setattr(self, name, getattr(self, name) + n)

    @contextlib.contextmanager
    def timed(self, counter: str) -> Iterator[None]:
        """Add the block's wall-clock seconds to `counter` (upload_seconds, download_seconds)."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.add(**{counter: time.perf_counter() - started})

    def request(self, operation: str) -> None:
        with self._lock:
            self.requests += 1
            self.by_operation[operation] = self.by_operation.get(operation, 0) + 1


def utc(value: datetime) -> datetime:
    return value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)


def etag(value: str | None) -> str | None:
    return value.strip('"') if value else None
