"""The endpoint policy (issue 14 item 4, docs/protocol.md §5): no miner-chosen endpoint reaches inside a node's network.

Three layers, each tested on the real thing: the pure rule on every address family and spelling
(`protocol.endpoint_policy`), the commitment parse path and the real devnet chain
(`parse_credentials`, `Chain.read_credentials`: a refused endpoint is a per-uid reason), and the
connection (`transport.endpoint_guard`: names resolved, every address checked, the socket pinned to a
checked one; botocore following no redirect), observed through Python's audit events
(`socket.getaddrinfo`, `socket.connect`, PEP 578) rather than mocks.
"""

from __future__ import annotations

import argparse
import ipaddress
import random
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from pydantic import SecretStr

from devnet.participant import DEVNET_ENDPOINT_OVERRIDES, devnet_endpoints
from devnet.s3 import HOST as DEVNET_S3_HOST
from neurons.node_config import NODE_FLAGS, BucketSettings, bucket_credentials
from protocol.chain_commitment import (
    CommitmentParseError,
    ReadCredentials,
    encode_credentials,
    parse_credentials,
)
from protocol.endpoint_policy import (
    ANY_ENDPOINT,
    STRICT,
    EndpointAllowance,
    endpoint_problem,
    host_problem,
    parse_ipv4,
)
from protocol.hparams import PRESETS, HParamsError, load_hparams
from protocol.storage_config import BucketConfig
from tests.plugins.s3 import TEST_STORAGE
from transport.bucket import Bucket, StorageError
from transport.endpoint_guard import EndpointRefused, checked_addresses, guard_client, resolve

KEY, SECRET = "READKEY0123456789AB", "read-secret-" + "x" * 24
LOOPBACK_ONLY_127_0_0_2 = EndpointAllowance(http=True, networks=(ipaddress.ip_network("127.0.0.2/32"),))
LOOPBACK = EndpointAllowance(http=True, networks=(ipaddress.ip_network("127.0.0.0/8"),
                                                  ipaddress.ip_network("::1/128")))

