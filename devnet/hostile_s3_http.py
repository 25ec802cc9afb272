"""HTTP/1.1 plumbing of the hostile S3 proxy (`devnet.hostile_s3`): connections, requests, raw answers.

The proxy has to lie at the byte level (a false Content-Length, headers and then silence, a body at a
few bytes per second), which no HTTP server library lets a handler do, so it speaks HTTP/1.1 itself
over asyncio streams. This module is that part, and it knows nothing of the lies: it holds each
keep-alive connection, reads one bounded request at a time (no chunked uploads), names its S3
operation, bucket and key, and hands it to `HostileS3._answer`; `_Response` is what an answer will
send. What the proxy does with a request is in `devnet.hostile_s3_behaviour`.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from urllib.parse import parse_qsl, unquote

import aiohttp

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


class _Connections:
    """`HostileS3`'s serving half: a task per connection reads each request and hands it to `_answer`."""

    max_stall_s: float
    _tasks: set[asyncio.Task[None]]
    _writers: set[asyncio.StreamWriter]

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
