"""A hostile S3 bucket: a lying reverse proxy on 127.0.0.1 in front of the real rclone server.

Crucible is permissionless, so every byte, header, timestamp and delay of a peer's bucket is the
peer's to choose (issue 14). The defences (validator-observed times, content-hash pinning, download
deadlines, endpoint policy) need an adversary to be tested against; this is it. Storage stays real:
objects live in `rclone serve s3` (`devnet.s3.S3Server`) and every request is answered from there,
then the proxy lies about the answer as it was told to. Clients are the real `transport.bucket.Bucket`
(boto3), pointed at the proxy's endpoint. Tests get it as the `hostile_s3` fixture
(tests/plugins/hostile_s3.py); `crucible bench fetch` puts its buckets behind one.

    def test_x(hostile_s3):
        hostile_s3.bucket(write=True).put("g/1", b"A" * 64)        # honest upload, through the proxy
        hostile_s3.behave("g/*", Behaviour(last_modified=timedelta(minutes=-10)), ops={"LIST"})
        hostile_s3.behave("g/*", Behaviour(bodies=(b"B" * 64,)), ops={"GET"})
        reader = hostile_s3.bucket()                                   # read key, short test timeouts
        assert reader.get("g/1", 1 << 20) == b"B" * 64

API (all of it):
- `HostileS3.over(server, bucket_name=None).start()`: a proxy over a running `S3Server`; `close()` it.
  The `hostile_s3` test fixture is one over the session rclone server and a fresh bucket
  (`.bucket_name`, the same one the `s3_bucket` fixture gives that test: rclone without the proxy,
  i.e. the truth); closed after the test whatever happens.
- `behave(key_glob, behaviour, *, ops=None, client=None, bucket=None)`: from now on, requests whose
  key matches the fnmatch glob (for a listing: its prefix), whose operation is in `ops` (any of
  LIST HEAD GET PUT DELETE POST; None = all) and whose client matches `client` get `behaviour`. The
  rule added last wins; one rule per request. `clear()` drops every rule.
- `client=`: a string matches the request's SigV4 access key id (from the `Authorization` header's
  `Credential=`, or a presigned URL's `X-Amz-Credential`) or the name of the listener it came in on
  (`endpoint_for(name)` opens one more port); or a predicate on `ClientInfo` (source port, headers).
  Which to use: the read key is published on chain, so in the real network every node reads a
  miner's bucket with the SAME access key; a real hostile server tells nodes apart by their source
  address. All test traffic comes from 127.0.0.1, so a listener per simulated node stands in for
  "one address per node". The access key tells the miner's own write key from the published read
  key (rclone serves both), which is enough to show a server answering its owner and everyone else
  differently.
- `bucket(*, write=False, via=None, storage=QUICK_STORAGE)`: a `Bucket` on the proxy (listener `via`).
- `requests`: what the proxy saw and did, one `Seen` per request (op, key, client, status, bytes
  and times), so a test can measure a trickle or check that nobody followed a redirect.
  `wait_idle()` first: a client can give up (or finish reading) before the proxy's notes are done.

`Behaviour` (every field optional; they combine):
- `last_modified`: a datetime (absolute) or a timedelta (added to the truth). Rewritten in listings
  (each `<Contents>` whose key matches a LIST rule) and in HEAD/GET `Last-Modified` headers.
- `client_mtime`: "honour" (pass the client's `X-Amz-Meta-Mtime` to rclone, which then reports
  that time as the object's LastModified in listings: rclone's own behaviour), "strip" (drop it;
  rclone uses its clock) or a datetime (the server stamps that time). Changing a signed header means
  re-signing towards rclone (botocore's S3SigV4Auth with the key the proxy holds for that access key
  id); every other request is forwarded byte for byte, Host header included, so rclone verifies
  the client's own signature (SigV4 signs `host`, and the client signed the proxy's address).
- `bodies`: GET answers bodies[i % n] for the rule's i-th GET (ranges sliced from it), with
  Content-Length and ETag of what is sent; HEAD and listings keep telling the truth unless told.
- `delay_s`: wait before answering. `hang`: "before_headers" (read the request, never answer) or
  "after_headers" (send status and headers, never the body). `trickle_bps`: send the body at that
  many bytes per second. `content_length_delta`: declare that many more (or fewer) bytes than are
  sent, then close the connection (never smuggle leftovers into the next keep-alive response).
- `redirect`: (status, location): answer e.g. 307 with `Location:` and no body, without asking
  rclone. The proxy never follows it: it only ever connects to its loopback upstream.

Bounds: every stall ends when the client goes away, after `max_stall_s` (default 60 s), or at
`close()`, which aborts every connection and joins the proxy's thread within seconds, so a test can
fail but never hang the suite. Upstream must be a loopback address; listeners bind 127.0.0.1 only.
Nothing here is used by a node: it is the adversary that tests and benches point nodes at.
"""