# Every category of issue 14's list, in the spellings an attacker would try, with the word the reason must name.
REFUSED = [
    ("https://127.0.0.1", "loopback"),
    ("https://127.0.0.1:9000/", "loopback"),
    ("https://127.255.255.254", "loopback"),
    ("https://2130706433/", "loopback"),            # decimal
    ("https://0x7f000001/", "loopback"),            # hex
    ("https://0X7F000001", "loopback"),
    ("https://0177.0.0.1/", "loopback"),            # octal first part
    ("https://0177.0000.0000.0001", "loopback"),
    ("https://127.1", "loopback"),                  # two parts: the last fills three bytes
    ("https://127.0.1", "loopback"),
    ("https://0x7f.1", "loopback"),
    ("https://127.0.0.1.", "loopback"),             # fully qualified spelling
    ("https://[::1]", "loopback"),
    ("https://[::1]:9000", "loopback"),
    ("https://[0:0:0:0:0:0:0:1]", "loopback"),
    ("https://[::ffff:127.0.0.1]", "IPv4-mapped form of 127.0.0.1, a loopback"),
    ("https://[::ffff:7f00:1]", "IPv4-mapped form of 127.0.0.1, a loopback"),
    ("https://localhost", "local-only name"),
    ("https://LOCALHOST:9000", "local-only name"),
    ("https://s3.localhost", "local-only name"),
    ("https://localhost.", "local-only name"),
    ("https://169.254.169.254", "link-local"),     # cloud metadata
    ("https://2852039166", "link-local"),          # 169.254.169.254 in decimal
    ("https://0xa9fea9fe", "link-local"),
    ("https://0251.0376.0251.0376", "link-local"),
    ("https://[::ffff:169.254.169.254]", "IPv4-mapped form of 169.254.169.254, a link-local"),
    ("https://[64:ff9b::a9fe:a9fe]", "NAT64 form of 169.254.169.254, a link-local"),
    ("https://[fe80::1]", "link-local"),
    ("https://[fe80::1%25eth0]", "link-local"),
    ("https://10.0.0.1", "private"),
    ("https://10.255.255.255", "private"),
    ("https://012.0.0.1", "private"),               # octal 012 = 10
    ("https://172.16.0.1", "private"),
    ("https://172.31.255.255", "private"),
    ("https://192.168.1.1", "private"),
    ("https://0xc0a80101", "private"),
    ("https://[fc00::1]", "private"),
    ("https://[fd12:3456:789a::1]", "private"),
    ("https://[::ffff:10.1.2.3]", "IPv4-mapped form of 10.1.2.3, a private"),
    ("https://[2002:0a00:0001::1]", "6to4 form of 10.0.0.1, a private"),
    ("https://100.64.0.1", "CGNAT"),
    ("https://100.127.255.254", "CGNAT"),
    ("https://0.0.0.0", "unspecified"),
    ("https://0", "unspecified"),
    ("https://0.1.2.3", "unspecified"),
    ("https://[::]", "unspecified"),
    ("https://224.0.0.1", "multicast"),
    ("https://239.255.255.250", "multicast"),
    ("https://[ff02::1]", "multicast"),
    ("https://255.255.255.255", "broadcast"),
    ("https://4294967295", "broadcast"),
    ("https://240.0.0.1", "reserved"),
    ("https://192.0.0.8", "reserved"),
    ("https://[100::1]", "reserved"),
    ("https://[::1.2.3.4]", "reserved"),           # IPv4-compatible (deprecated)
    ("https://[2001::1]", "reserved"),             # Teredo
    ("https://[4000::1]", "reserved"),             # outside 2000::/3
    ("https://192.0.2.10", "documentation"),
    ("https://[2001:db8::1]", "documentation"),
    ("https://198.18.0.1", "benchmarking"),
    ("https://minio:9000", "single-label"),
    ("https://metadata", "single-label"),
    ("https://printer.local", "local-only name"),
    ("https://router.home.arpa", "local-only name"),
    ("https://metadata.google.internal", "local-only name"),
    ("https://1.2.3.4.5", "not a valid IPv4"),
    ("https://08.0.0.1", "not a valid IPv4"),
    ("https://256.0.0.1", "not a valid IPv4"),
    ("https://1.2.65536", "not a valid IPv4"),
    ("https://4294967296", "not a valid IPv4"),
    ("https://0x", "not a valid IPv4"),
    ("https://example.123", "not a valid IPv4"),
    ("https://[::1", "malformed"),
    ("https://[not-v6]", "not a valid IPv6"),
    ("http://s3.amazonaws.com", "https"),
    ("ftp://s3.amazonaws.com", "not https"),
    ("https://user:pw@s3.amazonaws.com", "credentials"),
    ("https://s3.amazonaws.com/bucket", "no path"),
    ("https://s3.amazonaws.com?x=1", "no path"),
    ("https://s3.amazonaws.com#f", "no path"),
    ("https://s3.amazonaws.com:0", "port 0"),
    ("https://s3.amazonaws.com:70000", "out of range"),
    ("https://s3.amazonaws.com:", "malformed"),
    ("https://s3.amazon\taws.com", "whitespace"),
    ("https://127.0.0.1\\@s3.amazonaws.com", "backslash"),
    ("https://s3.amazonaws.com\n", "whitespace"),
    ("https://exämple.com", "non-ASCII"),
    ("https://ex_ample.com", "not a valid DNS name"),
    ("https://-bad.example.com", "not a valid DNS name"),
    ("s3.amazonaws.com", "not a URL"),
    ("", "empty"),
    ("https://" + "a" * 250 + ".com", "longer than"),
]
ACCEPTED = [
    "https://s3.amazonaws.com",
    "https://s3.eu-west-1.amazonaws.com/",
    "https://0123456789abcdef0123456789abcdef.r2.cloudflarestorage.com",
    "https://storage.googleapis.com:443",
    "https://minio.example.org:9000",
    "https://s3.example.com.",          # fully qualified
    "https://xn--bcher-kva.example",    # IDNA
    "https://1e100.net",                # starts with a digit, is a name
    "https://8.8.8.8",
    "https://134744072",                # 8.8.8.8 in decimal: public, so a spelling alone is not a reason
    "https://1.1.1.1:8443",
    "https://100.63.255.255",           # just below CGNAT
    "https://100.128.0.1",              # just above
    "https://172.15.255.255",           # just below 172.16/12
    "https://172.32.0.1",
    "https://[2606:4700:4700::1111]",
    "https://[::ffff:8.8.8.8]",         # IPv4-mapped of a public address
    "https://[64:ff9b::808:808]",       # NAT64 of 8.8.8.8 (DNS64 networks see every name this way)
]


