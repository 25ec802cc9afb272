"""How the hostile S3 proxy (`devnet.hostile_s3`) lies: the `Behaviour` a rule gives, and carrying it out.

A test or bench tells the proxy how to lie with `HostileS3.behave(glob, Behaviour(...))`. This module
holds that configuration (`Behaviour`, the `_Rule` it sits in, the `ClientInfo` a rule may match on,
the `Seen` note of each request) and the code that applies it once `HostileS3._answer` has picked a
request's rule: asking rclone (re-signed when `client_mtime` changed a signed header), forged times
in listings and headers, swapped bodies, and the delivery itself (delay, false Content-Length, hang,
trickle). What each field means is documented in devnet/hostile_s3.py's docstring.
"""

from __future__ import annotations

import asyncio
import email.utils
import fnmatch
import hashlib
import html
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Literal
from urllib.parse import unquote_plus

import aiohttp
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from yarl import URL

from devnet.hostile_s3_http import _HOP_BY_HOP, _REASONS, _BadRequest, _read_all, _Request, _Response

OPS = frozenset({"LIST", "HEAD", "GET", "PUT", "DELETE", "POST"})
_CONTENTS_RE = re.compile(rb"<Contents>.*?</Contents>", re.S)
_KEY_RE = re.compile(rb"<Key>(.*?)</Key>", re.S)
_LAST_MODIFIED_RE = re.compile(rb"<LastModified>(.*?)</LastModified>", re.S)


@dataclass(frozen=True)
class Behaviour:
    """How the proxy lies about the requests a rule matches. The default is an honest proxy."""

    last_modified: datetime | timedelta | None = None
    client_mtime: Literal["honour", "strip"] | datetime = "honour"
    bodies: tuple[bytes, ...] = ()
    delay_s: float = 0.0
    hang: Literal["before_headers", "after_headers"] | None = None
    trickle_bps: float | None = None
    content_length_delta: int = 0
    redirect: tuple[int, str] | None = None

    def __post_init__(self) -> None:
        if self.trickle_bps is not None and self.trickle_bps <= 0:
            raise ValueError("trickle_bps must be > 0")
        if self.hang not in (None, "before_headers", "after_headers"):
            raise ValueError(f"hang: {self.hang!r}")
        if isinstance(self.client_mtime, str) and self.client_mtime not in ("honour", "strip"):
            raise ValueError(f"client_mtime: {self.client_mtime!r}")
        if self.redirect is not None and not 300 <= self.redirect[0] < 400:
            raise ValueError("redirect status must be 3xx")


@dataclass(frozen=True)
class ClientInfo:
    """Who sent a request, as far as a server can tell: key id, the listener it came in on, its port."""

    access_key: str | None
    listener: str
    peer_port: int
    headers: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Seen:
    """One request as the proxy saw and answered it (times are `time.monotonic()`)."""

    op: str
    bucket: str
    key: str
    client: ClientInfo
    behaviour: Behaviour | None
    status: int | None = None  # None: no status line was ever sent (hang before headers)
    declared_length: int | None = None
    body_bytes_sent: int = 0
    received: float = 0.0
    headers_sent: float | None = None
    finished: float | None = None  # None while the proxy is still on it
    resigned: bool = False
    upstream: bool = False  # whether rclone was asked at all


@dataclass(frozen=True)
class _Rule:
    glob: str
    behaviour: Behaviour
    ops: frozenset[str] | None
    client: str | Callable[[ClientInfo], bool] | None
    bucket: str | None
    serial: int = field(default=0, compare=False)

    def matches(self, op: str, bucket: str, key: str, who: ClientInfo) -> bool:
        if self.ops is not None and op not in self.ops:
            return False
        if self.bucket is not None and self.bucket != bucket:
            return False
        if not fnmatch.fnmatchcase(key, self.glob):
            return False
        if self.client is None:
            return True
        if callable(self.client):
            return bool(self.client(who))
        return self.client in (who.access_key, who.listener)


def _http_date(dt: datetime) -> str:
    return email.utils.format_datetime(dt.astimezone(UTC), usegmt=True)


