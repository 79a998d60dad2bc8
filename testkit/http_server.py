"""A loopback HTTP server that serves a directory with injectable faults.

Used by the download tests, the end-to-end tests, the demo and the benchmark. It binds one
address per instance; start two on ``127.0.0.1`` and ``127.0.0.2`` to act as two hosts (Linux
routes all of ``127.0.0.0/8`` to the loopback interface).

Faults are chosen per request by the query string, or per path with :meth:`FaultServer.set_fault`
(query parameters win). ``fault=<name>`` picks the behaviour; the other parameters tune it:

================  ===============================================================================
``fault=``        behaviour (parameters)
================  ===============================================================================
(none)            serve the file under ``root`` (404 when missing)
``<code>``        answer with that status, e.g. ``404``, ``403``, ``500``, ``503``, ``429``
                  (``retry_after=<seconds or HTTP date>`` adds a Retry-After header)
``flaky<code>``   the first ``n`` (default 1) requests for this exact URL get ``<code>``, later
                  ones the file (``retry_after`` as above); ``flakyclose`` drops the connection
``close``         close the connection without answering (a connection error)
``stall``         accept, then send nothing for ``seconds`` (default 30)
``slow_headers``  trickle the status line and headers, one byte per ``interval`` s (0.1)
``slow``          honest Content-Length, then ``chunk`` bytes (64) every ``interval`` s (0.1)
``endless``       200 image/jpeg, then an infinite body (chunked; ``chunked=0``: no length, close)
``lie_length``    ``len=long`` (default): declares twice the size, sends the file, closes;
                  ``len=short``: declares half the size, sends all of it; ``len=huge``:
                  declares 10**12 bytes, sends the file, closes
``lie_type``      the file with ``type=`` (default ``text/html``) as Content-Type; with
                  ``body=html`` an HTML page labelled ``image/jpeg`` instead
``truncate``      the first ``frac`` (0.5) of the file, with an honest Content-Length
``redirect``      ``code`` (302) to ``to`` (default: this path without fault parameters), after
                  ``hops`` (1) redirects on this server
``bomb_png``      a valid ~110 KB PNG whose IHDR says 30000x30000 (1-bit gray, all zero)
``bomb_gif``      a ~230 KB GIF with ``frames`` (10000) 1x1 frames on a ``size`` (1000) canvas
================  ===============================================================================

Independent of ``fault``: ``delay=<seconds>`` waits before answering, each ``optout=<value>``
parameter adds an ``X-Robots-Tag: <value>``
header to the response (``optout=noai``, ``optout=clipcurate:noimageai``), ``close=1`` sends
``Connection: close`` and closes the connection after the response, and ``encoding=gzip``
(``deflate``, ``rawdeflate``, ``cut-gzip``) compresses a 200 body whatever the client accepts.

Every request is recorded (:class:`RequestRecord`: path, query, headers, monotonic time) for
assertions such as "requested once" or "retried after the Retry-After gap".

Command line (for the demo): ``python -m testkit.http_server --root DIR --port N
--host 127.0.0.1`` serves until interrupted.
"""

from __future__ import annotations

import argparse
import ipaddress
import mimetypes
import socket
import ssl
import struct
import sys
import threading
import time
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlencode, urlsplit


@dataclass(frozen=True)
class RequestRecord:
    """One request as the server saw it. ``t``: ``time.monotonic()`` when it arrived."""

    path: str
    query: dict[str, list[str]]
    target: str
    headers: dict[str, str]
    client: str
    client_port: int
    t: float


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


@lru_cache(maxsize=4)
def bomb_png(width: int = 30000, height: int = 30000) -> bytes:
    """A complete, valid PNG of ``width`` x ``height`` 1-bit gray zero pixels.

    Decoded by Pillow (mode "1", one byte per pixel) it would take width*height bytes (900 MB
    by default) while the file is ~110 KB: the zlib stream of all-zero rows compresses ~1000:1.
    """
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit grayscale
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed pixels
    comp = zlib.compressobj(9)
    parts = []
    rows_per_block = 1000
    for start in range(0, height, rows_per_block):
        parts.append(comp.compress(row * min(rows_per_block, height - start)))
    parts.append(comp.flush())
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", b"".join(parts))
        + _png_chunk(b"IEND", b"")
    )