@pytest.mark.parametrize(("url", "reason"), REFUSED)
def test_every_refused_address_family_and_spelling_names_its_reason(url, reason):
    problem = endpoint_problem(url)
    assert problem is not None and reason in problem, problem


@pytest.mark.parametrize("url", ACCEPTED)
def test_public_names_and_addresses_are_accepted(url):
    assert endpoint_problem(url) is None


def _inet_aton(text: str) -> ipaddress.IPv4Address | None:
    try:
        return ipaddress.IPv4Address(socket.inet_aton(text))
    except OSError:
        return None


def test_numeric_hosts_are_read_as_the_c_library_reads_them():
    """What `parse_ipv4` accepts, glibc's inet_aton (which getaddrinfo uses to connect) reads as the same
    address; what it does not accept is refused outright, so no numeric spelling reaches the resolver."""
    rng = random.Random(14)
    spellings = ["0", "00", "0x0", "1", "127.1", "0x7f.1", "0x7F.0.0.1", "0177.1", "1.2.3", "255.255.65535",
                 "1.16777215", "4294967295", "0x.1", "09", "1..2", "1.2.3.", ".1.2.3", "0xg", "00000000001",
                 "1.2.3.4.5", "0x100.1", "256.1", "1.0x1000000"]
    for _ in range(3000):
        parts = []
        for _ in range(rng.randint(1, 5)):
            value = rng.choice([rng.randint(0, 300), rng.randint(0, 1 << 32), rng.randint(0, 70000)])
            parts.append(rng.choice([str(value), f"0{value:o}", f"0x{value:x}", f"0X{value:X}"]))
        spellings.append(".".join(parts))
    agreed = 0
    for text in spellings:
        ours, theirs = parse_ipv4(text), _inet_aton(text)
        if ours is not None:
            assert ours == theirs, text
            agreed += 1
        else:
            assert host_problem(text) is not None, text  # never handed to the resolver as a name
        if theirs is not None and not theirs.is_global:
            assert host_problem(text) is not None, text  # every spelling of a non-public address is refused
    assert agreed > 500  # the sample really exercised the accepted spellings


def test_the_devnet_allowance_admits_its_own_s3_and_nothing_else_non_public():
    devnet = devnet_endpoints()
    assert devnet == load_hparams("tiny", list(DEVNET_ENDPOINT_OVERRIDES)).endpoints.allowance()
    assert endpoint_problem(f"http://{DEVNET_S3_HOST}:9000", devnet) is None
    assert endpoint_problem("http://[::ffff:127.0.0.1]:9000", devnet) is None  # carried IPv4 inside the allowance
    assert endpoint_problem("http://localhost:9000", devnet) is None  # local names pass; the guard checks them
    assert "link-local" in endpoint_problem("http://169.254.169.254", devnet)
    assert "private" in endpoint_problem("http://10.0.0.1:9000", devnet)
    assert "private" in endpoint_problem("http://[fc00::1]", devnet)
    assert "https" in endpoint_problem(f"http://{DEVNET_S3_HOST}:9000", STRICT)
    assert endpoint_problem("http://10.0.0.1", ANY_ENDPOINT) is None


