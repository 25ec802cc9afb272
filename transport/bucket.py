"""S3-compatible buckets (AWS, Cloudflare R2, the devnet's rclone server) through boto3.

Every participant talks to buckets only through `Bucket`: put/get/head/list/delete with typed errors,
an explicit retry loop (`bucket_errors`), size caps checked before any body byte is read, multipart
upload and parallel ranged download for large objects (`bucket_transfer`), and the retention cleanup.
The key layout is part of the contract (`protocol.storage_keys`), and so is a bucket's address
(`protocol.storage_config.BucketConfig`); this node's transport knobs are `bucket_config.StorageConfig`.

    bucket = Bucket(creds.write_config())
    bucket.put(gradient_key(w, hotkey), shard_bytes)
    data = Bucket(peer_creds.read).get(gradient_key(w, peer), max_bytes=limit)

One boto3 client per Bucket; boto3 clients are thread-safe, so a Bucket may be shared by threads.
"""

from __future__ import annotations

import builtins
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import boto3
from botocore.config import Config

from protocol.storage_config import BucketConfig, BucketCredentials
from protocol.storage_keys import (
    CHECKPOINT_CONFIG_FILE,
    CHECKPOINT_MODEL_FILE,
    WINDOWED_KINDS,
    KeyKind,
    parse_key,
    window_of_key,
)
from transport.bucket_config import StorageConfig
from transport.bucket_errors import (
    AccessDenied,
    BucketNotFound,
    DeadlineExceeded,
    ObjectChanged,
    ObjectNotFound,
    ObjectTooLarge,
    RetryPolicy,
    StorageError,
    StorageUnavailable,
    call_with_retry,
)
from transport.bucket_stats import ObjectInfo, StorageStats, etag, utc
from transport.bucket_transfer import Progress, Sink, Source, download_ranges, read_capped, upload_multipart
from transport.endpoint_guard import guard_client

__all__ = [
    "AccessDenied",
    "Bucket",
    "BucketConfig",
    "BucketCredentials",
    "BucketNotFound",
    "DeadlineExceeded",
    "ObjectChanged",
    "ObjectInfo",
    "ObjectNotFound",
    "ObjectTooLarge",
    "Progress",
    "StorageConfig",
    "StorageError",
    "StorageStats",
    "StorageUnavailable",
    "open_bucket",
    "read_capped",
]

log = logging.getLogger(__name__)
T = TypeVar("T")
# The files without which a checkpoint window cannot be loaded (`neurons.catchup.load_latest_checkpoint`).
COMPLETE_CHECKPOINT = frozenset({CHECKPOINT_MODEL_FILE, CHECKPOINT_CONFIG_FILE})


