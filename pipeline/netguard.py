"""The address guard: which URLs the downloader may fetch, and the address it connects to.

Rules (DESIGN.md, "Defaults that hold without configuration"):

- only ``http`` and ``https``; no credentials in the URL;
- the host is either an IP literal (dotted quad, but also the decimal ``2130706433``, hex
  ``0x7f000001``, octal ``0177.0.0.1`` and short ``127.1`` forms that ``inet_aton`` and browsers
  accept, or a bracketed IPv6 literal) or a name that is resolved with ``getaddrinfo``;
- EVERY resolved address is checked against the refused ranges (private, loopback, link-local,
  shared/CGNAT, multicast, reserved, documentation, IPv4-mapped IPv6, ...); one refused address
  refuses the whole name, so a name cannot smuggle an internal address next to a public one;
- the caller connects to an address that was checked (:func:`resolve_checked` returns them),
  never re-resolving the name, so DNS rebinding between check and connect is impossible.

``allowed_networks`` (CIDR strings) re-admits addresses inside those networks; tests and the demo
allow ``127.0.0.1/32``. The classifier (:func:`classify_address`) is pure: it never touches the
network, so it is unit-tested on ranges no test may send a packet to.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from urllib.parse import SplitResult, quote, urlsplit

from pipeline import schema as S

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class GuardError(Exception):
    """A URL or address was refused. ``status`` is the row status to record.

    Statuses: ``bad_scheme`` (not http/https), ``bad_url`` (unparseable or malformed),
    ``blocked_address`` (an address in a refused range).
    """

    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class ResolveError(Exception):
    """Name resolution failed. ``transient`` is True when a retry may succeed (EAI_AGAIN)."""

    def __init__(self, message: str, *, transient: bool, timed_out: bool = False) -> None:
        super().__init__(message)
        self.transient = transient
        self.timed_out = timed_out


# Refused IPv4 ranges, first match wins (IANA special-purpose registry, RFC 6890 and successors).
_V4_REFUSED: tuple[tuple[ipaddress.IPv4Network, str], ...] = tuple(
    (ipaddress.IPv4Network(net), label)
    for net, label in (
        ("0.0.0.0/8", "this-network"),
        ("10.0.0.0/8", "private"),
        ("100.64.0.0/10", "shared (carrier-grade NAT)"),
        ("127.0.0.0/8", "loopback"),
        ("169.254.0.0/16", "link-local"),
        ("172.16.0.0/12", "private"),
        ("192.0.0.0/24", "reserved (IETF protocol assignments)"),
        ("192.0.2.0/24", "documentation"),
        ("192.88.99.0/24", "reserved (6to4 relay anycast)"),
        ("192.168.0.0/16", "private"),
        ("198.18.0.0/15", "benchmarking"),
        ("198.51.100.0/24", "documentation"),
        ("203.0.113.0/24", "documentation"),
        ("224.0.0.0/4", "multicast"),
        ("240.0.0.0/4", "reserved"),  # includes the limited broadcast 255.255.255.255
    )
)

# Refused IPv6 ranges, checked before the "global unicast only" rule below.
_V6_REFUSED: tuple[tuple[ipaddress.IPv6Network, str], ...] = tuple(
    (ipaddress.IPv6Network(net), label)
    for net, label in (
        ("::/128", "unspecified"),
        ("::1/128", "loopback"),
        ("::ffff:0:0/96", "IPv4-mapped"),
        ("::/96", "IPv4-compatible (deprecated)"),
        ("64:ff9b:1::/48", "reserved (local-use NAT64)"),
        ("100::/64", "reserved (discard-only)"),
        ("2001:db8::/32", "documentation"),
        ("2001::/23", "reserved (IETF protocol assignments)"),
        ("3fff::/20", "documentation"),
        ("5f00::/16", "reserved (SRv6 SIDs)"),
        ("fc00::/7", "unique-local"),
        ("fe80::/10", "link-local"),
        ("fec0::/10", "site-local (deprecated)"),
        ("ff00::/8", "multicast"),
    )
)
_V6_GLOBAL_UNICAST = ipaddress.IPv6Network("2000::/3")
_V6_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_V6_6TO4 = ipaddress.IPv6Network("2002::/16")


def classify_address(ip: IPAddress) -> str | None:
    """Name of the refused range ``ip`` falls in, or None for a public (global) address.

    Pure function: no I/O. Translation prefixes that carry an IPv4 address (NAT64
    ``64:ff9b::/96``, 6to4 ``2002::/16``) are judged by the IPv4 address they reach. Any IPv6
    address outside the global unicast block ``2000::/3`` is refused as reserved.
    """
    if isinstance(ip, ipaddress.IPv4Address):
        for net, label in _V4_REFUSED:
            if ip in net:
                return label
        return None
    for net, label in _V6_REFUSED:
        if ip in net:
            return label
    if ip in _V6_NAT64:
        inner = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        label = classify_address(inner)
        return None if label is None else f"NAT64 of {inner} ({label})"
    if ip in _V6_6TO4:
        inner = ip.sixtofour
        assert inner is not None
        label = classify_address(inner)
        return None if label is None else f"6to4 of {inner} ({label})"
    if ip not in _V6_GLOBAL_UNICAST:
        return "reserved (outside 2000::/3)"
    return None


class AddressPolicy:
    """The refused ranges minus the ``allowed_networks`` override.

    ``allowed_networks``: CIDR strings (``"127.0.0.1/32"``, ``"::1/128"``). An address inside one
    of them is allowed even when :func:`classify_address` refuses it; IPv4-mapped IPv6 forms of an
    allowed IPv4 network are NOT implied (allow the ``::ffff:a.b.c.d/128`` network explicitly).
    """

    def __init__(self, allowed_networks: Iterable[str] = ()) -> None:
        self.allowed = tuple(ipaddress.ip_network(n, strict=False) for n in allowed_networks)

    def refusal(self, ip: IPAddress) -> str | None:
        """Why ``ip`` is refused (a sentence naming the range), or None when it is allowed."""
        if any(ip.version == net.version and ip in net for net in self.allowed):
            return None
        label = classify_address(ip)
        if label is None:
            return None
        return f"{ip} is {label}"


_DIGITS = {10: re.compile(r"[0-9]+"), 8: re.compile(r"[0-7]*"), 16: re.compile(r"[0-9a-f]*")}


def _ipv4_part(part: str) -> int | None:
    """Value of one dotted part as inet_aton reads it (0x.. hex, 0.. octal, else decimal)."""
    if part.startswith(("0x", "0X")):
        digits, base = part[2:], 16
    elif len(part) > 1 and part.startswith("0"):
        digits, base = part[1:], 8
    else:
        digits, base = part, 10
    if not _DIGITS[base].fullmatch(digits.lower()):
        return None
    return int(digits, base) if digits else 0


def parse_ipv4_literal(host: str) -> ipaddress.IPv4Address | None:
    """Read ``host`` as an IPv4 address in any form inet_aton / browsers accept, else None.

    ``127.0.0.1``, ``2130706433``, ``0x7f000001``, ``0177.0.0.1``, ``127.1``, ``0x7f.1`` all give
    127.0.0.1. Raises :class:`GuardError` (``bad_url``) when the last label is numeric but the
    whole is not a valid address (``1.2.3.4.5``, ``256.1.1.1``): such a host is never a DNS name
    a browser would look up, so it is refused rather than handed to the resolver.
    """
    labels = host.split(".")
    if labels and labels[-1] == "" and len(labels) > 1:
        labels = labels[:-1]  # a trailing dot is the DNS root, same address
    if not labels or _ipv4_part(labels[-1]) is None:
        return None
    values = [_ipv4_part(p) for p in labels]
    if len(labels) > 4 or any(v is None for v in values):
        raise GuardError(S.BAD_URL, f"host {host!r} is neither a name nor a valid IPv4 address")
    nums = [v for v in values if v is not None]
    head, last = nums[:-1], nums[-1]
    if any(v > 255 for v in head) or last >= 256 ** (5 - len(nums)):
        raise GuardError(S.BAD_URL, f"host {host!r} is an out-of-range IPv4 address")
    value = last
    for i, v in enumerate(head):
        value |= v << (8 * (3 - i))
    return ipaddress.IPv4Address(value)


@dataclass(frozen=True)
class Target:
    """A guarded URL, split into what the connection needs.

    ``host``: the lower-cased ASCII (IDNA) host name or canonical IP text, without brackets.
    ``ip``: the address when the URL held an IP literal, else None (resolve it).
    ``request_target``: path and query sent on the request line (fragment dropped), ASCII:
    other characters percent-encoded as UTF-8 (:func:`_request_target`).
    ``host_header``: the ``Host`` header value (name, plus ``:port`` when not the default).
    """

    url: str
    scheme: str
    host: str
    port: int
    ip: IPAddress | None
    request_target: str
    host_header: str


_DEFAULT_PORTS = {"http": 80, "https": 443}
# What a path or query may hold unescaped (RFC 3986 pchar, plus "/" and, in the query, "?"),
# and "%": escapes the URL already has are kept as they are.
_PATH_SAFE = "/:@!$&'()*+,;=-._~%"
_QUERY_SAFE = _PATH_SAFE + "?"


def _request_target(path: str, query: str) -> str:
    """The request line's target: LAION-style lists hold many paths and queries in other
    scripts (and ``"``, ``<``, ``{``, ...) that a browser or curl would send percent-encoded
    as UTF-8; so do we. Raises :class:`GuardError` (bad_url) for text that is not Unicode
    (a lone surrogate)."""
    try:
        out = quote(path or "/", safe=_PATH_SAFE)
        if query:
            out += "?" + quote(query, safe=_QUERY_SAFE)
    except UnicodeEncodeError as e:
        raise GuardError(S.BAD_URL, f"URL path or query is not valid Unicode ({e.reason})") from e
    return out


_BAD_URL_CHARS = re.compile(r"[\x00-\x20\x7f\\]")


def parse_url(url: str) -> Target:
    """Split and check ``url``; raise :class:`GuardError` (bad_scheme / bad_url / blocked_address).

    IP-literal hosts are classified here, before any connection; names are checked later by
    :func:`resolve_checked`, which needs the policy and a resolver.
    """
    if not isinstance(url, str) or not url:
        raise GuardError(S.BAD_URL, "empty URL")
    if _BAD_URL_CHARS.search(url.strip()):
        raise GuardError(S.BAD_URL, "URL contains whitespace, control characters or backslashes")
    url = url.strip()
    try:
        parts: SplitResult = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in _DEFAULT_PORTS:
            raise GuardError(
                S.BAD_SCHEME, f"scheme {scheme or '(none)'!r} refused: only http and https"
            )
        port = parts.port or _DEFAULT_PORTS[scheme]
    except ValueError as e:  # bad port, bad IPv6 brackets
        raise GuardError(S.BAD_URL, f"cannot parse URL: {e}") from e
    if parts.username is not None or parts.password is not None:
        raise GuardError(S.BAD_URL, "credentials in the URL are refused")
    raw_host = parts.hostname  # lower-cased, brackets removed
    if not raw_host:
        raise GuardError(S.BAD_URL, "URL has no host")
    ip: IPAddress | None
    if "[" in parts.netloc:  # bracketed: must be an IPv6 literal
        if "%" in raw_host:
            raise GuardError(S.BAD_URL, "IPv6 zone identifiers are refused")
        try:
            ip = ipaddress.IPv6Address(raw_host)
        except ValueError as e:
            raise GuardError(S.BAD_URL, f"bad IPv6 literal {raw_host!r}") from e
        host = str(ip)
        host_text = f"[{host}]"
    else:
        try:
            ascii_host = raw_host.encode("idna").decode("ascii")
        except UnicodeError as e:
            raise GuardError(S.BAD_URL, f"host {raw_host!r} is not a valid name ({e})") from e
        ip = parse_ipv4_literal(ascii_host)
        host = str(ip) if ip is not None else ascii_host
        host_text = host
    request_target = _request_target(parts.path, parts.query)
    host_header = host_text if port == _DEFAULT_PORTS[scheme] else f"{host_text}:{port}"
    return Target(url, scheme, host, port, ip, request_target, host_header)


GetAddrInfo = Callable[..., Sequence[tuple]]


class Resolver:
    """``getaddrinfo`` with a deadline and a small cache.

    ``getaddrinfo`` cannot be interrupted, so it runs on a few dedicated threads and the caller
    waits at most until its deadline. The cache (``ttl_s`` seconds, at most ``max_entries``
    names) is safe for the guard: every cached address list is checked again on each use and the
    connection goes to a checked address.
    """

    def __init__(self, ttl_s: float = 60.0, max_entries: int = 4096, threads: int = 4) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._cache: dict[tuple[str, int], tuple[float, list[IPAddress]]] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="clipcurate-dns")

    def _lookup(self, host: str, port: int) -> list[IPAddress]:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        out: list[IPAddress] = []
        for _family, _type, _proto, _canon, sockaddr in infos:
            text = str(sockaddr[0]).split("%", 1)[0]
            addr = ipaddress.ip_address(text)
            if addr not in out:
                out.append(addr)
        return out

    def resolve(self, host: str, port: int, timeout_s: float) -> list[IPAddress]:
        """Every address ``host`` resolves to, in resolver order. Raises :class:`ResolveError`."""
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get((host, port))
            if hit is not None and hit[0] > now:
                return hit[1]
        future = self._pool.submit(self._lookup, host, port)
        try:
            addrs = future.result(timeout=max(timeout_s, 0.0))
        except FutureTimeout as e:
            raise ResolveError(
                f"name resolution of {host!r} exceeded the deadline",
                transient=False,
                timed_out=True,
            ) from e
        except socket.gaierror as e:
            transient = e.errno == socket.EAI_AGAIN
            raise ResolveError(f"cannot resolve {host!r}: {e}", transient=transient) from e
        except (OSError, UnicodeError, ValueError) as e:
            raise ResolveError(f"cannot resolve {host!r}: {e}", transient=False) from e
        if not addrs:
            raise ResolveError(f"{host!r} resolved to no address", transient=False)
        with self._lock:
            if len(self._cache) >= self.max_entries:
                self._cache.clear()
            self._cache[(host, port)] = (now + self.ttl_s, addrs)
        return addrs

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def resolve_checked(
    target: Target, policy: AddressPolicy, resolver: Resolver, timeout_s: float
) -> list[IPAddress]:
    """The addresses to connect to for ``target`` (in order), after checking every one of them.

    Raises :class:`GuardError` (``blocked_address``) when the literal, or ANY resolved address,
    is refused by ``policy``; :class:`ResolveError` when resolution fails. The caller connects
    only to these addresses, never to the name.
    """
    if target.ip is not None:
        addrs = [target.ip]
    else:
        addrs = resolver.resolve(target.host, target.port, timeout_s)
    for addr in addrs:
        reason = policy.refusal(addr)
        if reason is not None:
            via = "" if target.ip is not None else f"{target.host} resolves to "
            raise GuardError(S.BLOCKED_ADDRESS, f"{via}{reason}")
    return list(addrs)