def test_every_preset_is_strict_and_the_allowance_is_outside_the_revision():
    for name in PRESETS:
        assert load_hparams(name).endpoints.allowance() == STRICT, name
    devnet = load_hparams("tiny", list(DEVNET_ENDPOINT_OVERRIDES))
    assert devnet.endpoints.allow_http and devnet.revision() == load_hparams("tiny").revision()
    with pytest.raises(HParamsError, match="endpoints.allow_networks"):
        load_hparams("tiny", ['endpoints.allow_networks=["127.0.0.1/8"]'])  # host bits set: not a network


def _commitment(endpoint: str) -> str:
    return encode_credentials(ReadCredentials(endpoint=endpoint, region="auto", bucket="miner-bucket",
                                              access_key_id=KEY, secret_access_key=SecretStr(SECRET)))


def test_a_commitment_with_a_refused_endpoint_fails_to_parse_with_the_reason():
    for endpoint, reason in [("https://2130706433", "= 127.0.0.1 is a loopback"), ("http://s3.amazonaws.com", "https"),
                             ("https://169.254.169.254", "link-local"), ("https://[::ffff:10.0.0.1]", "private")]:
        with pytest.raises(CommitmentParseError) as err:
            parse_credentials(_commitment(endpoint))
        assert reason in str(err.value) and SECRET not in str(err.value)
    parsed = parse_credentials(_commitment("http://127.0.0.1:9000"), allowance=LOOPBACK)
    assert parsed.endpoint_allowance == LOOPBACK and parsed.bucket_config().endpoint_allowance == LOOPBACK
    local = ReadCredentials(endpoint="http://127.0.0.1:9000", region="auto", bucket="miner-bucket",
                            access_key_id=KEY, secret_access_key=SecretStr(SECRET))
    assert parsed == local and parsed.bucket_config() == local.bucket_config()  # the allowance is not identity
    assert local.bucket_config().endpoint_allowance is None  # built locally: not checked
    with pytest.raises(ValueError, match="loopback"):
        BucketConfig(endpoint_url="https://127.0.0.1", bucket="b-1", access_key_id=KEY,
                     secret_access_key=SecretStr(SECRET), endpoint_allowance=STRICT)


async def test_a_refused_endpoint_on_chain_is_a_per_uid_reason(chain_factory):
    chain = chain_factory()
    names = ["miner-0", "miner-1", "validator-0"]
    chains = {n: await chain.chain(n).connect() for n in names}
    try:
        await chains["miner-0"].commit_credentials(ReadCredentials(  # 169.254.169.254, spelled in hex
            endpoint="http://0xa9fea9fe", bucket="miner-0", access_key_id=KEY, secret_access_key=SecretStr(SECRET)))
        await chains["miner-1"].commit_credentials(ReadCredentials(
            endpoint=f"http://{DEVNET_S3_HOST}:9001", bucket="miner-1", access_key_id=KEY,
            secret_access_key=SecretStr(SECRET)))
        graph = await chains["validator-0"].metagraph()
        uid = {n: graph.uid_of(chains[n].hotkey) for n in names}
        reader = chains["validator-0"]
        assert reader.endpoints == devnet_endpoints()
        devnet_read = await reader.read_credentials()
        assert set(devnet_read.credentials) == {uid["miner-1"]}
        assert "169.254.169.254 is a link-local address" in devnet_read.errors[uid["miner-0"]]
        assert devnet_read.credentials[uid["miner-1"]].credentials.bucket_config().endpoint_allowance == devnet_endpoints()
        reader.endpoints = STRICT  # a mainnet node reading the same commitments
        strict_read = await reader.read_credentials()
        assert strict_read.credentials == {}
        assert "https" in strict_read.errors[uid["miner-1"]] and "link-local" not in strict_read.errors[uid["miner-1"]]
    finally:
        for c in chains.values():
            await c.close()


