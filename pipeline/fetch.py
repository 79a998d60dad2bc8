"""The guarded HTTP client behind the download stage.

One :class:`Fetcher` per worker process: keep-alive connections keyed by (checked address,
host name) (:mod:`pipeline.http_pool`), a per-host concurrency limit, a total deadline per
attempt enforced by a watchdog thread (connect + headers + body, however slowly a server
trickles bytes), a byte cap checked while streaming, the address guard
(:mod:`pipeline.netguard`) at every redirect hop, X-Robots-Tag opt-outs, and retries of
transient failures only.
"""

from __future__ import annotations

import email.utils
import heapq
import http.client
import itertools
import random
import re
import socket
import ssl
import threading
import time
import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from urllib.parse import urljoin

from pipeline import schema as S
from pipeline.blocklist import Blocklist
from pipeline.config import DownloadConfig
from pipeline.http_pool import ConnectFailed, ConnectionPool, ConnectTimedOut, HTTPConnection
from pipeline.netguard import (
    AddressPolicy,
    GuardError,
    IPAddress,
    ResolveError,
    Resolver,
    Target,
    parse_url,
    resolve_checked,
)

PROJECT_URL = "https://github.com/clipcurate/clipcurate"
REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})
ACCEPTED_CODES = frozenset({200, 203})
_CHUNK = 64 * 1024
_DRAIN_LIMIT = 16 * 1024


def clipcurate_version() -> str:
    try:
        return package_version("clipcurate")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "0+unknown"


def user_agent(token: str, also: Iterable[str] = ()) -> str:
    """``clipcurate/<version> (+<project url>; token <token>[; honours <other tokens>])``:
    identifiable, with the token site owners address in ``X-Robots-Tag: <token>: noai`` and the
    other tokens whose opt-outs are honoured too (``img2dataset``, whose job this does)."""
    others = [t for t in dict.fromkeys(a.strip().lower() for a in also) if t and t != token]
    honours = f"; honours {', '.join(others)}" if others else ""
    return f"clipcurate/{clipcurate_version()} (+{PROJECT_URL}; token {token}{honours})"


# Directives whose own syntax contains a colon (Google's X-Robots-Tag reference); any other
# "word: rest" element names a user-agent token.
_VALUED_DIRECTIVES = frozenset(
    {"max-snippet", "max-image-preview", "max-video-preview", "unavailable_after"}
)
_UA_TOKEN = re.compile(r"[a-z0-9_.*-]+")