@lru_cache(maxsize=4)
def bomb_gif(frames: int = 10000, size: int = 1000) -> bytes:
    """A valid animated GIF: ``frames`` frames of one pixel each on a ``size`` x ``size`` canvas.

    23 bytes per frame, written by hand: a decoder that materialises every frame as a full
    canvas needs frames*size*size pixels.
    """
    out = bytearray(b"GIF89a")
    out += struct.pack("<HHBBB", size, size, 0x80, 0, 0)  # global table of 2 colours
    out += b"\x00\x00\x00\xff\xff\xff"
    out += b"\x21\xff\x0bNETSCAPE2.0\x03\x01\x00\x00\x00"  # loop forever
    # One pixel of colour 0 with LZW minimum code size 2: codes clear(4), 0, end(5) in 3 bits
    # each, packed LSB first -> 0b101_000_100 = 0x0144.
    pixel = b"\x02\x02\x44\x01\x00"
    for i in range(frames):
        out += b"\x21\xf9\x04\x00\x01\x00\x00\x00"  # graphic control: 10 ms delay
        out += b"\x2c" + struct.pack("<HHHHB", i % size, (i // size) % size, 1, 1, 0)
        out += pixel
    out += b"\x3b"
    return bytes(out)


def _content_encode(body: bytes, encoding: str) -> tuple[bytes, str]:
    """``body`` compressed for ``encoding=`` (gzip, deflate: zlib format, rawdeflate: deflate
    without the zlib wrapper, as some servers send it; cut-gzip: gzip missing its last half),
    and the Content-Encoding name to send."""
    import gzip
    import zlib

    if encoding == "gzip":
        return gzip.compress(body), "gzip"
    if encoding == "cut-gzip":
        packed = gzip.compress(body)
        return packed[: len(packed) // 2], "gzip"
    if encoding == "deflate":
        return zlib.compress(body), "deflate"
    if encoding == "rawdeflate":
        z = zlib.compressobj(wbits=-zlib.MAX_WBITS)
        return z.compress(body) + z.flush(), "deflate"
    return body, encoding  # an encoding named but not applied (br, ...)


_HTML = b"<!doctype html><html><body>not an image</body></html>"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out as two writes; with Nagle on, the body waits for the client's
    # delayed ACK (~40 ms per request on Linux loopback).
    disable_nagle_algorithm = True
    server: _Server

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib name
        pass  # tests read the request log instead of stderr

    # -- helpers ---------------------------------------------------------------------------
    def _param(self, name: str, default: str | None = None) -> str | None:
        values = self.params.get(name)
        return values[0] if values else default

    def _start(self, code: int, headers: Mapping[str, str]) -> None:
        self.send_response(code)
        if self._param("close") == "1" and "Connection" not in headers:
            self.send_header("Connection", "close")
            self.close_connection = True
        for value in self.params.get("optout", []):
            self.send_header("X-Robots-Tag", value)
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()

    def _send(
        self, code: int, body: bytes, ctype: str = "application/octet-stream", **extra: str
    ) -> None:
        encoding = self._param("encoding") if code == 200 else None
        if encoding:  # a server that compresses whatever the client asked for
            body, name = _content_encode(body, encoding)
            extra = {**extra, "Content_Encoding": name}
        headers = {"Content-Type": ctype, "Content-Length": str(len(body))}
        headers.update({k.replace("_", "-"): v for k, v in extra.items()})
        self._start(code, headers)
        self.wfile.write(body)

    def _status(self, code: int) -> None:
        extra = {}
        retry_after = self._param("retry_after")
        if retry_after is not None:
            extra["Retry_After"] = retry_after
        self._send(code, f"status {code}\n".encode(), "text/plain", **extra)

    def _file(self) -> tuple[bytes, str] | None:
        data = self.server.owner.read_file(self.path_only)
        if data is None:
            return None
        ctype = mimetypes.guess_type(self.path_only)[0] or "application/octet-stream"
        return data, ctype

    def _sleep(self, seconds: float) -> bool:
        """Sleep unless the server stops first; False when it stopped."""
        return not self.server.owner.stopping.wait(seconds)

    def _drop(self) -> None:
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    # -- dispatch --------------------------------------------------------------------------
    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        parts = urlsplit(self.path)
        self.path_only = unquote(parts.path)
        owner = self.server.owner
        query = parse_qs(parts.query, keep_blank_values=True)
        self.params = {**owner.path_faults(self.path_only), **query}
        n_before = owner.record(
            RequestRecord(
                self.path_only,
                query,
                self.path,
                {k: v for k, v in self.headers.items()},
                self.client_address[0],
                self.client_address[1],
                time.monotonic(),
            )
        )
        try:
            delay = float(self._param("delay", "0") or 0)
            if delay > 0 and not self._sleep(delay):
                return self._drop()
            self._dispatch(self._param("fault") or "", n_before)
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
            self.close_connection = True

    def _dispatch(self, fault: str, n_before: int) -> None:
        if fault.startswith("flaky"):
            if n_before < int(self._param("n", "1") or 1):
                fault = fault[len("flaky") :]
            else:
                fault = ""
        if fault.isdigit():
            return self._status(int(fault))
        if fault == "close":
            return self._drop()
        if fault == "stall":
            self._sleep(float(self._param("seconds", "30") or 30))
            return self._drop()
        if fault == "redirect":
            return self._redirect()
        if fault == "bomb_png":
            return self._send(200, bomb_png(), "image/png")
        if fault == "bomb_gif":
            frames = int(self._param("frames", "10000") or 10000)
            size = int(self._param("size", "1000") or 1000)
            return self._send(200, bomb_gif(frames, size), "image/gif")
        if fault == "lie_type" and self._param("body") == "html":
            return self._send(200, _HTML, "image/jpeg")
        found = self._file()
        if found is None:
            return self._status(404)
        data, ctype = found
        if fault == "":
            return self._send(200, data, ctype)
        if fault == "lie_type":
            return self._send(200, data, self._param("type", "text/html") or "text/html")
        if fault == "truncate":
            frac = float(self._param("frac", "0.5") or 0.5)
            return self._send(200, data[: int(len(data) * frac)], ctype)
        if fault == "lie_length":
            return self._lie_length(data, ctype)
        if fault == "slow":
            return self._slow(data, ctype)
        if fault == "slow_headers":
            return self._slow_headers(data, ctype)
        if fault == "endless":
            return self._endless(data)
        self._send(400, f"unknown fault {fault!r}\n".encode(), "text/plain")

    def _redirect(self) -> None:
        hops = int(self._param("hops", "1") or 1)
        code = int(self._param("code", "302") or 302)
        if hops > 1:
            params = {k: v for k, v in self.params.items()}
            params["hops"] = [str(hops - 1)]
            location = self.path_only + "?" + urlencode(params, doseq=True)
        else:
            location = self._param("to") or self.path_only
        self._send(code, b"", "text/plain", Location=location)

    def _lie_length(self, data: bytes, ctype: str) -> None:
        mode = self._param("len", "long")
        declared = {"long": 2 * len(data), "short": len(data) // 2, "huge": 10**12}[mode or "long"]
        self._start(200, {"Content-Type": ctype, "Content-Length": str(declared)})
        self.wfile.write(data)
        self.wfile.flush()
        if mode != "short":
            self._drop()
        else:
            self.close_connection = True  # the extra bytes leave the connection unusable

    def _slow(self, data: bytes, ctype: str) -> None:
        chunk = int(self._param("chunk", "64") or 64)
        interval = float(self._param("interval", "0.1") or 0.1)
        self._start(200, {"Content-Type": ctype, "Content-Length": str(len(data))})
        for i in range(0, len(data), chunk):
            self.wfile.write(data[i : i + chunk])
            self.wfile.flush()
            if not self._sleep(interval):
                return self._drop()

    def _slow_headers(self, data: bytes, ctype: str) -> None:
        interval = float(self._param("interval", "0.1") or 0.1)
        head = (
            f"HTTP/1.1 200 OK\r\nContent-Type: {ctype}\r\nContent-Length: {len(data)}\r\n"
            "X-Padding: " + "x" * 200 + "\r\n\r\n"
        ).encode()
        for b in head:
            self.wfile.write(bytes([b]))
            self.wfile.flush()
            if not self._sleep(interval):
                return self._drop()
        self.wfile.write(data)

    def _endless(self, data: bytes) -> None:
        chunked = self._param("chunked", "1") != "0"
        headers = {"Content-Type": "image/jpeg"}
        headers["Transfer-Encoding" if chunked else "Connection"] = (
            "chunked" if chunked else "close"
        )
        self._start(200, headers)
        block = data[:65536] or b"\xff\xd8\xff"
        filler = b"\x00" * 65536
        first = True
        while not self.server.owner.stopping.is_set():
            piece = block if first else filler
            first = False
            if chunked:
                self.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            else:
                self.wfile.write(piece)
        self._drop()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 128
    owner: FaultServer

    def handle_error(self, request: object, client_address: object) -> None:
        # Clients hanging up (a closed keep-alive pool, a client that gave up on a slow body)
        # are routine here; anything else is a bug in the server and is printed.
        if isinstance(sys.exc_info()[1], ConnectionError | TimeoutError | ssl.SSLError):
            return
        super().handle_error(request, client_address)  # type: ignore[arg-type]


class FaultServer:
    """Threaded loopback HTTP server over ``root`` with the faults of the module docstring.

    ``host``: the loopback address to bind (``127.0.0.1``, ``127.0.0.2``, ``::1``); ``port``: 0
    picks a free one. Use as a context manager, or call :meth:`start` / :meth:`stop`.
    ``files`` maps URL paths (``/a.jpg``) to bytes served in addition to ``root``.
    ``ssl_context``: a server-side context with a certificate loaded makes it an https server.
    """

    def __init__(
        self,
        root: str | Path | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        files: Mapping[str, bytes] | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        if not ipaddress.ip_address(host).is_loopback:
            raise ValueError(f"FaultServer binds loopback addresses only, got {host!r}")
        self.root = Path(root).resolve() if root is not None else None
        self.host = host
        self.port = port
        self.files: dict[str, bytes] = dict(files or {})
        self.ssl_context = ssl_context
        self.stopping = threading.Event()
        self._faults: dict[str, dict[str, list[str]]] = {}
        self._log: list[RequestRecord] = []
        self._counts: dict[str, int] = {}
        self._lock = threading.Lock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> FaultServer:
        cls = _Server
        if ":" in self.host:
            cls = type("_Server6", (_Server,), {"address_family": socket.AF_INET6})
        self._server = cls((self.host, self.port), _Handler)
        self._server.owner = self
        if self.ssl_context is not None:
            # Handshakes happen in accept(); a client that rejects the certificate only makes
            # accept() fail, which socketserver ignores.
            self._server.socket = self.ssl_context.wrap_socket(
                self._server.socket, server_side=True
            )
        self.port = self._server.server_address[1]
        self.stopping.clear()
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FaultServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- URLs and faults ---------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        scheme = "https" if self.ssl_context is not None else "http"
        return f"{scheme}://{host}:{self.port}"

    def url(self, path: str, fault: str | None = None, **params: object) -> str:
        """Absolute URL of ``path`` with ``fault`` and parameters in the query string.

        A list value repeats the parameter (``optout=["noai", "x: noindex"]``).
        """
        if not path.startswith("/"):
            path = "/" + path
        query: dict[str, object] = {}
        if fault is not None:
            query["fault"] = fault
        query.update(params)
        return self.base_url + path + ("?" + urlencode(query, doseq=True) if query else "")

    def set_fault(self, path: str, fault: str | None, **params: object) -> None:
        """Apply ``fault`` (and parameters) to every request for ``path``; None clears it."""
        if fault is None:
            self._faults.pop(path, None)
            return
        spec: dict[str, list[str]] = {"fault": [fault]}
        for k, v in params.items():
            spec[k] = [str(x) for x in v] if isinstance(v, list | tuple) else [str(v)]
        self._faults[path] = spec

    def path_faults(self, path: str) -> dict[str, list[str]]:
        return self._faults.get(path, {})

    def read_file(self, path: str) -> bytes | None:
        """Bytes served for URL ``path``, or None. Paths escaping ``root`` are not served."""
        if path in self.files:
            return self.files[path]
        if self.root is None:
            return None
        candidate = (self.root / path.lstrip("/")).resolve()
        if not candidate.is_relative_to(self.root) or not candidate.is_file():
            return None
        return candidate.read_bytes()

    # -- request log ---------------------------------------------------------------------
    def record(self, rec: RequestRecord) -> int:
        """Log ``rec``; return how many earlier requests had the same target (path + query)."""
        with self._lock:
            self._log.append(rec)
            n = self._counts.get(rec.target, 0)
            self._counts[rec.target] = n + 1
            return n

    def requests(self, path: str | None = None) -> list[RequestRecord]:
        """Requests received, oldest first; only those for ``path`` when given."""
        with self._lock:
            return [r for r in self._log if path is None or r.path == path]

    def count(self, path: str | None = None) -> int:
        """Number of requests received (for ``path`` when given)."""
        return len(self.requests(path))

    def times(self, path: str) -> list[float]:
        """Arrival times (``time.monotonic()``) of the requests for ``path``."""
        return [r.t for r in self.requests(path)]

    def reset_log(self) -> None:
        with self._lock:
            self._log.clear()
            self._counts.clear()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", required=True, help="directory to serve")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--host", default="127.0.0.1", help="loopback address to bind")
    args = parser.parse_args(argv)
    with FaultServer(args.root, host=args.host, port=args.port) as server:
        print(f"serving {server.root} at {server.base_url}/ (Ctrl-C to stop)", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