def test_the_own_bucket_is_held_to_the_network_policy_unless_the_operator_allows_private():
    settings = BucketSettings(endpoint="http://10.0.0.5:9000", name="own-bucket", read_key=KEY,
                              read_secret=SecretStr(SECRET), write_key="WRITEKEY0123456789AB",
                              write_secret=SecretStr("w" * 40))
    with pytest.raises(ValueError) as err:
        bucket_credentials(settings, STRICT)
    message = str(err.value)
    assert message.startswith("--bucket.endpoint") and "https" in message and "--bucket.allow-private" in message
    https_private = settings.model_copy(update={"endpoint": "https://10.0.0.5:9000"})
    with pytest.raises(ValueError, match="10.0.0.5 is a private address"):
        bucket_credentials(https_private, STRICT)
    creds = bucket_credentials(settings, STRICT, allow_private=True)
    assert creds.write_config().endpoint_allowance == ANY_ENDPOINT and creds.read.endpoint_url == settings.endpoint
    assert bucket_credentials(settings).read.endpoint_allowance is None  # no network policy given: unchecked
    parser = NODE_FLAGS.add_to(argparse.ArgumentParser())
    flags = ["--network", "local", "--netuid", "1"]
    assert NODE_FLAGS.parse(parser.parse_args([*flags, "--bucket.allow-private"])).bucket_allow_private
    assert not NODE_FLAGS.parse(parser.parse_args(flags)).bucket_allow_private


# --- the connection: resolve, check, pin ---------------------------------------------------------------

_AUDIT: list[tuple[str, tuple]] = []
_RECORDING = threading.Event()


def _audit(event: str, args: tuple) -> None:
    if _RECORDING.is_set() and event in ("socket.getaddrinfo", "socket.connect"):
        _AUDIT.append((event, args[:2] if event == "socket.getaddrinfo" else (args[1],)))


sys.addaudithook(_audit)  # PEP 578 hooks cannot be removed; this one records only inside `watch_sockets`


@contextmanager
def watch_sockets() -> Iterator[list[tuple[str, tuple]]]:
    """Every getaddrinfo (host, port) and connect (address) this process makes meanwhile, in order."""
    _AUDIT.clear()
    _RECORDING.set()
    try:
        yield _AUDIT
    finally:
        _RECORDING.clear()


def test_a_name_resolving_to_loopback_is_refused_at_connection_time():
    with pytest.raises(EndpointRefused, match=r"'localhost' resolves to 127\.0\.0\.1, a loopback address"):
        checked_addresses("localhost", 80, STRICT)
    with pytest.raises(EndpointRefused, match="loopback"):  # only 127.0.0.2 allowed: not what localhost is
        checked_addresses("localhost", 80, LOOPBACK_ONLY_127_0_0_2)
    assert "127.0.0.1" in checked_addresses("localhost", 80, LOOPBACK)
    start = time.monotonic()
    with pytest.raises(EndpointRefused, match="resolve"):
        resolve("no-such-bucket.invalid", 443, timeout_s=2.0)  # RFC 2606: never resolves
    assert time.monotonic() - start < 3.0


def test_guarded_bucket_checks_the_resolved_address_and_connects_to_it(s3_server, s3_bucket_name):
    port = s3_server.port
    plain = s3_server.bucket_config(s3_bucket_name)
    by_name = plain.model_dump() | {"endpoint_url": f"http://localhost:{port}",
                                     "secret_access_key": plain.secret_access_key}

    refused = Bucket(BucketConfig(**by_name, endpoint_allowance=LOOPBACK_ONLY_127_0_0_2), TEST_STORAGE)
    with watch_sockets() as seen, pytest.raises(StorageError) as err:
        refused.exists("peers/1.json")
    assert "'localhost' resolves to 127.0.0.1, a loopback address" in str(err.value)
    assert not [a for e, a in seen if e == "socket.connect"]  # not one connection was attempted

    allowed = Bucket(BucketConfig(**by_name, endpoint_allowance=LOOPBACK), TEST_STORAGE)
    with watch_sockets() as seen:
        allowed.put("peers/1.json", b"{}")
        assert allowed.get("peers/1.json", 100) == b"{}"
    connects = [i for i, (e, _) in enumerate(seen) if e == "socket.connect"]
    assert connects and all(seen[i][1][0][1] == port for i in connects)
    for i in connects:  # pinned: the lookup right before each connect is of the checked address, not the name
        last_lookup = next(a for e, a in reversed(seen[:i]) if e == "socket.getaddrinfo")
        assert last_lookup[0] == seen[i][1][0][0] and ipaddress.ip_address(last_lookup[0]).is_loopback
    assert ("localhost", port) in [a for e, a in seen if e == "socket.getaddrinfo"]  # the check resolved the name