def robots_directives(values: Iterable[str], token: str | Iterable[str]) -> set[str]:
    """Lower-cased X-Robots-Tag directives from header ``values`` that apply to ``token`` (one
    user-agent token, or several: a directive addressed to any of them applies).

    Each header value is a comma-separated list; ``name: directive`` switches the scope of that
    directive and the following ones in the same value to user agent ``name`` (Google's syntax:
    ``googlebot: nofollow, otherbot: noindex, nofollow``). Unscoped directives apply to every
    agent; directives scoped to another token are ignored. ``none`` expands to
    ``noindex, nofollow``.
    """
    tokens = {token.strip().lower()} if isinstance(token, str) else {t.strip().lower() for t in token}
    found: set[str] = set()
    for value in values:
        scope: str | None = None
        for element in value.split(","):
            element = element.strip()
            name, sep, rest = element.partition(":")
            name = name.strip().lower()
            if sep and name not in _VALUED_DIRECTIVES:
                if not _UA_TOKEN.fullmatch(name):
                    continue  # e.g. the tail of a date that contained a comma
                scope = name
                element = rest.strip()
                name, _, _ = element.partition(":")
                name = name.strip().lower()
            if not name or (scope is not None and scope not in tokens):
                continue
            found.update(("noindex", "nofollow") if name == "none" else (name,))
    return found


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait from a Retry-After value (delta-seconds or HTTP date), None if invalid.

    A date in the past gives 0.0.
    """
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    now = now or datetime.now(timezone.utc)
    return max(0.0, (when - now).total_seconds())


@dataclass
class FetchResult:
    """Outcome of fetching one URL (after redirects and retries).

    ``status``: ``ok`` or a failure status; ``body``: the accepted bytes (only when ok);
    ``http_status``: the last HTTP status received (None when no response came);
    ``attempts``: requests made for the first URL, retries included.
    """

    status: str
    error: str | None = None
    http_status: int | None = None
    body: bytes | None = None
    transient: bool = False
    retry_after: float | None = None
    attempts: int = 1
    not_connected: bool = False  # no TCP connection was made (another address may work)
    sha256: str | None = None  # hex digest of body, set by the download stage


class _Deadline:
    """One attempt's deadline; the watchdog shuts down the attached connection's socket."""

    __slots__ = ("at", "expired", "done", "conn", "lock")

    def __init__(self, at: float) -> None:
        self.at = at
        self.expired = False
        self.done = False
        self.conn: HTTPConnection | None = None
        self.lock = threading.Lock()

    def remaining(self) -> float:
        return self.at - time.monotonic()

    def attach(self, conn: HTTPConnection) -> None:
        with self.lock:
            self.conn = conn
            if self.expired:
                _abort(conn)

    def detach(self) -> None:
        with self.lock:
            self.conn = None

    def fire(self) -> None:
        # Under the lock, so a connection already detached and back in the pool is never hit.
        with self.lock:
            if self.done:
                return
            self.expired = True
            if self.conn is not None:
                _abort(self.conn)


def _abort(conn: HTTPConnection) -> None:
    sock = conn.live_sock
    if sock is not None:
        try:
            # The plain-socket shutdown also unblocks a TLS read without touching SSL state
            # that the reading thread is using.
            socket.socket.shutdown(sock, socket.SHUT_RDWR)
        except OSError:
            pass


class _Watchdog:
    """A daemon thread that fires expired deadlines (bounded work: a heap, one wake-up each)."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, _Deadline]] = []
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="clipcurate-deadline", daemon=True)
        self._thread.start()

    def arm(self, timeout_s: float) -> _Deadline:
        d = _Deadline(time.monotonic() + timeout_s)
        with self._cond:
            # Wake the thread only when its next wake-up must move earlier: with one timeout
            # for every request that is only when the heap was empty, which keeps the GIL
            # hand-offs off the hot path.
            earliest = self._heap[0][0] if self._heap else None
            heapq.heappush(self._heap, (d.at, next(self._seq), d))
            if earliest is None or d.at < earliest:
                self._cond.notify()
        return d

    def _run(self) -> None:
        with self._cond:
            while not self._closed:
                if not self._heap:
                    self._cond.wait()
                    continue
                at, _, d = self._heap[0]
                wait = at - time.monotonic()
                if d.done:
                    heapq.heappop(self._heap)
                elif wait > 0:
                    self._cond.wait(wait)
                else:
                    heapq.heappop(self._heap)
                    d.fire()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()


