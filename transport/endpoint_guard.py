"""The endpoint policy at connection time: resolve, check every address, connect to a checked one.

`protocol.endpoint_policy` judges an endpoint URL without I/O; a DNS name passes it whatever it
resolves to. A miner controls its name's DNS records, so it can point them at 127.0.0.1 or
169.254.169.254, or answer a public address to the check and a private one to the connection a
moment later (DNS rebinding). `guard_client` closes both holes for one boto3 client: every NEW
connection the client opens first resolves the host (`socket.getaddrinfo`, in the connecting
thread's control with a timeout), refuses it when ANY resolved address is refused under the
allowance (`EndpointRefused`, the reason naming the category), and then connects to one of exactly
those checked addresses, never resolving again. TLS still verifies the certificate against the
host NAME, and the Host header and SigV4 signature still use the name: only the socket's
destination is pinned. Kept-alive connections were checked when they were opened.

How: botocore gives no public hook for socket creation, so this swaps the connection classes of
the client's urllib3 pools (`URLLib3Session._pool_classes_by_scheme`, shared with its PoolManager
and any proxy manager) for subclasses whose `_new_conn` does the above by pointing urllib3's
`_dns_host` (the name urllib3 resolves, kept apart from `host`, which TLS and headers use) at the
checked address for the duration of the connect. Both are private attributes (botocore 1.3x-1.4x,
urllib3 2.x); `guard_client` raises at once if they are missing, so an upgrade that changes them
fails the tests instead of silently dropping the guard.

Redirects: botocore sends with `urllib3 Retry(False)`, so no 3xx is followed by the HTTP layer
(`Location` is never read). Its S3 region redirector (`botocore.utils.S3RegionRedirectorv2`) keeps
a custom `endpoint_url` and only re-signs for the region a 301/302/307 names; but when the answer
names none, it asks `HeadBucket` for it, whose own 301 asks again, and so on: a bucket answering
every request with a bare 301 drives the client into unbounded recursion, hundreds of requests and
then a `RecursionError` that no storage error handler catches (found with the redirect test
against botocore 1.44). Guarded clients therefore mark every request as already redirected, which
switches that redirector off: a committed bucket must name its region correctly, and a 3xx is
just a refused request. tests/test_endpoint_policy.py checks both against a redirecting server.

Through a proxy (HTTPS_PROXY in the environment) the socket goes to the operator's proxy, which
resolves the bucket's name itself; only the static check of the URL applies then.

A refusal raised here reaches the caller wrapped by botocore (`HTTPClientError`, whose message
carries the reason); `transport.bucket_errors` treats that as transient, so a refused endpoint
costs its owner the bucket's retry budget, each attempt resolving and checking afresh.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
from typing import Any

from urllib3.exceptions import ConnectTimeoutError

from protocol.endpoint_policy import EndpointAllowance, address_category, address_problem

DEFAULT_RESOLVE_TIMEOUT_S = 5.0


class EndpointRefused(ValueError):
    """A bucket endpoint resolved to an address the endpoint policy refuses (or did not resolve in time).

    A ValueError, not an OSError: urllib3 would otherwise take it for a network failure and replace
    the message; botocore wraps it in HTTPClientError with the message intact.
    """


def resolve(host: str, port: int, timeout_s: float) -> list[str]:
    """Every address `host` resolves to for a TCP connection, in getaddrinfo's order, within `timeout_s`.

    getaddrinfo has no timeout of its own (glibc retries per resolv.conf, 5 s × attempts), so it
    runs in a daemon thread that the caller stops waiting for; a stuck lookup then ends by itself.
    """
    box: dict[str, Any] = {}

    def lookup() -> None:
        try:
            box["infos"] = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            box["error"] = exc

    worker = threading.Thread(target=lookup, name=f"resolve {host}", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        raise EndpointRefused(f"endpoint host {host!r} did not resolve within {timeout_s:g} s")
    if "error" in box:
        raise EndpointRefused(f"endpoint host {host!r} does not resolve: {box['error']}")
    addresses: list[str] = []
    for _family, _type, _proto, _canon, sockaddr in box["infos"]:
        if sockaddr[0] not in addresses:
            addresses.append(sockaddr[0])
    if not addresses:
        raise EndpointRefused(f"endpoint host {host!r} resolves to no address")
    return addresses


def checked_addresses(host: str, port: int, allowance: EndpointAllowance,
                      timeout_s: float = DEFAULT_RESOLVE_TIMEOUT_S) -> list[str]:
    """The addresses to connect to for `host`; EndpointRefused when ANY of them is refused.

    Any, not all: a name answering one public and one internal address would otherwise reach the
    internal one whenever the public one fails or is tried second.
    """
    addresses = resolve(host, port, timeout_s)
    for text in addresses:
        ip = ipaddress.ip_address(text)
        problem = address_problem(ip, allowance)
        if problem is not None:
            where = problem if text == host else f"{host!r} resolves to {text}, {address_category(ip)}"
            raise EndpointRefused(f"endpoint host {where}")
    return addresses


class _GuardedConnection:
    """Mixin over botocore's urllib3 connection classes: `_new_conn` connects only to checked addresses."""

    endpoint_allowance: EndpointAllowance
    resolve_timeout_s: float

    def _new_conn(self) -> socket.socket:
        if getattr(self, "proxy", None) is not None:  # the operator's proxy resolves the name
            return super()._new_conn()  # type: ignore[misc]
        name: str = self._dns_host  # type: ignore[attr-defined]
        addresses = checked_addresses(name, self.port, self.endpoint_allowance,  # type: ignore[attr-defined]
                                      self.resolve_timeout_s)
        last: Exception | None = None
        for address in addresses:
            self._dns_host = address  # what urllib3 connects to; TLS and Host keep using the name
            try:
                return super()._new_conn()  # type: ignore[misc]
            except ConnectTimeoutError as exc:  # and its subclass NewConnectionError: try the next address
                last = exc
            finally:
                self._dns_host = name
        assert last is not None
        raise last


