"""Typed storage errors and the one retry loop every bucket request goes through.

botocore's own retries are switched off so that what is retried, how often and how long we wait is
decided here, explicitly: connection failures, timeouts, truncated bodies, 5xx and throttling
(`SlowDown`, 503, 429) are retried with exponential backoff and jitter; every other 4xx is final and
becomes a typed error (`ObjectNotFound`, `BucketNotFound`, `AccessDenied`, ...). A request that
keeps failing transiently ends as `StorageUnavailable`. Messages name the operation, bucket and key
and the S3 error code, and are passed through a redactor so a secret can never appear in them.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from botocore.exceptions import (
    BotoCoreError,
    ChecksumError,
    ClientError,
    ConnectionError,
    HTTPClientError,
    IncompleteReadError,
)

log = logging.getLogger(__name__)
T = TypeVar("T")


class StorageError(Exception):
    """Any failure of a bucket operation. The message never contains a secret."""

    def __init__(
        self, message: str, *, bucket: str | None = None, key: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.bucket, self.key, self.code = bucket, key, code


class ObjectNotFound(StorageError):
    """The key does not exist in the bucket (NoSuchKey / 404)."""


class BucketNotFound(StorageError):
    """The bucket does not exist (NoSuchBucket)."""


class AccessDenied(StorageError):
    """The credentials were refused: unknown key id, wrong secret, or no permission (403)."""


class ObjectTooLarge(StorageError):
    """The object is bigger than the caller's cap; refused before (or while) reading its body."""

    def __init__(self, message: str, *, size: int, limit: int, **kw: str | None) -> None:
        super().__init__(message, **kw)
        self.size, self.limit = size, limit


class ObjectChanged(StorageError):
    """The object was replaced while it was being downloaded in ranges (ETag mismatch / 412)."""


class StorageUnavailable(StorageError):
    """Transient failures went on for every allowed attempt (server down, 5xx, throttling)."""

    def __init__(self, message: str, *, attempts: int, **kw: str | None) -> None:
        super().__init__(message, **kw)
        self.attempts = attempts


class DeadlineExceeded(StorageError):
    """An object (or a window's downloads) took longer than its deadline; the peer loses the window."""


class TransientError(Exception):
    """Raised by our own checks (e.g. a body shorter than its Content-Length) to ask for a retry."""


_TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "TooManyRequests",
        "RequestLimitExceeded",
        "RequestTimeout",
        "InternalError",
        "ServiceUnavailable",
        "503",
        "500",
        "502",
        "504",
        "429",
    }
)
_ACCESS_CODES = frozenset(
    {
        "AccessDenied",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "InvalidToken",
        "ExpiredToken",
        "AuthorizationHeaderMalformed",
        "403",
        "401",
        "Unauthorized",
        "Forbidden",
    }
)
_TRANSIENT_BOTO = (ConnectionError, HTTPClientError, IncompleteReadError, ChecksumError)


def error_code(exc: ClientError) -> tuple[str, int]:
    """The S3 error code and HTTP status of a ClientError ('' / 0 when absent)."""
    code = str(exc.response.get("Error", {}).get("Code", "") or "")
    status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return code, status


def is_transient(exc: BaseException) -> bool:
    """Whether a failure may go away by itself and the request is worth repeating."""
    if isinstance(exc, (TransientError, *_TRANSIENT_BOTO)):
        return True
    if isinstance(exc, ClientError):
        code, status = error_code(exc)
        return status >= 500 or status == 429 or code in _TRANSIENT_CODES
    return False


def describe(exc: BaseException) -> str:
    """A short, secret-free reason: the S3 code and status, or the exception type and message."""
    if isinstance(exc, ClientError):
        code, status = error_code(exc)
        return f"{code or 'error'} (HTTP {status})"
    return f"{type(exc).__name__}: {exc}"


def to_storage_error(exc: ClientError, where: str, bucket: str, key: str | None) -> StorageError:
    """Map a final (non-transient) S3 error to its typed error."""
    code, status = error_code(exc)
    kw = dict(bucket=bucket, key=key, code=code or str(status))
    if code == "NoSuchBucket":
        return BucketNotFound(f"{where}: bucket '{bucket}' does not exist (NoSuchBucket)", **kw)
    if code in ("NoSuchKey", "404") or (status == 404 and code not in ("NoSuchUpload",)):
        return ObjectNotFound(f"{where}: no such object (HTTP 404)", **kw)
    if code in _ACCESS_CODES or status in (401, 403):
        return AccessDenied(
            f"{where}: access denied ({code or status}): check this bucket's access key "
            "id and secret, and that they grant this operation",
            **kw,
        )
    if code == "PreconditionFailed" or status == 412:
        return ObjectChanged(f"{where}: object changed while it was being read (HTTP 412)", **kw)
    return StorageError(f"{where}: request refused: {describe(exc)}", **kw)


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int
    base_delay_s: float
    max_delay_s: float

    def delay(self, failures: int, rng: random.Random | None = None) -> float:
        """Wait before the next attempt after `failures` consecutive failures (≥ 1).

        Exponential (base · 2^(failures-1), capped) with jitter in [50 %, 100 %] so clients that
        failed together do not come back together.
        """
        ceiling = min(self.max_delay_s, self.base_delay_s * 2 ** min(failures - 1, 62))
        return ceiling * (0.5 + 0.5 * (rng or random).random())


def call_with_retry(
    fn: Callable[[], T],
    *,
    policy: RetryPolicy,
    where: str,
    bucket: str,
    key: str | None,
    redact: Callable[[str], str] = lambda s: s,
    on_retry: Callable[[int, BaseException], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
    deadline: float | None = None,
) -> T:
    """Run `fn` until it succeeds, a final error occurs, or `policy.max_attempts` is spent.

    Typed `StorageError`s raised by `fn` itself (e.g. ObjectTooLarge) pass straight through. With a
    `deadline` (time.monotonic()), no attempt starts and no back-off sleeps past it: DeadlineExceeded.
    """
    for attempt in range(1, policy.max_attempts + 1):
        try:
            return fn()
        except StorageError:
            raise
        except (ClientError, BotoCoreError, TransientError) as exc:
            if not is_transient(exc):
                if isinstance(exc, ClientError):
                    raise to_storage_error(exc, where, bucket, key) from None
                raise StorageError(redact(f"{where}: {describe(exc)}"), bucket=bucket, key=key) from None
            reason = redact(describe(exc))
            if attempt == policy.max_attempts:
                raise StorageUnavailable(
                    f"{where}: storage unavailable after {attempt} attempts; last error: {reason}",
                    attempts=attempt,
                    bucket=bucket,
                    key=key,
                ) from None
            wait = policy.delay(attempt)
            if deadline is not None and time.monotonic() + wait >= deadline:
                raise DeadlineExceeded(f"{where}: deadline passed after {attempt} attempts; last error: {reason}",
                                       bucket=bucket, key=key) from None
            log.warning(
                "%s: attempt %d/%d failed (%s); retrying in %.2fs",
                where,
                attempt,
                policy.max_attempts,
                reason,
                wait,
            )
            if on_retry is not None:
                on_retry(attempt, exc)
            sleep(wait)
    raise AssertionError("unreachable: max_attempts ≥ 1")
