"""Which S3 endpoints a node may connect to: the rule that keeps miner-chosen addresses out of its network.

Crucible is permissionless: any registered hotkey commits any endpoint URL on chain
(`protocol.chain_commitment`), and every validator and miner then connects to it. Without a rule, a
commitment naming `http://169.254.169.254/`, `http://127.0.0.1:2375/` or `http://10.0.0.5/` makes
every node send requests into its own network (server-side request forgery, OWASP SSRF Prevention
Cheat Sheet). Issue 14 item 4; docs/protocol.md §5.

An endpoint is accepted when (`endpoint_problem` returns None):

- it is `https://host[:port]` with at most a trailing `/`: no userinfo, path, query or fragment, no
  whitespace, control characters or backslashes (parsers disagree about those: WHATWG URL §4.4
  strips tabs and newlines, urllib does not). `http://` only when the allowance says so;
- the port, if given, is 1-65535. Ports are otherwise not restricted: S3-compatible servers (MinIO,
  rclone, Garage) listen on many ports, and it is the address rule that keeps requests out of
  internal networks, not the port;
- the host is a DNS name or a public IP address. A DNS name has at least two LDH labels (RFC 1123
  §2.1) and its last label is not numeric. Names that only a local resolver answers are refused
  like the addresses they stand for: `localhost` and `*.localhost` (RFC 6761 §6.3), `*.local`
  (mDNS, RFC 6762), `*.home.arpa` (RFC 8375), `*.internal` (ICANN, 2024), and single-label names,
  which the resolver completes with the machine's search domains (on GCP `metadata` becomes
  `metadata.google.internal`, 169.254.169.254);
- an IP literal in ANY spelling is normalised first, the way the C library that will connect reads
  it: glibc `inet_aton` (used by `getaddrinfo`) accepts 1 to 4 dot-separated parts, each decimal,
  octal (leading `0`) or hex (`0x`), the last part filling the remaining bytes, so `2130706433`,
  `0x7f000001`, `0177.0.0.1`, `127.1` and `0x7f.0.0.1` are all 127.0.0.1 (WHATWG URL §3.5, "IPv4
  parser", reads them the same). A host whose last label looks numeric but is none of these
  spellings (`1.2.3.4.5`, `08.0.0.1`, `0x.1`) is refused rather than guessed at. IPv6 literals in
  brackets are parsed by `ipaddress` (zone ids included); IPv4-mapped (`::ffff:a.b.c.d`), NAT64
  (`64:ff9b::/96`, RFC 6052) and 6to4 (`2002::/16`, RFC 3056) addresses are judged by the IPv4
  address they carry.

Refused address categories (`CATEGORIES`, from the IANA IPv4 and IPv6 Special-Purpose Address
Registries, RFC 6890; kept as an explicit table rather than `ipaddress.is_global`, whose answer
changed between Python releases, so every node decides alike): unspecified / "this network",
loopback, link-local (cloud metadata services live at 169.254.169.254), private (RFC 1918, unique
local fc00::/7), shared address space (CGNAT, RFC 6598), multicast, broadcast, documentation,
benchmarking, reserved, and every IPv6 address outside global unicast 2000::/3.

A DNS name passes this pure check; what it resolves to is checked again right before connecting, by
`transport.endpoint_guard`, which also makes the connection use the address it checked (DNS
rebinding). This module does no I/O: it is the contract every node applies alike.

The one way to let a refused address through is an `EndpointAllowance`: `http` (plain http) and
`networks` (CIDRs whose addresses are accepted although non-public). The network's allowance comes
from the hparams (`HParams.endpoints`, strict on every preset; the devnet allows loopback and http);
an operator may allow anything for their OWN bucket only (`--bucket.allow-private`).
"""

from __future__ import annotations

import ipaddress
import re

from pydantic import BaseModel, ConfigDict, Field

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_net = ipaddress.ip_network