from __future__ import annotations

import asyncio
import email.utils
import fnmatch
import hashlib
import html
import ipaddress
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Literal
from urllib.parse import parse_qsl, unquote, unquote_plus, urlsplit

import aiohttp
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from yarl import URL

from devnet.s3 import HOST, REGION, S3Server
from protocol.storage_config import BucketConfig
from transport.bucket import Bucket, StorageConfig

OPS = frozenset({"LIST", "HEAD", "GET", "PUT", "DELETE", "POST"})
# Short timeouts and backoff for `HostileS3.bucket()`: a client of a lying server should fail in seconds.
QUICK_STORAGE = StorageConfig(
    connect_timeout_s=2.0, read_timeout_s=20.0, max_attempts=3, backoff_base_s=0.05, backoff_max_s=0.2
)
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "upgrade",
        "transfer-encoding",
        "expect",
    }
)
_MAX_HEAD = 64 << 10  # request line + headers
_MAX_BODY = 256 << 20  # a request or upstream body the proxy will hold in memory
_MAX_REQUESTS_PER_CONNECTION = 10_000
_CREDENTIAL_RE = re.compile(r"Credential=([^/,\s]+)/")
_CONTENTS_RE = re.compile(rb"<Contents>.*?</Contents>", re.S)
_KEY_RE = re.compile(rb"<Key>(.*?)</Key>", re.S)
_LAST_MODIFIED_RE = re.compile(rb"<LastModified>(.*?)</LastModified>", re.S)
_REASONS = {
    200: "OK",
    206: "Partial Content",
    301: "Moved Permanently",
    302: "Found",
    307: "Temporary Redirect",
    308: "Permanent Redirect",
    400: "Bad Request",
    413: "Payload Too Large",
    501: "Not Implemented",
    502: "Bad Gateway",
}


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


@dataclass
class _Request:
    method: str
    target: str  # raw path and query, as sent
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        lname = name.lower()
        return next((v for k, v in self.headers if k.lower() == lname), None)


@dataclass
class _Response:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes
    declared: int | None  # Content-Length to send (HEAD: the object's, not the empty body's)


class _BadRequest(Exception):
    pass


async def _read_all(stream: aiohttp.StreamReader) -> bytes:
    """The whole upstream body, at most `_MAX_BODY` bytes (StreamReader.read(n) may return fewer)."""
    parts, total = [], 0
    while total <= _MAX_BODY:
        chunk = await stream.read(1 << 20)
        if not chunk:
            break
        parts.append(chunk)
        total += len(chunk)
    return b"".join(parts)


def _http_date(dt: datetime) -> str:
    return email.utils.format_datetime(dt.astimezone(UTC), usegmt=True)


def _forge(truth: datetime, how: datetime | timedelta) -> datetime:
    return truth + how if isinstance(how, timedelta) else how.astimezone(UTC)


def _iso_ms(dt: datetime) -> str:
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


def _parse_iso(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC)