class HostLimiter:
    """At most ``limit`` simultaneous requests per host name; idle hosts are forgotten."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._slots: dict[str, list] = {}  # host -> [semaphore, users]

    @contextmanager
    def slot(self, host: str, timeout_s: float) -> Iterator[bool]:
        """Yield True once a slot is held, False if none freed up within ``timeout_s``."""
        with self._lock:
            entry = self._slots.setdefault(host, [threading.Semaphore(self.limit), 0])
            entry[1] += 1
        try:
            acquired = entry[0].acquire(timeout=max(timeout_s, 0.0))
            try:
                yield acquired
            finally:
                if acquired:
                    entry[0].release()
        finally:
            with self._lock:
                entry[1] -= 1
                if entry[1] == 0:
                    del self._slots[host]


class _Inflate:
    """Undo a ``gzip`` / ``deflate`` Content-Encoding that a server applied although we asked
    for ``identity`` (misconfigured CDNs do), never producing more than ``limit`` bytes:
    ``feed`` returns the decoded bytes of one chunk, or None once the output passes ``limit``.
    ``deflate`` is the zlib format by the RFC, raw deflate from some servers: the first chunk
    decides."""

    def __init__(self, encoding: str, limit: int) -> None:
        self._may_be_raw = encoding == "deflate"  # until the first chunk says which
        self._z = zlib.decompressobj(16 + zlib.MAX_WBITS if encoding != "deflate" else zlib.MAX_WBITS)
        self._left = limit + 1

    def feed(self, chunk: bytes) -> bytes | None:
        if self._may_be_raw:
            self._may_be_raw = False
            try:
                return self._take(self._z.decompress(chunk, self._left))
            except zlib.error:
                self._z = zlib.decompressobj(-zlib.MAX_WBITS)
        return self._take(self._z.decompress(chunk, self._left))

    def _take(self, out: bytes) -> bytes | None:
        self._left -= len(out)
        # Output stopped at the bound with input left over, or reached past the limit.
        if self._left <= 0 or self._z.unconsumed_tail:
            return None
        return out

    @property
    def complete(self) -> bool:
        return self._z.eof


class Fetcher:
    """Guarded, pooled, deadline-bounded HTTP GET of image URLs; thread-safe.

    ``fetch(url)`` never raises for a bad URL or a bad server: every outcome is a
    :class:`FetchResult`. Bodies are read only after the status and X-Robots-Tag were accepted,
    and are dropped (never returned) when the cap or deadline is hit.
    """

    def __init__(
        self, config: DownloadConfig, resolver: Resolver | None = None, blocklist: Blocklist | None = None
    ) -> None:
        self.config = config
        self.policy = AddressPolicy(config.allowed_networks)
        self.resolver = resolver or Resolver()
        self.limiter = HostLimiter(config.per_host_concurrency)
        self.token = config.user_agent_token.strip().lower()
        # Opt-outs addressed to our own token or to any of optout_tokens (img2dataset's).
        self.tokens = frozenset({self.token, *(t.strip().lower() for t in config.optout_tokens)})
        self.disallowed = frozenset(d.strip().lower() for d in config.disallowed_header_directives)
        # URL and domain lists, checked before every request, redirect hops included.
        self.blocklist = blocklist
        self.headers = {
            "User-Agent": user_agent(self.token, config.optout_tokens),
            "Accept": "image/avif,image/webp,image/png,image/jpeg,image/*;q=0.8,*/*;q=0.5",
            # Compressed transfer of images buys nothing and would let a small body expand.
            "Accept-Encoding": "identity",
        }
        self._watchdog = _Watchdog()
        self._pools = ConnectionPool(config.per_host_concurrency, max_keys=256, ca_certs=config.ca_certs)
        self._rng = random.Random()

    def close(self) -> None:
        self._pools.clear()
        self._watchdog.close()
        self.resolver.close()

    # -- retries -------------------------------------------------------------------------
    def fetch(self, url: str) -> FetchResult:
        """GET ``url`` with retries of transient failures (connection errors, 429, 5xx).

        Waits ``Retry-After`` when the server sent one (refusing to retry when it exceeds
        ``max_retry_after``), else ``backoff_base * 2**attempt`` seconds jittered by ±50 %.
        """
        cfg = self.config
        attempt = 0
        while True:
            result = self._attempt(url)
            result.attempts = attempt + 1
            if not result.transient or attempt >= cfg.retries:
                return result
            if result.retry_after is not None:
                if result.retry_after > cfg.max_retry_after:
                    result.error = (
                        f"{result.error}; Retry-After {result.retry_after:.0f} s exceeds "
                        f"max_retry_after {cfg.max_retry_after:.0f} s, not retried"
                    )
                    return result
                wait = result.retry_after
            else:
                wait = cfg.backoff_base * (2**attempt) * (0.5 + self._rng.random())
            time.sleep(wait)
            attempt += 1

    # -- one attempt: the redirect chain under one deadline ------------------------------
    def _attempt(self, url: str) -> FetchResult:
        deadline = self._watchdog.arm(self.config.timeout)
        try:
            current = url
            for _hop in range(self.config.max_redirects + 1):
                location = self._hop(current, deadline)
                if isinstance(location, FetchResult):
                    return location
                current = location
            return FetchResult(
                S.TOO_MANY_REDIRECTS,
                f"more than {self.config.max_redirects} redirects (last: {current})",
                http_status=None,
            )
        finally:
            with deadline.lock:
                deadline.done = True

    def _timeout(self, what: str, http_status: int | None = None) -> FetchResult:
        return FetchResult(
            S.TIMEOUT, f"{what} exceeded the {self.config.timeout:g} s deadline", http_status
        )

    def _hop(self, url: str, deadline: _Deadline) -> str | FetchResult:
        """Request ``url``; return the next URL for a redirect, else the final result."""
        if self.blocklist is not None:
            hit = self.blocklist.check_url(url)
            if hit is not None:  # no request at all, not even a DNS lookup
                return FetchResult(S.BLOCKED, f"{hit.reason()}: {url}")
        try:
            target = parse_url(url)
            addrs = resolve_checked(target, self.policy, self.resolver, deadline.remaining())
        except GuardError as e:
            return FetchResult(e.status, f"{e.message} ({url})")
        except ResolveError as e:
            if e.timed_out:
                return self._timeout("name resolution")
            return FetchResult(S.CONNECTION_ERROR, str(e), transient=e.transient)
        with self.limiter.slot(target.host, deadline.remaining()) as got_slot:
            if not got_slot:
                return self._timeout(f"waiting for a free connection slot to {target.host}")
            # Every address was checked; the next one is tried only when connecting to the
            # previous one failed (e.g. an AAAA record on a host without IPv6 routing).
            for i, ip in enumerate(addrs):
                result = self._request(target, ip, url, deadline)
                last = i == len(addrs) - 1
                if last or not (isinstance(result, FetchResult) and result.not_connected):
                    return result
            raise AssertionError("unreachable: resolve_checked never returns an empty list")

    def _request(
        self, target: Target, ip: IPAddress, url: str, deadline: _Deadline
    ) -> str | FetchResult:
        remaining = deadline.remaining()
        if remaining <= 0:
            return self._timeout("the request")
        headers = dict(self.headers, Host=target.host_header)
        try:
            conn = self._pools.get(ip, target.port, target.scheme, target.host, remaining, deadline.attach)
        except ConnectTimedOut:
            return self._timeout("connect")
        except ssl.SSLError as e:
            if deadline.expired:
                return self._timeout("connect")
            return FetchResult(S.TLS_ERROR, f"TLS failure: {e}")
        except ConnectFailed as e:
            if deadline.expired:
                return self._timeout("connect")
            return FetchResult(S.CONNECTION_ERROR, str(e), transient=True, not_connected=True)
        deadline.attach(conn)  # a kept connection: the watchdog may now shut it down
        keep = False
        try:
            try:
                conn.request("GET", target.request_target, headers=headers)
                resp = conn.getresponse()
            except TimeoutError:
                return self._timeout("connect + response headers")
            except (http.client.HTTPException, OSError) as e:
                if deadline.expired:
                    return self._timeout("connect + response headers")
                return FetchResult(S.CONNECTION_ERROR, f"{type(e).__name__}: {e}", transient=True)
            result = self._handle(resp, url, deadline)
            keep = resp.isclosed() and not deadline.expired
            return result
        finally:
            deadline.detach()
            if keep:
                self._pools.put(conn)
            else:
                conn.close()

    def _handle(self, resp: http.client.HTTPResponse, url: str, deadline: _Deadline) -> str | FetchResult:
        """Read what is wanted of ``resp``; a response left unread (``resp.isclosed()`` False)
        is closed with its connection by the caller."""
        code = resp.status
        if code not in ACCEPTED_CODES and code not in REDIRECT_CODES:
            self._discard(resp)
            transient = code == 429 or code >= 500
            retry_after = parse_retry_after(resp.getheader("Retry-After")) if transient else None
            return FetchResult(
                S.http_failure(code),
                f"HTTP {code} {resp.reason or ''}".strip(),
                code,
                transient=transient,
                retry_after=retry_after,
            )
        # Opt-outs are honoured on the image and on every redirect leading to it.
        if self.config.respect_optout:
            refused = robots_directives(resp.headers.get_all("X-Robots-Tag") or [], self.tokens)
            refused &= self.disallowed
            if refused:  # the body of an opted-out image is never read
                return FetchResult(
                    S.OPT_OUT, f"X-Robots-Tag: {', '.join(sorted(refused))} ({url})", code
                )
        if code in REDIRECT_CODES:
            location = resp.getheader("Location")
            self._discard(resp)
            if not location:
                return FetchResult(S.http_failure(code), "redirect without a Location header", code)
            return urljoin(url, location.strip())
        cap = self.config.max_bytes
        declared = resp.getheader("Content-Length")
        if declared is not None and declared.strip().isdigit() and int(declared) > cap:
            return FetchResult(
                S.TOO_LARGE, f"Content-Length {int(declared)} exceeds max_bytes {cap}", code
            )
        encoding = (resp.getheader("Content-Encoding") or "identity").strip().lower()
        # Other encodings (br, zstd, ...) are kept as sent: the decoder then names the failure.
        inflate = _Inflate(encoding.removeprefix("x-"), cap) if encoding in ("gzip", "x-gzip", "deflate") else None
        chunks: list[bytes] = []
        size = 0
        try:
            while not resp.isclosed():
                if deadline.remaining() <= 0 or deadline.expired:
                    return self._timeout("body download", code)
                # read(n), unlike read1(n), marks the response done when its declared length
                # was read, which lets the connection carry the next request.
                chunk = resp.read(_CHUNK)
                if not chunk:
                    break
                if inflate is not None:
                    chunk = inflate.feed(chunk)
                    if chunk is None:
                        return FetchResult(S.TOO_LARGE, f"body decoded from {encoding} exceeds max_bytes {cap}", code)
                size += len(chunk)
                if size > cap:
                    return FetchResult(S.TOO_LARGE, f"body exceeds max_bytes {cap}", code)
                chunks.append(chunk)
        except TimeoutError:
            return self._timeout("body download", code)
        except zlib.error as e:
            return FetchResult(S.INCOMPLETE_BODY, f"Content-Encoding {encoding}: {e}", code, transient=True)
        except (http.client.HTTPException, OSError) as e:
            if deadline.expired:
                return self._timeout("body download", code)
            return FetchResult(
                S.INCOMPLETE_BODY,
                f"body ended early after {size} bytes: {type(e).__name__}: {e}",
                code,
                transient=True,
            )
        if deadline.expired:  # the watchdog's shutdown can look like a clean end of body
            return self._timeout("body download", code)
        if resp.length:  # http.client ends a short Content-Length body quietly
            return FetchResult(
                S.INCOMPLETE_BODY,
                f"body ended early after {size} bytes of {size + resp.length} declared",
                code,
                transient=True,
            )
        if inflate is not None and not inflate.complete:
            return FetchResult(
                S.INCOMPLETE_BODY, f"Content-Encoding {encoding}: the compressed body ended early", code,
                transient=True,
            )
        return FetchResult(S.OK, None, code, body=b"".join(chunks))

    @staticmethod
    def _discard(resp: http.client.HTTPResponse) -> None:
        """Read a small unwanted body so that the connection can be reused; leave a large or
        endless one unread (its connection is then closed)."""
        declared = (resp.getheader("Content-Length") or "").strip()
        if declared.isdigit() and int(declared) <= _DRAIN_LIMIT:
            try:
                resp.read()
            except (http.client.HTTPException, OSError):
                pass