# (network, category, source), most specific first. IANA IPv4 / IPv6 Special-Purpose Address Registries.
CATEGORIES: tuple[tuple[IPNetwork, str, str], ...] = (
    (_net("0.0.0.0/8"), "unspecified ('this network')", "RFC 1122 §3.2.1.3"),
    (_net("10.0.0.0/8"), "private", "RFC 1918"),
    (_net("100.64.0.0/10"), "shared address space (CGNAT)", "RFC 6598"),
    (_net("127.0.0.0/8"), "loopback", "RFC 1122"),
    (_net("169.254.0.0/16"), "link-local", "RFC 3927"),
    (_net("172.16.0.0/12"), "private", "RFC 1918"),
    (_net("192.0.0.0/24"), "reserved (IETF protocol assignments)", "RFC 6890"),
    (_net("192.0.2.0/24"), "documentation", "RFC 5737"),
    (_net("192.88.99.0/24"), "reserved (6to4 relay anycast)", "RFC 7526"),
    (_net("192.168.0.0/16"), "private", "RFC 1918"),
    (_net("198.18.0.0/15"), "benchmarking", "RFC 2544"),
    (_net("198.51.100.0/24"), "documentation", "RFC 5737"),
    (_net("203.0.113.0/24"), "documentation", "RFC 5737"),
    (_net("224.0.0.0/4"), "multicast", "RFC 5771"),
    (_net("255.255.255.255/32"), "broadcast", "RFC 919"),
    (_net("240.0.0.0/4"), "reserved", "RFC 1112 §4"),
    (_net("::/128"), "unspecified", "RFC 4291"),
    (_net("::1/128"), "loopback", "RFC 4291"),
    (_net("::/96"), "reserved (IPv4-compatible, deprecated)", "RFC 4291 §2.5.5.1"),
    (_net("64:ff9b:1::/48"), "private (local-use NAT64)", "RFC 8215"),
    (_net("100::/64"), "reserved (discard-only)", "RFC 6666"),
    (_net("2001:db8::/32"), "documentation", "RFC 3849"),
    (_net("2001::/23"), "reserved (IETF protocol assignments, Teredo)", "RFC 2928"),
    (_net("3fff::/20"), "documentation", "RFC 9637"),
    (_net("fc00::/7"), "private (unique local)", "RFC 4193"),
    (_net("fe80::/10"), "link-local", "RFC 4291"),
    (_net("fec0::/10"), "private (site-local, deprecated)", "RFC 3879"),
    (_net("ff00::/8"), "multicast", "RFC 4291"),
)
_GLOBAL_UNICAST_V6 = _net("2000::/3")
_MAPPED = _net("::ffff:0:0/96")
_NAT64 = _net("64:ff9b::/96")
_SIX_TO_FOUR = _net("2002::/16")

# Names only a local resolver answers (suffixes match the name itself and every subdomain).
LOCAL_NAMES: tuple[tuple[str, str], ...] = (
    ("localhost", "RFC 6761 §6.3"),
    ("local", "mDNS, RFC 6762"),
    ("home.arpa", "RFC 8375"),
    ("internal", "ICANN private-use TLD"),
)
_LABEL_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_NUMERIC_LABEL_RE = re.compile(r"[0-9]+|0x[0-9a-f]*")  # WHATWG "ends in a number"
_URL_RE = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*)://(?P<netloc>[^/?#]*)(?P<rest>.*)", re.IGNORECASE | re.DOTALL)
_HOST_PORT_RE = re.compile(r"(?P<host>\[[^\]]*\]|[^:\[\]]*)(?::(?P<port>[0-9]{1,5}))?")
MAX_URL_CHARS = 256