class HostileS3:
    """The proxy: `start()` it, point Buckets at `endpoint`, tell it how to lie with `behave()`, `close()` it."""

    def __init__(
        self,
        upstream: str,
        keys: dict[str, str],
        *,
        region: str = REGION,
        bucket_name: str | None = None,
        max_stall_s: float = 60.0,
        upstream_timeout_s: float = 30.0,
    ) -> None:
        parts = urlsplit(upstream)
        try:
            loopback = ipaddress.ip_address(parts.hostname or "").is_loopback
        except ValueError:
            loopback = False  # a name: resolving it could lead anywhere
        if parts.scheme != "http" or not loopback:
            raise ValueError("the hostile proxy only ever talks to an http:// loopback IP upstream")
        self.upstream = upstream.rstrip("/")
        self.region = region
        self.bucket_name = bucket_name
        self.max_stall_s, self.upstream_timeout_s = max_stall_s, upstream_timeout_s
        self._keys = dict(keys)  # access key id -> secret, to re-sign a request the proxy changed
        self._lock = threading.RLock()
        self._idle = threading.Condition(self._lock)
        self._in_flight = 0
        self._rules: list[_Rule] = []
        self._counters: dict[int, int] = {}
        self._seen: list[Seen] = []
        self._ports: dict[str, int] = {}
        self._servers: list[asyncio.AbstractServer] = []
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._session: aiohttp.ClientSession | None = None
        self._closing: asyncio.Event | None = None
        self._serial = 0
        self._server: S3Server | None = None  # set by `over`; `bucket()` needs its keys

    @classmethod
    def over(cls, server: S3Server, bucket_name: str | None = None, **kw: float) -> HostileS3:
        """A proxy in front of a running devnet/test `S3Server`, holding its two key pairs."""
        keys = {k.access_key: k.secret_key for k in (server.write_key, server.read_key)}
        proxy = cls(server.endpoint, keys, bucket_name=bucket_name, **kw)
        proxy._server = server
        return proxy

    # -- lifecycle -----------------------------------------------------------------------------------

    def start(self) -> HostileS3:
        if self._thread is not None:
            return self
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name="hostile-s3")
        self._thread.start()
        self._call(self._astart(), 10.0)
        self.endpoint_for("default")
        return self

    def close(self) -> None:
        """Abort every connection, stop the loop and join its thread; bounded, idempotent."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        try:
            self._call(self._aclose(), 15.0)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10.0)
            if not thread.is_alive():
                loop.close()
            self._loop = self._thread = None

    def __enter__(self) -> HostileS3:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, coro: object, timeout: float) -> object:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)  # type: ignore[arg-type]

    async def _astart(self) -> None:
        self._closing = asyncio.Event()
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.upstream_timeout_s),
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            connector=aiohttp.TCPConnector(limit=64),
        )

    async def _aclose(self) -> None:
        assert self._closing is not None
        self._closing.set()
        for server in self._servers:
            server.close()
        for writer in list(self._writers):
            writer.transport.abort()  # reads fail, stalls see `_closing`: handlers end on their own
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=2.0)
        for task in list(self._tasks):  # e.g. waiting on rclone: cut short
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=3.0)
        if self._session is not None:
            await self._session.close()

    # -- the test's API ------------------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        return self.endpoint_for("default")

    def endpoint_for(self, listener: str) -> str:
        """The endpoint of listener `listener` (opened on first use): one per simulated client address."""
        with self._lock:
            port = self._ports.get(listener)
        if port is None:
            port = self._call(self._listen(listener), 10.0)  # type: ignore[assignment]
        return f"http://{HOST}:{port}"

    async def _listen(self, name: str) -> int:
        if name in self._ports:
            return self._ports[name]
        server = await asyncio.start_server(
            lambda r, w: self._connection(r, w, name), HOST, 0, limit=_MAX_HEAD
        )
        self._servers.append(server)
        port = server.sockets[0].getsockname()[1]
        with self._lock:
            self._ports[name] = port
        return port

    def behave(
        self,
        key_glob: str,
        behaviour: Behaviour,
        *,
        ops: set[str] | frozenset[str] | tuple[str, ...] | None = None,
        client: str | Callable[[ClientInfo], bool] | None = None,
        bucket: str | None = None,
    ) -> None:
        """Give `behaviour` to matching requests from now on (the newest matching rule wins)."""
        op_set = None if ops is None else frozenset(o.upper() for o in ops)
        if op_set is not None and not op_set <= OPS:
            raise ValueError(f"unknown ops {sorted(op_set - OPS)}; known: {sorted(OPS)}")
        with self._lock:
            self._serial += 1
            self._rules.append(_Rule(key_glob, behaviour, op_set, client, bucket, self._serial))

    def clear(self) -> None:
        with self._lock:
            self._rules.clear()

    @property
    def requests(self) -> list[Seen]:
        """Every request so far, in arrival order; one still in progress has `finished=None`."""
        with self._lock:
            return list(self._seen)

    def wait_idle(self, timeout_s: float = 5.0) -> bool:
        """Wait until no request is in progress (a client may return before the proxy wrote its
        notes, e.g. after giving up on a hang); False if some still is after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        with self._idle:
            while self._in_flight and (left := deadline - time.monotonic()) > 0:
                self._idle.wait(left)
            return self._in_flight == 0

    def bucket(
        self,
        *,
        write: bool = False,
        via: str | None = None,
        storage: StorageConfig = QUICK_STORAGE,
        name: str | None = None,
    ) -> Bucket:
        """A real `Bucket` through the proxy (listener `via`), with the read key unless `write`."""
        server = self._server
        if server is None:
            raise ValueError("bucket() needs a proxy built with HostileS3.over(server)")
        key = server.write_key if write else server.read_key
        bucket_name = name or self.bucket_name
        if bucket_name is None:
            raise ValueError("no bucket name: pass name= or build the proxy with bucket_name")
        config = BucketConfig(
            endpoint_url=self.endpoint_for(via or "default"),
            region=self.region,
            bucket=bucket_name,
            access_key_id=key.access_key,
            secret_access_key=key.secret_key,
        )
        return Bucket(config, storage)

    # -- serving -------------------------------------------------------------------------------------

    async def _connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, listener: str
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)  # type: ignore[arg-type]
        self._writers.add(writer)
        peer = writer.get_extra_info("peername") or ("", 0)
        try:
            for _ in range(_MAX_REQUESTS_PER_CONNECTION):
                async with asyncio.timeout(self.max_stall_s):  # an idle keep-alive connection ends too
                    request = await self._read_request(reader, writer)
                if request is None or not await self._answer(request, reader, writer, listener, peer[1]):
                    break
        except (
            TimeoutError,
            ConnectionError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            _BadRequest,
        ):
            pass
        except asyncio.CancelledError:
            pass  # close() cut it short; ending quietly keeps asyncio from logging the cancellation
        finally:
            self._writers.discard(writer)
            writer.transport.abort()
            self._tasks.discard(task)  # type: ignore[arg-type]

    async def _read_request(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> _Request | None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as exc:
            if exc.partial:
                raise _BadRequest("truncated request head") from None
            return None  # the client closed an idle connection
        lines = head[:-4].decode("latin-1").split("\r\n")
        try:
            method, target, _version = lines[0].split(" ", 2)
        except ValueError:
            raise _BadRequest(lines[0]) from None
        headers = []
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep:
                raise _BadRequest(line)
            headers.append((name.strip(), value.strip()))
        request = _Request(method.upper(), target, headers, b"")
        if request.header("Transfer-Encoding"):
            await self._send_simple(
                writer, 501, b"chunked request bodies are not supported by the test proxy"
            )
            raise _BadRequest("chunked")
        length = int(request.header("Content-Length") or 0)
        if length > _MAX_BODY:
            await self._send_simple(writer, 413, b"")
            raise _BadRequest("too large")
        if length:
            if (request.header("Expect") or "").lower() == "100-continue":
                writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                await writer.drain()
            request.body = await reader.readexactly(length)
        return request

    async def _send_simple(self, writer: asyncio.StreamWriter, status: int, body: bytes) -> None:
        writer.write(
            f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\nContent-Length: {len(body)}\r\n"
            f"Connection: close\r\n\r\n".encode("latin-1")
            + body
        )
        await writer.drain()

    def _classify(self, request: _Request) -> tuple[str, str, str, dict[str, str]]:
        """(op, bucket, key, query) of a path-style S3 request; a listing's key is its prefix."""
        path, _, query = request.target.partition("?")
        params = dict(parse_qsl(query, keep_blank_values=True))
        bucket, _, raw_key = path.lstrip("/").partition("/")
        bucket, key = unquote(bucket), unquote(raw_key)
        op = request.method
        if op == "GET" and not key:
            op, key = "LIST", params.get("prefix", "")
        return op, bucket, key, params

    def _rule_for(self, op: str, bucket: str, key: str, who: ClientInfo) -> _Rule | None:
        with self._lock:
            rules = list(self._rules)
        return next((r for r in reversed(rules) if r.matches(op, bucket, key, who)), None)

    async def _answer(
        self,
        request: _Request,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        listener: str,
        port: int,
    ) -> bool:
        """Answer one request; False closes the connection."""
        received = time.monotonic()
        op, bucket, key, params = self._classify(request)
        auth = request.header("Authorization") or ""
        cred = _CREDENTIAL_RE.search(auth) or _CREDENTIAL_RE.search(
            unquote(params.get("X-Amz-Credential", "")) + ","
        )
        who = ClientInfo(cred.group(1) if cred else None, listener, port, tuple(request.headers))
        rule = self._rule_for(op, bucket, key, who)
        b = rule.behaviour if rule else Behaviour()
        slot = self._begin(Seen(op, bucket, key, who, rule.behaviour if rule else None, received=received))
        try:
            if b.hang == "before_headers":
                await self._stall(reader)
                return False
            if b.redirect is not None:
                status, location = b.redirect
                response = _Response(
                    status, _REASONS.get(status, "Redirect"), [("Location", location)], b"", 0
                )
            else:
                response, resigned = await self._upstream(request, op, b, who)
                self._update(slot, resigned=resigned, upstream=True)
                response = self._rewrite(request, response, op, bucket, key, b, rule, who)
            if b.delay_s > 0:
                await self._sleep(min(b.delay_s, self.max_stall_s))
            return await self._deliver(request, response, b, reader, writer, slot)
        finally:
            self._update(slot, finished=time.monotonic())

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

    def _begin(self, seen: Seen) -> int:
        with self._idle:
            self._seen.append(seen)
            self._in_flight += 1
            return len(self._seen) - 1

    def _update(self, slot: int, **fields: object) -> None:
        with self._idle:
            done = "finished" in fields and self._seen[slot].finished is None
            self._seen[slot] = replace(self._seen[slot], **fields)  # type: ignore[arg-type]
            if done:
                self._in_flight -= 1
                self._idle.notify_all()


__all__ = ["OPS", "QUICK_STORAGE", "Behaviour", "ClientInfo", "HostileS3", "Seen"]
