"""A loopback HTTP proxy in front of an S3 endpoint that injects the faults real S3 shows.

Clients (boto3 in :class:`~pipeline.storage.Storage`, pyarrow's S3 filesystem, Ray workers)
are pointed at the proxy's ``endpoint_url`` instead of the server's; every request is forwarded
unchanged unless a fault rule claims it. Faults:

* :meth:`S3FaultProxy.fail` -- answer matching requests with an S3 error (``503 SlowDown`` by
  default) or reset the connection, for the first ``times`` matches, or once per object key
  (``per_key=True``: the first attempt of each object fails, a retry succeeds).
* :meth:`S3FaultProxy.outage` -- for ``seconds`` from now, every request fails: ``mode="503"``
  answers ``503 ServiceUnavailable``; ``mode="down"`` stops listening (new connections are
  refused) and resets open keep-alive connections, as an unreachable endpoint would.

* :meth:`S3FaultProxy.intercept` -- call a function (say, SIGKILL a driver) when the n-th
  matching request arrives, then drop that request's connection without an answer, before or
  after passing it on: "the writer died while this object was in flight". The hook point is
  a request, so a test can kill a process at an exact step of its work.

Every request is recorded (:attr:`S3FaultProxy.log`) with whether a fault answered it, so a
test can assert how many attempts a client made for one object.

    with LocalS3() as s3, S3FaultProxy(s3.endpoint_url) as proxy:
        proxy.fail(method="PUT", times=3)          # the next 3 PUTs get 503 SlowDown
        storage = Storage("s3://bucket/out", StorageConfig(s3_endpoint_url=proxy.endpoint_url))

Only loopback: the proxy binds 127.0.0.1 and refuses an upstream that is not a loopback URL.
"""

from __future__ import annotations

import http.client
import http.server
import ipaddress
import re
import socket
import struct
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType

HOST = "127.0.0.1"

# Headers that describe one hop, not the message; the proxy sets its own.
_HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade",
     "expect", "content-length"}
)


@dataclass
class FaultRule:
    """Which requests fail and how; see :meth:`S3FaultProxy.fail`."""

    method: str | None = None
    key_pattern: re.Pattern[str] | None = None
    times: int | None = None  # remaining failures; None: unlimited (per_key or until)
    per_key: bool = False
    until: float | None = None  # time.monotonic() after which the rule no longer applies
    status: int = 503
    code: str = "SlowDown"
    message: str = "Please reduce your request rate."
    reset: bool = False  # drop the connection instead of answering
    truncate: bool = False  # forward, send half the answer's body, then drop the connection
    hits: int = 0
    _keys_failed: set[str] = field(default_factory=set)

    def claims(self, method: str, path: str, now: float) -> bool:
        """True (and counts the hit) when this rule fails the request ``method path``."""
        if self.until is not None and now >= self.until:
            return False
        if self.method is not None and method != self.method:
            return False
        if self.key_pattern is not None and not self.key_pattern.search(path):
            return False
        if self.per_key:
            if path in self._keys_failed:
                return False
            self._keys_failed.add(path)
        elif self.times is not None:
            if self.times <= 0:
                return False
            self.times -= 1
        self.hits += 1
        return True


@dataclass
class Intercept:
    """A hook set with :meth:`S3FaultProxy.intercept`. ``fired`` is set once it ran; ``path``
    is the ``bucket/key`` of the request that fired it."""

    callback: Callable[[], None]
    method: str | None
    key_pattern: re.Pattern[str] | None
    nth: int
    forward: bool
    seen: int = 0
    path: str | None = None
    fired: threading.Event = field(default_factory=threading.Event)

    def claims(self, method: str, path: str) -> bool:
        if self.fired.is_set() or self.seen >= self.nth:
            return False
        if self.method is not None and method != self.method:
            return False
        if self.key_pattern is not None and not self.key_pattern.search(path):
            return False
        self.seen += 1
        if self.seen == self.nth:
            self.path = path
            return True
        return False


@dataclass(frozen=True)
class RequestRecord:
    """One request the proxy saw. ``path`` is ``bucket/key`` (URL-decoded, no query)."""

    method: str
    path: str
    query: str
    status: int | None  # what the client got; None when the connection was reset
    faulted: bool
    at: float  # time.monotonic()


