"""Keep-alive HTTP/1.1 connections to checked addresses, for :mod:`pipeline.fetch`.

A connection goes to the address the guard checked (never re-resolving the URL's name), while
the request's ``Host`` header, the TLS SNI and the certificate's name check use the URL's host
name. Idle connections are kept per (address, port, scheme, host name), at most ``per_key``
each, for at most ``max_keys`` keys, and at most ``max_idle`` in all (least recently used
evicted first); a kept connection that the server closed, or that has unread bytes (a body
longer than its Content-Length), is dropped instead of reused.

Built on ``http.client`` rather than urllib3, whose pool, retry and response layers cost about
twice a download's client CPU (bench/fetch_cpu.py) and whose features the fetcher turns off
(retries, redirects, pooling by URL host) or re-implements (deadlines, byte caps).
"""

from __future__ import annotations

import http.client
import resource
import select
import socket
import ssl
import threading
from collections import OrderedDict
from collections.abc import Callable

from pipeline.netguard import IPAddress

PoolKey = tuple[str, int, str, str]  # (address, port, scheme, host name)


class ConnectFailed(OSError):
    """No connection was made to the address (refused, unreachable, ...): another address of
    the same name may work. The cause is chained."""


class ConnectTimedOut(ConnectFailed):
    """Connecting took longer than the time left."""


class HTTPConnection(http.client.HTTPConnection):
    """A plain connection to a checked address.

    ``live_sock``: the connected socket, kept after ``http.client`` hands it to a response
    that closes the connection at its end (``sock`` is then None), so that a deadline can
    still shut it down while that body is read.
    """

    def __init__(self, ip: IPAddress, port: int, timeout: float) -> None:
        super().__init__(str(ip), port, timeout=timeout)
        self.live_sock: socket.socket | None = None
        self.pool_key: PoolKey | None = None  # set by the pool that made it

    def connect(self) -> None:
        super().connect()
        self.live_sock = self.sock


class HTTPSConnection(HTTPConnection):
    """TLS to a checked address, verified for ``server_hostname`` (SNI and the certificate's
    names), not for the address."""

    def __init__(
        self, ip: IPAddress, port: int, timeout: float, server_hostname: str, context: ssl.SSLContext
    ) -> None:
        super().__init__(ip, port, timeout)
        self.server_hostname = server_hostname
        self.context = context

    def connect(self) -> None:
        super().connect()
        assert self.sock is not None
        # The handshake runs after live_sock names the TLS socket, so a deadline can cut a
        # server that trickles its handshake.
        self.sock = self.context.wrap_socket(
            self.sock, server_hostname=self.server_hostname, do_handshake_on_connect=False
        )
        self.live_sock = self.sock
        self.sock.do_handshake()


def tls_context(ca_certs: str | None) -> ssl.SSLContext:
    """Certificate and host name verification on, TLS 1.2 at least; ``ca_certs`` (a PEM file)
    replaces the system's trust store when given."""
    ctx = ssl.create_default_context(cafile=ca_certs) if ca_certs else ssl.create_default_context()
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def _usable(conn: HTTPConnection) -> bool:
    """An idle kept-alive socket that is readable was closed by the server (or holds bytes no
    request asked for): either way it must not carry the next request."""
    sock = conn.sock
    if sock is None:
        return False
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return False
    # poll, not select: a worker holding many connections has descriptors above select's 1024.
    poller = select.poll()
    try:
        poller.register(sock, select.POLLIN)
        return not poller.poll(0)
    except (OSError, ValueError):
        return False