def _guarded(pool_cls: type, allowance: EndpointAllowance, timeout_s: float) -> type:
    conn_cls = pool_cls.ConnectionCls
    guarded_conn = type(f"Guarded{conn_cls.__name__}", (_GuardedConnection, conn_cls),
                        {"endpoint_allowance": allowance, "resolve_timeout_s": timeout_s})
    return type(f"Guarded{pool_cls.__name__}", (pool_cls,), {"ConnectionCls": guarded_conn})


def guard_client(client: Any, allowance: EndpointAllowance,
                 resolve_timeout_s: float = DEFAULT_RESOLVE_TIMEOUT_S) -> None:
    """Make every connection `client` (a botocore client) opens pass the endpoint policy under `allowance`.

    Call before the client's first request. RuntimeError when botocore's internals are not the ones
    this was written against (see the module docstring).
    """
    session = getattr(getattr(client, "_endpoint", None), "http_session", None)
    pools = getattr(session, "_pool_classes_by_scheme", None)
    manager = getattr(session, "_manager", None)
    if not isinstance(pools, dict) or getattr(manager, "pool_classes_by_scheme", None) is not pools:
        raise RuntimeError("botocore's HTTP session is not the one transport.endpoint_guard knows; "
                           "cannot pin bucket connections to checked addresses")
    for scheme, pool_cls in list(pools.items()):
        if not issubclass(pool_cls.ConnectionCls, _GuardedConnection):
            pools[scheme] = _guarded(pool_cls, allowance, resolve_timeout_s)
    manager.clear()  # no pool built before the swap may survive it
    # after the redirector's own before-parameter-build handler, which sets redirected=False
    client.meta.events.register_last("before-parameter-build.s3", _no_region_redirect)


def _no_region_redirect(context: dict[str, Any], **_kwargs: Any) -> None:
    """Tell botocore's S3 region redirector this request was redirected already (see the module docstring)."""
    context.setdefault("s3_redirect", {})["redirected"] = True