def _forge(truth: datetime, how: datetime | timedelta) -> datetime:
    return truth + how if isinstance(how, timedelta) else how.astimezone(UTC)


def _iso_ms(dt: datetime) -> str:
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


def _parse_iso(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC)


class _Lies:
    """`HostileS3`'s lying half: from a request and its `Behaviour` to what the client gets, and when."""

    upstream: str
    region: str
    max_stall_s: float
    _keys: dict[str, str]
    _lock: threading.RLock
    _counters: dict[int, int]
    _session: aiohttp.ClientSession | None
    _closing: asyncio.Event | None

    async def _upstream(
        self, request: _Request, op: str, b: Behaviour, who: ClientInfo
    ) -> tuple[_Response, bool]:
        headers = [(k, v) for k, v in request.headers if k.lower() not in _HOP_BY_HOP]
        resigned = False
        if op == "PUT" and b.client_mtime != "honour":
            headers = [(k, v) for k, v in headers if k.lower() != "x-amz-meta-mtime"]
            if isinstance(b.client_mtime, datetime):
                headers.append(("X-Amz-Meta-Mtime", f"{b.client_mtime.timestamp():.6f}"))
            headers = self._resign(request, headers, who.access_key)
            resigned = True
        assert self._session is not None
        url = URL(self.upstream + request.target, encoded=True)
        try:
            async with self._session.request(
                request.method,
                url,
                headers=headers,
                data=request.body or None,
                allow_redirects=False,
                skip_auto_headers=("Accept-Encoding", "User-Agent", "Content-Type"),
            ) as r:
                body = b"" if request.method == "HEAD" else await _read_all(r.content)
                raw = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in r.raw_headers]
                status, reason = r.status, r.reason or ""
        except (aiohttp.ClientError, TimeoutError) as exc:
            return _Response(
                502, "Bad Gateway", [], f"upstream: {type(exc).__name__}".encode(), None
            ), resigned
        declared = None
        if request.method == "HEAD":
            declared = next((int(v) for k, v in raw if k.lower() == "content-length"), None)
        kept = [(k, v) for k, v in raw if k.lower() not in _HOP_BY_HOP and k.lower() != "content-length"]
        return _Response(status, reason, kept, body, declared), resigned

    def _resign(
        self, request: _Request, headers: list[tuple[str, str]], access_key: str | None
    ) -> list[tuple[str, str]]:
        """Sign the changed request towards rclone with the key pair the client used (its Host: rclone's)."""
        secret = self._keys.get(access_key or "")
        if secret is None:
            raise _BadRequest(f"cannot re-sign for unknown access key {access_key!r}")
        drop = {
            "authorization",
            "x-amz-date",
            "x-amz-content-sha256",
            "host",
            "content-length",
            "x-amz-security-token",
        }
        aws = AWSRequest(
            method=request.method,
            url=self.upstream + request.target,
            data=request.body,
            headers={k: v for k, v in headers if k.lower() not in drop},
        )
        S3SigV4Auth(Credentials(access_key, secret), "s3", self.region).add_auth(aws)
        return [(k, v if isinstance(v, str) else v.decode()) for k, v in aws.headers.items()]

    def _rewrite(
        self,
        request: _Request,
        response: _Response,
        op: str,
        bucket: str,
        key: str,
        b: Behaviour,
        rule: _Rule | None,
        who: ClientInfo,
    ) -> _Response:
        ok = 200 <= response.status < 300
        if op == "LIST" and ok:
            response.body = self._rewrite_listing(response.body, bucket, who)
        if op in ("HEAD", "GET") and ok and b.last_modified is not None:
            for i, (k, v) in enumerate(response.headers):
                if k.lower() == "last-modified":
                    truth = email.utils.parsedate_to_datetime(v)
                    response.headers[i] = (k, _http_date(_forge(truth, b.last_modified)))
        if op == "GET" and ok and b.bodies and rule is not None:
            with self._lock:
                n = self._counters.get(rule.serial, 0)
                self._counters[rule.serial] = n + 1
            full = b.bodies[n % len(b.bodies)]
            body, status, content_range = full, 200, None
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", request.header("Range") or "")
            if m and full:
                start = int(m.group(1))
                end = min(int(m.group(2)) if m.group(2) else len(full) - 1, len(full) - 1)
                body, status, content_range = full[start : end + 1], 206, f"bytes {start}-{end}/{len(full)}"
            headers = [(k, v) for k, v in response.headers if k.lower() not in ("etag", "content-range")]
            headers.append(("ETag", f'"{hashlib.md5(full).hexdigest()}"'))
            if content_range:
                headers.append(("Content-Range", content_range))
            response = _Response(status, _REASONS[status], headers, body, None)
        return response

    def _rewrite_listing(self, xml: bytes, bucket: str, who: ClientInfo) -> bytes:
        """Forge `<LastModified>` of each listed key that a LIST rule with `last_modified` matches."""

        def one(m: re.Match[bytes]) -> bytes:
            block = m.group(0)
            km = _KEY_RE.search(block)
            if km is None:
                return block
            key = unquote_plus(html.unescape(km.group(1).decode()))  # boto3 asks for EncodingType=url
            rule = self._rule_for("LIST", bucket, key, who)
            if rule is None or rule.behaviour.last_modified is None:
                return block
            how = rule.behaviour.last_modified

            def lm(m2: re.Match[bytes]) -> bytes:
                forged = _forge(_parse_iso(m2.group(1).decode()), how)
                return b"<LastModified>" + _iso_ms(forged).encode() + b"</LastModified>"

            return _LAST_MODIFIED_RE.sub(lm, block, count=1)

        return _CONTENTS_RE.sub(one, xml)

    async def _deliver(
        self,
        request: _Request,
        response: _Response,
        b: Behaviour,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        slot: int,
    ) -> bool:
        body = b"" if request.method == "HEAD" else response.body
        true_length = response.declared if response.declared is not None else len(body)
        declared = max(0, true_length + b.content_length_delta)
        head = [f"HTTP/1.1 {response.status} {response.reason}"]
        head += [f"{k}: {v}" for k, v in response.headers]
        head.append(f"Content-Length: {declared}")
        lying = b.content_length_delta != 0
        if lying:
            head.append("Connection: close")
        self._update(slot, status=response.status, declared_length=declared)
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
        self._update(slot, headers_sent=time.monotonic())
        await writer.drain()
        if b.hang == "after_headers":
            await self._stall(reader)
            return False
        if b.trickle_bps is None:
            self._update(
                slot, body_bytes_sent=len(body)
            )  # before the bytes: a client may act on them at once
            writer.write(body)
            await writer.drain()
            sent = len(body)
        else:
            sent = await self._trickle(writer, body, b.trickle_bps, slot)
        return not lying and sent == len(body)

    async def _trickle(self, writer: asyncio.StreamWriter, body: bytes, bps: float, slot: int) -> int:
        """Send `body` at `bps` bytes per second in small slices; stops at `max_stall_s` or a gone client."""
        chunk = max(1, int(bps * 0.05))
        started, sent = time.monotonic(), 0
        while sent < len(body):
            if writer.is_closing() or time.monotonic() - started > self.max_stall_s:
                break
            piece = body[sent : sent + chunk]
            sent += len(piece)
            self._update(slot, body_bytes_sent=sent)
            writer.write(piece)
            await writer.drain()
            wait = started + sent / bps - time.monotonic()  # keeps the average rate exact
            if wait > 0 and sent < len(body):
                await self._sleep(wait)
        return sent

    async def _stall(self, reader: asyncio.StreamReader) -> None:
        """Say nothing until the client hangs up, `max_stall_s` passes or the proxy closes."""
        assert self._closing is not None
        deadline = time.monotonic() + self.max_stall_s
        while (left := deadline - time.monotonic()) > 0 and not self._closing.is_set():
            try:
                async with asyncio.timeout(min(left, 0.5)):
                    if not await reader.read(1 << 16):
                        return  # EOF: the client gave up
            except TimeoutError:
                continue

    async def _sleep(self, seconds: float) -> None:
        assert self._closing is not None
        try:
            async with asyncio.timeout(seconds):
                await self._closing.wait()
        except TimeoutError:
            pass