class Bucket:
    """One bucket, one key pair, one boto3 client. All methods are blocking and thread-safe."""

    def __init__(self, config: BucketConfig, storage: StorageConfig | None = None) -> None:
        self.config = config
        self.storage = storage or StorageConfig()
        self.name = config.bucket
        self.stats = StorageStats()
        self._secret = config.secret_access_key.get_secret_value()
        self._policy = RetryPolicy(
            self.storage.max_attempts, self.storage.backoff_base_s, self.storage.backoff_max_s
        )
        botocfg = Config(
            signature_version="s3v4",
            s3={"addressing_style": "path" if config.endpoint_url else "auto"},
            connect_timeout=self.storage.connect_timeout_s,
            read_timeout=self.storage.read_timeout_s,
            retries={"total_max_attempts": 1, "mode": "standard"},  # our own loop retries, see storage_errors
            max_pool_connections=self.storage.max_concurrency + 2,
            # Whole-object checksums on ranged reads and CRC trailers on writes break R2 and rclone.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        self.client: Any = boto3.session.Session().client(
            "s3",
            endpoint_url=config.endpoint_url,
            region_name=config.region,
            config=botocfg,
            aws_access_key_id=config.access_key_id,
            aws_secret_access_key=self._secret,
        )
        if config.endpoint_allowance is not None:  # a committed endpoint: resolve, check, pin (endpoint_guard)
            guard_client(self.client, config.endpoint_allowance, self.storage.connect_timeout_s)

    def __repr__(self) -> str:
        return f"Bucket({self.name!r} at {self.config.endpoint_url or 'aws'})"

    # -- the retried request -------------------------------------------------------------------------

    def _redact(self, text: str) -> str:
        return text.replace(self._secret, "***") if self._secret else text

    def request(self, operation: str, key: str | None, fn: Callable[[], T], deadline: float | None = None) -> T:
        def attempt() -> T:
            self.stats.request(operation)
            return fn()

        where = f"{operation} s3://{self.name}/{key or ''}"
        return call_with_retry(
            attempt,
            policy=self._policy,
            where=where,
            bucket=self.name,
            key=key,
            redact=self._redact,
            on_retry=lambda n, e: self.stats.add(retries=1),
            deadline=deadline,
        )

    def _not_found(self, err: ObjectNotFound) -> StorageError:
        """HEAD answers a bare 404 for a missing bucket too; tell the two apart (error path only)."""
        try:
            self.request("HeadBucket", None, lambda: self.client.head_bucket(Bucket=self.name))
        except ObjectNotFound:
            return BucketNotFound(
                f"HeadObject s3://{self.name}/{err.key}: bucket '{self.name}' does not exist",
                bucket=self.name,
                key=err.key,
                code="NoSuchBucket",
            )
        except StorageError:
            pass
        return err

    # -- single objects ------------------------------------------------------------------------------

    def head(self, key: str) -> ObjectInfo:
        """Size, last-modified time (UTC) and ETag of an object, without its body."""
        try:
            r = self.request("HeadObject", key, lambda: self.client.head_object(Bucket=self.name, Key=key))
        except ObjectNotFound as err:
            raise self._not_found(err) from None
        return ObjectInfo(key, int(r["ContentLength"]), utc(r["LastModified"]), etag(r.get("ETag")))

    def stat(self, key: str) -> ObjectInfo:
        """`head`, with the upload time to the millisecond: listings carry milliseconds, the HEAD
        Last-Modified header whole seconds only, too coarse to tell an original from a fast copy."""
        kw = {"Bucket": self.name, "Prefix": key, "MaxKeys": 1}  # the exact key sorts first
        page = self.request("ListObjectsV2", key, lambda: self.client.list_objects_v2(**kw))
        for o in page.get("Contents", []):
            if o["Key"] == key:
                return ObjectInfo(key, int(o["Size"]), utc(o["LastModified"]), etag(o.get("ETag")))
        return self.head(key)  # not listed (yet): HEAD answers, or raises ObjectNotFound

    def exists(self, key: str) -> bool:
        try:
            self.head(key)
            return True
        except ObjectNotFound:
            return False

    def put(self, key: str, data: bytes | bytearray | memoryview, progress: Progress | None = None) -> None:
        """Store `data` at `key` (multipart above the threshold); replaces any object there."""
        if isinstance(data, bytes):  # slicing the whole of a bytes object copies nothing
            self._upload(key, len(data), lambda off, n: data[off : off + n], progress)
            return
        view = memoryview(data).cast("B")
        self._upload(key, len(view), lambda off, n: bytes(view[off : off + n]), progress)

    def put_file(self, key: str, path: str | Path, progress: Progress | None = None) -> None:
        """Upload a file without loading it whole into memory when it is large."""
        with open(path, "rb") as f:
            size = Path(path).stat().st_size
            self._upload(key, size, lambda off, n: _pread(f, n, off), progress)

    def get(self, key: str, max_bytes: int, progress: Progress | None = None) -> bytes:
        """The object's bytes; `ObjectTooLarge` above `max_bytes`, checked before any body byte is read."""
        info = self._checked_head(key, max_bytes)
        buf = bytearray(info.size)
        view = memoryview(buf)

        def write(off: int, chunk: bytes | memoryview) -> None:
            if off + len(chunk) > info.size:
                raise ObjectChanged(
                    f"GetObject s3://{self.name}/{key}: object grew after HEAD", bucket=self.name, key=key
                )
            view[off : off + len(chunk)] = chunk

        self._download(info, max_bytes, write, progress)
        return bytes(buf)

    def fetch(self, key: str, max_bytes: int, deadline: float, first_bytes: int | None = None,
              offset: int = 0) -> bytes:
        """An untrusted peer's object in ONE GET (no listing, no HEAD), read by `deadline` or not at all.

        `deadline` is a `time.monotonic()` instant covering every attempt, the headers and the whole
        body (DeadlineExceeded otherwise); `max_bytes` caps the body whatever Content-Length says;
        `first_bytes` asks for a prefix only (a Range request; a server ignoring Range is capped the same);
        with `offset`, the `first_bytes` bytes from there (a server ignoring that Range is an error).
        """
        where = f"GetObject s3://{self.name}/{key}"
        limit = max_bytes if first_bytes is None else min(max_bytes, first_bytes)
        kw: dict[str, Any] = {"Bucket": self.name, "Key": key}
        if first_bytes is not None:
            kw["Range"] = f"bytes={offset}-{offset + first_bytes - 1}"
        elif offset:
            raise ValueError("a ranged fetch from an offset needs first_bytes")

        def once() -> bytes:
            if time.monotonic() > deadline:
                raise DeadlineExceeded(f"{where}: deadline passed before the request", bucket=self.name, key=key)
            r = self.client.get_object(**kw)
            buf = bytearray()
            if first_bytes is None:
                got = read_capped(r["Body"], lambda off, chunk: buf.extend(chunk),
                                  expected=int(r.get("ContentLength", -1)), limit=max_bytes, where=where,
                                  deadline=deadline)
            else:
                if offset and "ContentRange" not in r:
                    r["Body"].close()
                    raise StorageError(f"{where}: the server ignored the Range from byte {offset}",
                                       bucket=self.name, key=key)
                got = _read_prefix(r["Body"], buf, limit, where, deadline)
            self.stats.add(bytes_downloaded=got)
            return bytes(buf)

        with self.stats.timed("download_seconds"):
            return self.request("GetObject", key, once, deadline=deadline)

    def get_file(self, key: str, path: str | Path, max_bytes: int, progress: Progress | None = None) -> int:
        """Download to `path` atomically (temp file, then rename); returns the size."""
        info = self._checked_head(key, max_bytes)
        path = Path(path)
        tmp = path.with_name(path.name + ".part")
        try:
            with open(tmp, "wb") as f:
                f.truncate(info.size)
                fd = f.fileno()
                self._download(info, max_bytes, lambda off, chunk: _pwrite(fd, chunk, off), progress)
            tmp.replace(path)
        finally:
            tmp.unlink(missing_ok=True)
        return info.size

    def delete(self, key: str) -> None:
        """Delete one object; deleting a missing key is not an error (S3 semantics)."""
        self.request("DeleteObject", key, lambda: self.client.delete_object(Bucket=self.name, Key=key))

    def delete_many(self, keys: builtins.list[str]) -> None:
        """Delete keys in DeleteObjects batches; any per-key failure raises StorageError."""
        step = self.storage.delete_batch_size
        for i in range(0, len(keys), step):
            batch = {"Objects": [{"Key": k} for k in keys[i : i + step]], "Quiet": True}
            r = self.request(
                "DeleteObjects", None, lambda b=batch: self.client.delete_objects(Bucket=self.name, Delete=b)
            )
            if r.get("Errors"):
                first = r["Errors"][0]
                raise StorageError(
                    f"DeleteObjects s3://{self.name}: {len(r['Errors'])} keys failed, first "
                    f"{first.get('Key')!r}: {first.get('Code')}",
                    bucket=self.name,
                    code=first.get("Code"),
                )

    # -- listing and cleanup -------------------------------------------------------------------------

    def iter_objects(self, prefix: str = "", max_objects: int | None = None) -> Iterator[ObjectInfo]:
        """Every object under `prefix`, page by page (each page retried on its own).

        A server whose pages do not advance, or (with `max_objects`) a listing longer than that, is
        an error rather than an endless loop: buckets of other participants are untrusted.
        """
        token: str | None = None
        seen_tokens: set[str] = set()
        count = 0
        while True:
            kw: dict[str, Any] = {
                "Bucket": self.name,
                "Prefix": prefix,
                "MaxKeys": self.storage.list_page_size,
            }
            if token:
                kw["ContinuationToken"] = token
            page = self.request("ListObjectsV2", prefix, lambda kw=kw: self.client.list_objects_v2(**kw))
            for o in page.get("Contents", []):
                count += 1
                if max_objects is not None and count > max_objects:
                    raise StorageError(
                        f"ListObjectsV2 s3://{self.name}/{prefix}: more than {max_objects} objects",
                        bucket=self.name,
                        key=prefix,
                    )
                yield ObjectInfo(o["Key"], int(o["Size"]), utc(o["LastModified"]), etag(o.get("ETag")))
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return
            if token in seen_tokens:
                raise StorageError(
                    f"ListObjectsV2 s3://{self.name}/{prefix}: listing does not advance",
                    bucket=self.name,
                    key=prefix,
                )
            seen_tokens.add(token)

    def list(self, prefix: str = "", max_objects: int | None = None) -> builtins.list[ObjectInfo]:
        return builtins.list(self.iter_objects(prefix, max_objects))

    def windows(self, kind: KeyKind) -> builtins.list[int]:
        """Sorted windows for which this bucket holds objects of `kind` (e.g. checkpoints)."""
        return sorted({w for o in self.iter_objects(f"{kind}/") if (w := window_of_key(o.key)) is not None})

    def cleanup(
        self, current_window: int, retention_windows: int, keep_latest_checkpoint: bool = True
    ) -> builtins.list[str]:
        """Delete windowed objects of every kind from windows before `current_window - retention_windows`.

        Dataset objects and keys outside the layout are never touched. The newest *complete* checkpoint
        (a window holding both model.safetensors and config.json, what `load_latest_checkpoint` can load)
        is kept even when it is older than the retention (a late joiner needs some starting point), and so
        is every window since (a replay from it needs those records and mirrored shards: a validator that
        published no checkpoint for a while must not delete them); a newer window holding only part of a
        checkpoint (a publish that failed halfway) does not count.
        Returns the deleted keys; a bucket error is a StorageError.
        """
        if retention_windows < 0:
            raise ValueError("retention_windows must be ≥ 0")
        cutoff = current_window - retention_windows
        old: builtins.list[tuple[tuple[KeyKind, int], str]] = []
        checkpoint_files: dict[int, set[str]] = {}
        for kind in WINDOWED_KINDS:
            for o in self.iter_objects(f"{kind}/"):
                parsed = parse_key(o.key)
                if parsed is None or parsed.window is None:
                    continue
                if parsed.kind is KeyKind.CHECKPOINT and parsed.name is not None:
                    checkpoint_files.setdefault(parsed.window, set()).add(parsed.name)
                if parsed.window < cutoff:
                    old.append(((parsed.kind, parsed.window), o.key))
        if keep_latest_checkpoint:
            complete = [w for w, names in checkpoint_files.items() if COMPLETE_CHECKPOINT <= names]
            if complete:  # keep it, and every window since: a replay from it needs their records and mirrors
                cutoff = min(cutoff, max(complete))
                old = [(pw, k) for pw, k in old if pw[1] < cutoff]
        keys = [k for _, k in old]
        self.delete_many(keys)
        if keys:
            log.info("cleanup s3://%s: deleted %d objects from windows < %d", self.name, len(keys), cutoff)
        return keys

    # -- transfers -----------------------------------------------------------------------------------

    def _checked_head(self, key: str, max_bytes: int) -> ObjectInfo:
        info = self.head(key)
        if info.size > max_bytes:
            raise ObjectTooLarge(
                f"GetObject s3://{self.name}/{key}: object is {info.size} bytes, limit "
                f"{max_bytes}; not downloaded",
                size=info.size,
                limit=max_bytes,
                bucket=self.name,
                key=key,
            )
        return info

    def _upload(self, key: str, size: int, source: Source, progress: Progress | None) -> None:
        with self.stats.timed("upload_seconds"):
            self._upload_body(key, size, source, progress)

    def _upload_body(self, key: str, size: int, source: Source, progress: Progress | None) -> None:
        if size < self.storage.multipart_threshold:
            body = source(0, size)
            self.request(
                "PutObject", key, lambda: self.client.put_object(Bucket=self.name, Key=key, Body=body)
            )
            self.stats.add(bytes_uploaded=size)
            if progress:
                progress(size, size)
            return
        upload_multipart(self, key, size, source, progress)

    def _download(self, info: ObjectInfo, max_bytes: int, sink: Sink, progress: Progress | None) -> None:
        with self.stats.timed("download_seconds"):
            self._download_body(info, max_bytes, sink, progress)

    def _download_body(self, info: ObjectInfo, max_bytes: int, sink: Sink, progress: Progress | None) -> None:
        if info.size >= self.storage.multipart_threshold:
            download_ranges(self, info, sink, progress)
            return

        where = f"GetObject s3://{self.name}/{info.key}"

        def once() -> None:
            r = self.client.get_object(Bucket=self.name, Key=info.key)
            declared = int(r.get("ContentLength", -1))
            if 0 <= declared <= max_bytes and declared != info.size:
                r["Body"].close()
                raise ObjectChanged(
                    f"{where}: replaced after HEAD ({info.size} -> {declared} bytes)",
                    bucket=self.name,
                    key=info.key,
                )
            got = read_capped(r["Body"], sink, expected=declared, limit=max_bytes, where=where)
            if got != info.size:
                raise ObjectChanged(
                    f"{where}: read {got} bytes, HEAD said {info.size}", bucket=self.name, key=info.key
                )
            self.stats.add(bytes_downloaded=got)

        self.request("GetObject", info.key, once)
        if progress:
            progress(info.size, info.size)


