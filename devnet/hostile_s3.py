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

This module is the proxy itself (lifecycle, the API above, the rule that answers each request) and
the only one callers import; `hostile_s3_http.py` speaks HTTP/1.1 to clients and
`hostile_s3_behaviour.py` holds the `Behaviour`s and carries them out.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from urllib.parse import unquote, urlsplit

import aiohttp

from devnet.hostile_s3_behaviour import OPS, Behaviour, ClientInfo, Seen, _Lies, _Rule
from devnet.hostile_s3_http import _MAX_HEAD, _REASONS, _Connections, _Request, _Response
from devnet.s3 import HOST, REGION, S3Server
from protocol.storage_config import BucketConfig
from transport.bucket import Bucket, StorageConfig

# Short timeouts and backoff for `HostileS3.bucket()`: a client of a lying server should fail in seconds.
QUICK_STORAGE = StorageConfig(
    connect_timeout_s=2.0, read_timeout_s=20.0, max_attempts=3, backoff_base_s=0.05, backoff_max_s=0.2
)
_CREDENTIAL_RE = re.compile(r"Credential=([^/,\s]+)/")


class HostileS3(_Lies, _Connections):
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

    # -- serving: the rule for each request (HTTP: hostile_s3_http.py; the lies: hostile_s3_behaviour.py)

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