class EndpointAllowance(BaseModel):
    """What a node accepts beyond `https://` and public addresses. The default allows nothing more.

    `networks` lets addresses inside these CIDRs through although they are non-public (the devnet:
    127.0.0.0/8 and ::1/128); an IPv6 address carrying an IPv4 one passes when either is inside.
    Names that only a local resolver answers (`LOCAL_NAMES`, single labels) pass the pure check
    when `networks` is not empty; their resolved addresses must then be inside `networks`.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")
    http: bool = Field(False, description="Plain http:// endpoints are accepted.")
    networks: tuple[IPNetwork, ...] = Field((), description="Non-public networks whose addresses are accepted.")

    def admits(self, ip: IPAddress) -> bool:
        """Whether `ip` (or the IPv4 address it carries) lies in one of `networks`."""
        candidates = [ip]
        if (inner := embedded_ipv4(ip)) is not None:
            candidates.append(inner)
        return any(a.version == n.version and a in n for a in candidates for n in self.networks)


STRICT = EndpointAllowance()
# `--bucket.allow-private`: the operator's own bucket may be anywhere (their machine, their network).
ANY_ENDPOINT = EndpointAllowance(http=True, networks=(_net("0.0.0.0/0"), _net("::/0")))


def embedded_ipv4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv4-mapped, NAT64 (64:ff9b::/96) or 6to4 IPv6 address carries."""
    if not isinstance(ip, ipaddress.IPv6Address):
        return None
    if ip in _MAPPED or ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip in _SIX_TO_FOUR:
        return ip.sixtofour
    return None


def address_category(ip: IPAddress) -> str | None:
    """What makes `ip` non-public, as a phrase naming the category, range and source; None when public.

    e.g. "a loopback address (127.0.0.0/8, RFC 1122)", or for ::ffff:127.0.0.1 "the IPv4-mapped form
    of 127.0.0.1, a loopback address (127.0.0.0/8, RFC 1122)".
    """
    inner = embedded_ipv4(ip)
    if inner is not None:
        found = address_category(inner)
        kind = "IPv4-mapped" if ip in _MAPPED else "NAT64" if ip in _NAT64 else "6to4"
        return None if found is None else f"the {kind} form of {inner}, {found}"
    for net, category, source in CATEGORIES:
        if ip.version == net.version and ip in net:
            return f"{_article(category)} {category} address ({net}, {source})"
    if isinstance(ip, ipaddress.IPv6Address) and ip not in _GLOBAL_UNICAST_V6:
        return f"a reserved address (outside global unicast {_GLOBAL_UNICAST_V6}, RFC 4291 §2.4)"
    return None


def address_problem(ip: IPAddress, allowance: EndpointAllowance = STRICT) -> str | None:
    """None when a node may connect to `ip` under `allowance`; otherwise "IP is <category>"."""
    category = address_category(ip)
    if category is None or allowance.admits(ip):
        return None
    return f"{ip} is {category}"


def parse_ipv4(text: str) -> ipaddress.IPv4Address | None:
    """`text` as glibc `inet_aton` reads it (1-4 parts, decimal, 0-octal or 0x-hex); None if it is not one.

    Stricter than glibc in one way only: every part must have a digit ("0x" alone is refused), so
    what this accepts, inet_aton reads as the same address (a test checks both on many spellings).
    """
    parts = text.split(".")
    if not 1 <= len(parts) <= 4:
        return None
    values = []
    for part in parts:
        low = part.lower()
        if re.fullmatch(r"0x[0-9a-f]+", low):
            values.append(int(low[2:], 16))
        elif re.fullmatch(r"0[0-7]*", low):
            values.append(int(low, 8))
        elif re.fullmatch(r"[1-9][0-9]*", low):
            values.append(int(low))
        else:
            return None
    *head, last = values
    if any(v > 0xFF for v in head) or last >= 1 << (8 * (4 - len(head))):
        return None
    number = last
    for i, v in enumerate(head):
        number |= v << (8 * (3 - i))
    return ipaddress.IPv4Address(number)