def _read_prefix(body: Any, buf: bytearray, limit: int, where: str, deadline: float) -> int:
    """Read at most `limit` bytes of `body` into `buf` by `deadline`; the rest is not read."""
    raw = getattr(body, "_raw_stream", body)
    read = raw.read1 if hasattr(raw, "read1") else body.read
    try:
        while len(buf) < limit:
            if time.monotonic() > deadline:
                raise DeadlineExceeded(f"{where}: deadline passed after {len(buf)} bytes")
            chunk = read(limit - len(buf))
            if not chunk:
                break
            buf.extend(chunk[: limit - len(buf)])
        return len(buf)
    finally:
        body.close()


def _pread(f: BinaryIO, n: int, off: int) -> bytes:
    data = os.pread(f.fileno(), n, off)
    if len(data) != n:
        raise StorageError(f"file shrank while uploading: wanted {n} bytes at {off}, got {len(data)}")
    return data


def _pwrite(fd: int, chunk: bytes | memoryview, off: int) -> None:
    view = memoryview(chunk)
    while view:
        n = os.pwrite(fd, view, off)
        view, off = view[n:], off + n


def open_bucket(
    creds: BucketCredentials, write: bool = False, storage: StorageConfig | None = None
) -> Bucket:
    """A Bucket over the read pair, or the write pair when `write`."""
    return Bucket(creds.write_config() if write else creds.read, storage)