def default_max_idle(per_key: int, max_keys: int) -> int:
    """Idle connections to keep in all: ``per_key * max_keys``, but no more than a quarter of
    this process's descriptor limit (``RLIMIT_NOFILE``, soft), and at least ``per_key``.

    A list of many hosts fills every key: 256 keys of 8 idle sockets each would be 2,048
    descriptors, twice the usual default limit of 1,024, and the worker's next connection,
    spool file or decode child would fail with EMFILE. The rest of the limit stays for the
    requests in flight and everything else the worker opens."""
    full = per_key * max_keys
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return full
    return max(per_key, min(full, soft // 4))


class ConnectionPool:
    """Thread-safe idle-connection store; see the module docstring. ``max_idle`` None:
    :func:`default_max_idle`.

    ``get`` returns a connected connection (a kept one, or a new one connected within
    ``timeout_s`` seconds, raising :class:`ConnectFailed` / :class:`ConnectTimedOut` or
    ``ssl.SSLError``); ``put`` hands it back after a response was read to its end; one whose
    response was not read to its end is closed by the caller instead.
    """

    def __init__(self, per_key: int, max_keys: int = 256, ca_certs: str | None = None,
                 max_idle: int | None = None) -> None:
        self.per_key = per_key
        self.max_keys = max_keys
        self.max_idle = default_max_idle(per_key, max_keys) if max_idle is None else max_idle
        self._count = 0  # idle connections kept, over all keys
        self._ca_certs = ca_certs
        self._tls: ssl.SSLContext | None = None  # made on first use: loading CAs costs ~20 ms
        self._idle: OrderedDict[PoolKey, list[HTTPConnection]] = OrderedDict()
        self._lock = threading.Lock()
        self.connects = 0  # new connections made, for tests and benchmarks

    def _context(self) -> ssl.SSLContext:
        with self._lock:
            if self._tls is None:
                self._tls = tls_context(self._ca_certs)
            return self._tls

    def get(
        self,
        ip: IPAddress,
        port: int,
        scheme: str,
        host: str,
        timeout_s: float,
        on_new: Callable[[HTTPConnection], None] | None = None,
    ) -> HTTPConnection:
        """A connection for one request; ``on_new`` sees a new one before it connects (the
        caller's deadline attaches there, so the watchdog can abort a slow TLS handshake)."""
        key = (str(ip), port, scheme, host)
        while True:
            with self._lock:
                idle = self._idle.get(key)
                conn = idle.pop() if idle else None
                if conn is not None:
                    self._count -= 1
            if conn is None:
                break
            if _usable(conn):
                conn.sock.settimeout(timeout_s)  # type: ignore[union-attr]
                return conn
            conn.close()
        if scheme == "https":
            conn = HTTPSConnection(ip, port, timeout_s, host, self._context())
        else:
            conn = HTTPConnection(ip, port, timeout_s)
        conn.pool_key = key
        if on_new is not None:
            on_new(conn)
        try:
            conn.connect()
        except ssl.SSLError:
            conn.close()
            raise
        except TimeoutError as e:
            conn.close()
            raise ConnectTimedOut(f"connecting to {ip} port {port} timed out") from e
        except OSError as e:
            conn.close()
            raise ConnectFailed(f"cannot connect to {ip} port {port}: {e}") from e
        with self._lock:
            self.connects += 1
        return conn

    def put(self, conn: HTTPConnection) -> None:
        """Keep ``conn`` (from :meth:`get`) for the next request to the same address and host
        name, closing it when it cannot be kept."""
        key = conn.pool_key
        if conn.sock is None or key is None:  # the server said Connection: close
            conn.close()
            return
        evicted: list[HTTPConnection] = []
        with self._lock:
            idle = self._idle.get(key)
            if idle is None:
                idle = self._idle[key] = []
                while len(self._idle) > self.max_keys:
                    gone = self._idle.popitem(last=False)[1]
                    self._count -= len(gone)
                    evicted.extend(gone)
            else:
                self._idle.move_to_end(key)
            if len(idle) < self.per_key:
                idle.append(conn)
                self._count += 1
            else:
                evicted.append(conn)
            # Over the total: the least recently used keys give up their oldest first.
            while self._count > self.max_idle:
                oldest_key, oldest = next(iter(self._idle.items()))
                if oldest:
                    evicted.append(oldest.pop(0))
                    self._count -= 1
                if not oldest:
                    del self._idle[oldest_key]
        for c in evicted:
            c.close()

    def clear(self) -> None:
        with self._lock:
            conns = [c for idle in self._idle.values() for c in idle]
            self._idle.clear()
            self._count = 0
        for c in conns:
            c.close()