def _is_loopback_url(url: str) -> bool:
    host = urllib.parse.urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect
    server: _ProxyServer

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - base signature
        pass  # the proxy's own log is S3FaultProxy.log

    def _body(self) -> bytes | None:
        """The request body, or None when the client hung up before sending all of it (a killed
        process mid-upload): a server never acts on such a request, so neither may the proxy."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts = []
            while True:
                size_line = self.rfile.readline()
                if not size_line.endswith(b"\n"):
                    return None
                size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while (line := self.rfile.readline()) not in (b"\r\n", b"\n"):
                        if not line:
                            return None  # the trailers (checksums) never came
                    break
                part = self.rfile.read(size)
                if len(part) < size:
                    return None
                parts.append(part)
                self.rfile.readline()
            return b"".join(parts)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        return body if len(body) == length else None

    def _handle(self) -> None:
        proxy = self.server.proxy
        split = urllib.parse.urlsplit(self.path)
        path = urllib.parse.unquote(split.path).lstrip("/")
        body = self._body()
        if body is None:
            proxy._record(self.command, path, split.query, None, False)
            self.close_connection = True
            return
        hook = proxy._claim_intercept(self.command, path)
        if hook is not None:
            if hook.forward:
                try:
                    proxy._forward(self.command, self.path, self.headers, body)
                except OSError:
                    pass  # the hook still runs: the point is the client never hears back
            try:
                hook.callback()
            finally:
                hook.fired.set()
                proxy._record(self.command, path, split.query, None, True)
                self._reset()
            return
        rule = proxy._claim(self.command, path)
        if rule is not None and rule.truncate:
            self._truncated(proxy, path, split.query, body)
            return
        if rule is not None and rule.reset:
            proxy._record(self.command, path, split.query, None, True)
            self._reset()
            return
        if rule is not None:
            proxy._record(self.command, path, split.query, rule.status, True)
            self._error(rule.status, rule.code, rule.message, path)
            return
        try:
            status, headers, payload = proxy._forward(self.command, self.path, self.headers, body)
        except OSError as e:
            proxy._record(self.command, path, split.query, 502, False)
            self._error(502, "BadGateway", f"upstream unreachable: {e}", path)
            return
        proxy._record(self.command, path, split.query, status, False)
        self.send_response(status)
        for name, value in headers:
            if name.lower() not in _HOP_BY_HOP:
                self.send_header(name, value)
        if self.command == "HEAD":
            # A HEAD answer carries the object's length but no body.
            length = next((v for n, v in headers if n.lower() == "content-length"), None)
            if length is not None:
                self.send_header("Content-Length", length)
            self.end_headers()
            return
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def _truncated(self, proxy: S3FaultProxy, path: str, query: str, body: bytes) -> None:
        # The headers promise the whole object; the connection dies half-way through its body.
        status, headers, payload = proxy._forward(self.command, self.path, self.headers, body)
        proxy._record(self.command, path, query, status, True)
        self.send_response(status)
        for name, value in headers:
            if name.lower() not in _HOP_BY_HOP:
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload[: len(payload) // 2])
        self.wfile.flush()
        self._reset()

    def _error(self, status: int, code: str, message: str, path: str) -> None:
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{code}</Code><Message>{message}</Message>"
            f"<Resource>/{path}</Resource><RequestId>{uuid.uuid4().hex}</RequestId></Error>"
        ).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("x-amz-request-id", uuid.uuid4().hex[:16])
        if status == 503:
            self.send_header("Retry-After", "0")
        if self.command == "HEAD":
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _reset(self) -> None:
        # SO_LINGER 0: close() sends RST, so the client sees a reset, not a clean end.
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle  # noqa: N815 - http.server names


class _ProxyServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, port: int, proxy: S3FaultProxy) -> None:
        self.proxy = proxy
        super().__init__((HOST, port), _Handler)


class S3FaultProxy:
    """Forward HTTP requests from 127.0.0.1:<port> to ``upstream`` (an S3 endpoint URL on a
    loopback address), injecting the faults set with :meth:`fail` and :meth:`outage`.

    upstream: ``http://127.0.0.1:<port>`` of the real (local) S3 server.
    port: port to listen on; 0 picks a free one (read :attr:`endpoint_url` after ``start``).
    upstream_timeout: seconds to wait for the upstream server per request.
    """

    def __init__(self, upstream: str, port: int = 0, upstream_timeout: float = 30.0) -> None:
        if not _is_loopback_url(upstream):
            raise ValueError(f"upstream must be a loopback URL, got {upstream!r}")
        split = urllib.parse.urlsplit(upstream)
        if split.scheme != "http" or split.port is None:
            raise ValueError(f"upstream must be http://host:port, got {upstream!r}")
        self._upstream = (split.hostname or HOST, split.port)
        self._upstream_timeout = upstream_timeout
        self._requested_port = port
        self._lock = threading.Lock()
        self._rules: list[FaultRule] = []
        self._intercepts: list[Intercept] = []
        self._server: _ProxyServer | None = None
        self._thread: threading.Thread | None = None
        self._down_until = 0.0
        self._restarter: threading.Thread | None = None
        self.port: int | None = None
        self.log: list[RequestRecord] = []

    # ------------------------------------------------------------------ lifecycle

    @property
    def endpoint_url(self) -> str:
        """``http://127.0.0.1:<port>``; only valid while started."""
        if self.port is None:
            raise RuntimeError("S3FaultProxy is not started")
        return f"http://{HOST}:{self.port}"

    def start(self) -> S3FaultProxy:
        """Bind and serve in a background thread."""
        if self._server is not None:
            raise RuntimeError("S3FaultProxy is already started")
        self._listen(self._requested_port)
        return self

    def _listen(self, port: int) -> None:
        server = _ProxyServer(port, self)
        self.port = server.server_address[1]
        thread = threading.Thread(target=server.serve_forever, name="s3-fault-proxy", daemon=True)
        thread.start()
        self._server, self._thread = server, thread

    def _close_listener(self) -> None:
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join()

    def stop(self) -> None:
        """Stop listening and end any outage in progress."""
        self._down_until = 0.0
        if self._restarter is not None:
            self._restarter.join()
            self._restarter = None
        self._close_listener()
        self.port = None

    def __enter__(self) -> S3FaultProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ------------------------------------------------------------------ faults

    def fail(
        self,
        method: str | None = "PUT",
        key_pattern: str | None = None,
        times: int | None = None,
        per_key: bool = False,
        seconds: float | None = None,
        status: int = 503,
        code: str = "SlowDown",
        message: str = "Please reduce your request rate.",
        reset: bool = False,
        truncate: bool = False,
    ) -> FaultRule:
        """Fail requests that match: ``method`` (None: any) and ``key_pattern`` (a regex searched
        in ``bucket/key``; None: any). Exactly one of ``times`` (the next N matches fail),
        ``per_key`` (the first request for each distinct ``bucket/key`` fails, later ones pass)
        or ``seconds`` (every match for that many seconds from now) must limit the rule.
        ``reset``: drop the connection instead of answering ``status``/``code``. ``truncate``:
        forward the request, then drop the connection half-way through the answer's body. Returns the
        rule; its ``hits`` counts the requests it failed."""
        if sum((times is not None, per_key, seconds is not None)) != 1:
            raise ValueError("give exactly one of times, per_key or seconds")
        rule = FaultRule(
            method=method.upper() if method else None,
            key_pattern=re.compile(key_pattern) if key_pattern else None,
            times=times,
            per_key=per_key,
            until=time.monotonic() + seconds if seconds is not None else None,
            status=status,
            code=code,
            message=message,
            reset=reset,
            truncate=truncate,
        )
        with self._lock:
            self._rules.append(rule)
        return rule

    def intercept(
        self,
        callback: Callable[[], None],
        method: str | None = None,
        key_pattern: str | None = None,
        nth: int = 1,
        forward: bool = False,
    ) -> Intercept:
        """When the ``nth`` request matching ``method`` and ``key_pattern`` (a regex searched in
        ``bucket/key``) arrives, run ``callback`` in the proxy's thread, then reset that
        request's connection without answering. ``forward``: pass the request on to the
        server before the callback (the object lands, its writer never learns it did);
        otherwise it is dropped (the object never lands). Fires once."""
        if nth < 1:
            raise ValueError(f"nth must be >= 1, got {nth}")
        hook = Intercept(callback, method.upper() if method else None,
                         re.compile(key_pattern) if key_pattern else None, nth, forward)
        with self._lock:
            self._intercepts.append(hook)
        return hook

    def outage(self, seconds: float, mode: str = "503") -> None:
        """Make the endpoint fail every request for ``seconds`` from now.

        ``mode="503"``: answer ``503 ServiceUnavailable``. ``mode="down"``: close the listening
        socket (connections are refused) and reset requests on open connections; the proxy
        listens again on the same port when the time is up."""
        if seconds <= 0:
            raise ValueError(f"seconds must be > 0, got {seconds}")
        if mode == "503":
            self.fail(method=None, seconds=seconds, status=503, code="ServiceUnavailable",
                      message="Service is unable to handle request.")
            return
        if mode != "down":
            raise ValueError(f"mode must be '503' or 'down', got {mode!r}")
        if self._server is None or self.port is None:
            raise RuntimeError("S3FaultProxy is not started")
        port = self.port
        self._down_until = time.monotonic() + seconds
        self.fail(method=None, seconds=seconds, reset=True)
        self._close_listener()

        def come_back() -> None:
            while time.monotonic() < self._down_until:
                time.sleep(0.05)
            if self._down_until == 0.0:
                return  # stopped meanwhile
            # Another process may grab the port in the gap in theory; on loopback with an
            # ephemeral port that is rare, so retry briefly rather than move.
            for _ in range(100):
                try:
                    self._listen(port)
                    return
                except OSError:
                    time.sleep(0.05)
            raise RuntimeError(f"S3FaultProxy could not listen on port {port} again")

        self._restarter = threading.Thread(target=come_back, name="s3-fault-proxy-up", daemon=True)
        self._restarter.start()

    def wait_up(self, timeout: float = 30.0) -> None:
        """Block until an outage started with ``mode="down"`` is over and the proxy listens."""
        if self._restarter is not None:
            self._restarter.join(timeout)
            if self._restarter.is_alive():
                raise TimeoutError("the proxy did not come back in time")
            self._restarter = None

    def clear(self) -> None:
        """Remove every fault rule and intercept (the request log stays)."""
        with self._lock:
            self._rules.clear()
            self._intercepts.clear()

    # ------------------------------------------------------------------ inspection

    def wait_quiet(self, seconds: float, timeout: float = 60.0) -> None:
        """Block until no request has arrived for ``seconds`` (the clients of a killed process
        may still finish a request or two after the kill). Raises TimeoutError."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                last = self.log[-1].at if self.log else 0.0
            now = time.monotonic()
            if now - last >= seconds:
                return
            if now >= deadline:
                raise TimeoutError(f"requests kept arriving for {timeout} s")
            time.sleep(min(0.1, seconds))

    def requests(self, method: str | None = None, key_pattern: str | None = None) -> list[RequestRecord]:
        """The recorded requests with this method and a path matching ``key_pattern``."""
        pattern = re.compile(key_pattern) if key_pattern else None
        with self._lock:
            log = list(self.log)
        return [
            r for r in log
            if (method is None or r.method == method.upper()) and (pattern is None or pattern.search(r.path))
        ]

    # ------------------------------------------------------------------ internals

    def _claim(self, method: str, path: str) -> FaultRule | None:
        now = time.monotonic()
        with self._lock:
            for rule in self._rules:
                if rule.claims(method, path, now):
                    return rule
        return None

    def _claim_intercept(self, method: str, path: str) -> Intercept | None:
        with self._lock:
            for hook in self._intercepts:
                if hook.claims(method, path):
                    return hook
        return None

    def _record(self, method: str, path: str, query: str, status: int | None, faulted: bool) -> None:
        with self._lock:
            self.log.append(RequestRecord(method, path, query, status, faulted, time.monotonic()))

    def _forward(
        self, method: str, target: str, headers: http.client.HTTPMessage, body: bytes
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        conn = http.client.HTTPConnection(*self._upstream, timeout=self._upstream_timeout)
        try:
            out = {k: v for k, v in headers.items() if k.lower() not in _HOP_BY_HOP}
            if body or method in ("PUT", "POST"):
                out["Content-Length"] = str(len(body))
            conn.request(method, target, body=body if body else None, headers=out)
            resp = conn.getresponse()
            payload = resp.read()
            return resp.status, resp.getheaders(), payload
        finally:
            conn.close()


__all__ = ["FaultRule", "Intercept", "RequestRecord", "S3FaultProxy"]
