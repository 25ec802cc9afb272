"""Large-object transfers: multipart upload, parallel ranged download, and the capped body reader.

Checkpoints run to gigabytes; one PUT or GET of such an object is slow, all-or-nothing on failure,
and single-threaded. Here an object is cut into parts (`StorageConfig.part_size`), each part is its
own retried request, and `max_concurrency` of them run at once. Parts are submitted in order because
rclone's server streams multipart uploads in part order (out-of-order parts wait in its memory).
A failed multipart upload is aborted so no orphaned parts are left billed on the provider.

`read_capped` is the one place a response body is read: never more than `limit + 1` bytes, whatever
Content-Length claims.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from typing import Any, Protocol, TypeVar

from botocore.exceptions import ClientError

from transport.bucket_config import StorageConfig
from transport.bucket_errors import (
    DeadlineExceeded,
    ObjectChanged,
    ObjectTooLarge,
    StorageError,
    TransientError,
    error_code,
)
from transport.bucket_stats import ObjectInfo, StorageStats

T = TypeVar("T")
Progress = Callable[[int, int], None]  # (bytes done, bytes total); called from worker threads, serialised


class Bucket(Protocol):
    """What a transfer needs of `transport.bucket.Bucket` (kept structural: no import circle)."""

    client: Any
    name: str
    storage: StorageConfig
    stats: StorageStats

    def request(self, operation: str, key: str | None, fn: Callable[[], T]) -> T: ...

    def head(self, key: str) -> ObjectInfo: ...

Source = Callable[[int, int], bytes]  # (offset, length) -> exactly that many bytes
Sink = Callable[[int, Any], None]  # (offset, chunk) -> stores the chunk at that offset
CHUNK = 1 << 20


def read_capped(
    body: Any, sink: Sink, *, expected: int, limit: int, where: str, deadline: float | None = None
) -> int:
    """Stream `body` into `sink`, refusing (ObjectTooLarge) past `limit` bytes; returns the byte count.

    `expected` is the declared Content-Length (-1 if unknown): refused up front when above the
    limit, and a body shorter than declared is a transient error (retried). With a `deadline`
    (time.monotonic()), the body is read with `read1` (whatever the socket has, never blocking for
    a full chunk), so a server trickling bytes is cut off at the deadline (DeadlineExceeded) rather
    than holding the thread; each read still waits at most the client's socket read timeout.
    """
    try:
        if expected > limit:
            raise ObjectTooLarge(
                f"{where}: Content-Length {expected} exceeds the limit {limit}; not read",
                size=expected,
                limit=limit,
            )
        total = 0
        raw = getattr(body, "_raw_stream", body)  # botocore's StreamingBody wraps a urllib3 response
        read = raw.read1 if deadline is not None and hasattr(raw, "read1") else body.read
        while True:
            if deadline is not None and time.monotonic() > deadline:
                raise DeadlineExceeded(f"{where}: deadline passed after {total} body bytes")
            chunk = read(min(CHUNK, limit - total + 1))
            if not chunk:
                break
            if total + len(chunk) > limit:
                raise ObjectTooLarge(
                    f"{where}: body exceeds the limit {limit} (Content-Length was "
                    f"{expected}); stopped reading",
                    size=total + len(chunk),
                    limit=limit,
                )
            sink(total, chunk)
            total += len(chunk)
        if 0 <= expected != total:
            raise TransientError(f"{where}: body ended after {total} of {expected} bytes")
        return total
    finally:
        close = getattr(body, "close", None)
        if close is not None:
            close()


class _Tracker:
    """Serialises progress callbacks from worker threads; reports monotonically increasing totals."""

    def __init__(self, total: int, callback: Progress | None) -> None:
        self.total, self.done, self.callback = total, 0, callback
        self._lock = threading.Lock()

    def add(self, n: int) -> None:
        if self.callback is None:
            return
        with self._lock:
            self.done += n
            self.callback(self.done, self.total)


def _parallel(fn: Callable[[int], T], count: int, workers: int) -> list[T]:
    """fn(0..count-1) on a thread pool; the first failure cancels what has not started and is raised."""
    with ThreadPoolExecutor(max_workers=min(workers, count), thread_name_prefix="s3-part") as pool:
        futures = [pool.submit(fn, i) for i in range(count)]
        done, pending = wait(futures, return_when=FIRST_EXCEPTION)
        for f in pending:
            f.cancel()
        for f in futures:
            if f.done() and not f.cancelled() and f.exception() is not None:
                raise f.exception()  # type: ignore[misc]
        return [f.result() for f in futures]


def _ranges(size: int, part: int) -> list[tuple[int, int]]:
    return [(off, min(part, size - off)) for off in range(0, size, part)]


def upload_multipart(bucket: Bucket, key: str, size: int, source: Source, progress: Progress | None) -> None:
    """Upload `size` bytes from `source` to `key` as a multipart upload; aborts it on any failure."""
    client, name = bucket.client, bucket.name
    ranges = _ranges(size, bucket.storage.part_size_for(size))
    created = bucket.request(
        "CreateMultipartUpload", key, lambda: client.create_multipart_upload(Bucket=name, Key=key)
    )
    upload_id = created["UploadId"]
    tracker = _Tracker(size, progress)

    def part(i: int) -> dict[str, Any]:
        off, length = ranges[i]
        body = source(off, length)
        r = bucket.request(
            "UploadPart",
            key,
            lambda: client.upload_part(Bucket=name, Key=key, UploadId=upload_id, PartNumber=i + 1, Body=body),
        )
        bucket.stats.add(bytes_uploaded=length)
        tracker.add(length)
        return {"PartNumber": i + 1, "ETag": r["ETag"]}

    attempts = 0

    def complete() -> None:
        nonlocal attempts
        attempts += 1
        try:
            client.complete_multipart_upload(
                Bucket=name, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}
            )
        except ClientError as exc:
            # An earlier attempt may have completed with its answer lost; then the object is there.
            if attempts > 1 and error_code(exc)[0] == "NoSuchUpload" and bucket.head(key).size == size:
                return
            raise

    try:
        parts = _parallel(part, len(ranges), bucket.storage.max_concurrency)
        bucket.request("CompleteMultipartUpload", key, complete)
    except BaseException:
        try:
            client.abort_multipart_upload(Bucket=name, Key=key, UploadId=upload_id)
        except Exception:  # noqa: BLE001 - best effort; the provider expires orphaned uploads anyway
            pass
        raise


def download_ranges(bucket: Bucket, info: ObjectInfo, sink: Sink, progress: Progress | None) -> None:
    """Download `info.key` in parallel byte ranges into `sink`; every range must match `info.etag`."""
    client, name, key = bucket.client, bucket.name, info.key
    ranges = _ranges(info.size, bucket.storage.part_size_for(info.size))
    tracker = _Tracker(info.size, progress)
    where = f"GetObject s3://{name}/{key}"

    def part(i: int) -> None:
        off, length = ranges[i]

        def once() -> None:
            kw: dict[str, Any] = {"Bucket": name, "Key": key, "Range": f"bytes={off}-{off + length - 1}"}
            if info.etag:
                kw["IfMatch"] = f'"{info.etag}"'
            r = client.get_object(**kw)
            etag = (r.get("ETag") or "").strip('"')
            if (info.etag and etag and etag != info.etag) or int(r.get("ContentLength", length)) != length:
                r["Body"].close()
                raise ObjectChanged(
                    f"{where}: object changed during the ranged download", bucket=name, key=key
                )
            read_capped(
                r["Body"], lambda o, chunk: sink(off + o, chunk), expected=length, limit=length, where=where
            )

        bucket.request("GetObject", key, once)
        bucket.stats.add(bytes_downloaded=length)
        tracker.add(length)

    _parallel(part, len(ranges), bucket.storage.max_concurrency)


__all__ = ["CHUNK", "Sink", "Source", "StorageError", "download_ranges", "read_capped", "upload_multipart"]