def host_problem(host: str, allowance: EndpointAllowance = STRICT) -> str | None:
    """None when `host` (as written in a URL, IPv6 in brackets) passes the pure check; else why not."""
    shown = host.encode("unicode_escape").decode()[:80]
    if host.startswith("["):
        try:
            ip: IPAddress = ipaddress.IPv6Address(host[1:-1] if host.endswith("]") else "?")
        except ValueError:
            return f"host {shown!r} is not a valid IPv6 literal"
        problem = address_problem(ip, allowance)
        return None if problem is None else f"host {problem}"
    name = host.lower()
    name = name[:-1] if name.endswith(".") else name  # one trailing dot: the fully qualified form
    labels = name.split(".")
    if not name or not host.isascii():
        return f"host {shown!r} is not an ASCII DNS name or IP address (use the IDNA 'xn--' form)"
    if _NUMERIC_LABEL_RE.fullmatch(labels[-1]):
        ip4 = parse_ipv4(name)
        if ip4 is None:
            return f"host {shown!r} looks numeric but is not a valid IPv4 address"
        problem = address_problem(ip4, allowance)
        if problem is not None:
            spelled = "" if name == str(ip4) else f"{shown!r} = "
            return f"host {spelled}{problem}"
        if host.endswith("."):  # inet_aton refuses it, so the resolver would look it up as a NAME
            return f"host {shown!r} is a numeric address with a trailing dot, which resolvers read as a name"
        return None
    if len(name) > 253 or not all(_LABEL_RE.fullmatch(label) for label in labels):
        return f"host {shown!r} is not a valid DNS name (letters, digits and '-' in dot-separated labels)"
    for suffix, source in LOCAL_NAMES:
        if (name == suffix or name.endswith("." + suffix)) and not allowance.networks:
            return f"host {shown!r} is a local-only name ({source})"
    if len(labels) < 2 and not allowance.networks:
        return f"host {shown!r} is a single-label name, completed by the local resolver's search domains"
    return None


def split_endpoint(url: str) -> tuple[str, str, int | None] | str:
    """(scheme, host, port) of an endpoint URL, lowercase scheme, host as written; or why it is malformed."""
    if not isinstance(url, str) or not url:
        return "endpoint is empty"
    if len(url) > MAX_URL_CHARS:
        return f"endpoint is longer than {MAX_URL_CHARS} characters"
    if not url.isascii() or any(c.isspace() or not c.isprintable() or c == "\\" for c in url):
        return "endpoint contains whitespace, control characters, backslashes or non-ASCII characters"
    m = _URL_RE.fullmatch(url)
    if m is None:
        return "endpoint is not a URL (scheme://host[:port])"
    if m["rest"] not in ("", "/"):
        return "endpoint must be scheme://host[:port] with no path, query or fragment"
    if "@" in m["netloc"]:
        return "endpoint must not carry credentials (user@host)"
    hp = _HOST_PORT_RE.fullmatch(m["netloc"])
    if hp is None or not hp["host"]:
        return "endpoint host or port is malformed"
    port = None if hp["port"] is None else int(hp["port"])
    if port is not None and not 1 <= port <= 65535:
        return f"endpoint port {port} is out of range (1-65535)"
    return m["scheme"].lower(), hp["host"], port


def endpoint_problem(url: str, allowance: EndpointAllowance = STRICT) -> str | None:
    """None when a node may connect to the endpoint `url` under `allowance`; otherwise a one-line reason.

    Never raises on any input: commitments are written by strangers.
    """
    split = split_endpoint(url)
    if isinstance(split, str):
        return split
    scheme, host, _ = split
    if scheme not in ("https", "http"):
        return f"endpoint scheme {scheme!r} is not https"
    if scheme == "http" and not allowance.http:
        return "endpoint must use https:// (this network does not allow plain http)"
    problem = host_problem(host, allowance)
    return None if problem is None else f"endpoint {problem}"


def _article(text: str) -> str:
    return "an" if text[:1] in "aeiou" else "a"