def test_guard_client_refuses_a_client_it_cannot_guard():
    with pytest.raises(RuntimeError, match="cannot pin"):
        guard_client(object(), STRICT)


# --- redirects ----------------------------------------------------------------------------------------


class _Server:
    """A tiny HTTP server on one loopback address: every request answered by `reply`, every request counted."""

    def __init__(self, host: str, reply):
        self.hits: list[tuple[str, str, str]] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                owner.hits.append((self.command, self.path, self.headers.get("Host", "")))
                status, headers = reply()
                self.send_response(status)
                for k, v in {**headers, "Content-Length": "0"}.items():
                    self.send_header(k, v)
                self.end_headers()

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _any

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer((host, 0), Handler)
        self.host, self.port = host, self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def internal_service() -> Iterator[_Server]:
    """What a redirect must never reach: a service on another loopback address (127.0.0.3)."""
    server = _Server("127.0.0.3", lambda: (200, {}))
    yield server
    server.close()


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
@pytest.mark.parametrize("target", ["internal", "http://169.254.169.254/latest/meta-data/"])
@pytest.mark.parametrize(("guarded", "names_region"), [(True, True), (True, False), (False, True)])
def test_redirects_to_internal_addresses_are_not_followed(status, target, guarded, names_region, internal_service):
    """A hostile bucket on 127.0.0.2 (the only address its allowance admits) redirects every request.

    Unguarded too: botocore itself must not follow (urllib3 `Retry(False)`; its S3 region redirector
    keeps the endpoint), since nothing after the HTTP layer could re-check the target. A redirect that
    names no region sends an unguarded botocore client into HeadBucket recursion (hundreds of requests,
    then RecursionError); a guarded one makes one request per attempt (transport/endpoint_guard.py).
    """
    location = f"http://127.0.0.3:{internal_service.port}/b-1/k" if target == "internal" else target
    headers = {"Location": location} | ({"x-amz-bucket-region": "eu-west-1"} if names_region else {})
    hostile = _Server("127.0.0.2", lambda: (status, headers))
    try:
        config = BucketConfig(endpoint_url=f"http://127.0.0.2:{hostile.port}", bucket="b-1", access_key_id=KEY,
                              secret_access_key=SecretStr(SECRET),
                              endpoint_allowance=LOOPBACK_ONLY_127_0_0_2 if guarded else None)
        bucket = Bucket(config, TEST_STORAGE)
        operations = (lambda: bucket.get("k", 100), lambda: bucket.list("g/"), lambda: bucket.put("k", b"x"))
        with watch_sockets() as seen:
            for op in operations:
                with pytest.raises(StorageError):
                    op()
        assert internal_service.hits == []
        assert hostile.hits and {h for _, _, h in hostile.hits} == {f"127.0.0.2:{hostile.port}"}
        connected = {a[0] for e, a in seen if e == "socket.connect"}
        assert connected == {("127.0.0.2", hostile.port)}, connected
        if guarded:  # no region redirect: at most one request per attempt
            assert len(hostile.hits) <= len(operations) * TEST_STORAGE.max_attempts
    finally:
        hostile.close()
