"""The fault server itself: what each fault puts on the wire, the request log, the bombs, the CLI.

Checked with http.client (no proxies, no retries) so the server is tested independently of the
download stage.
"""

from __future__ import annotations

import http.client
import io
import socket
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
from PIL import Image

from testkit import subprocess_env
from testkit.http_server import FaultServer, bomb_gif, bomb_png


def _get(srv: FaultServer, target: str) -> tuple[int, dict[str, list[str]], bytes]:
    conn = http.client.HTTPConnection(srv.host, srv.port, timeout=5)
    try:
        conn.request("GET", target)
        resp = conn.getresponse()
        headers: dict[str, list[str]] = {}
        for k, v in resp.getheaders():
            headers.setdefault(k.lower(), []).append(v)
        return resp.status, headers, resp.read()
    finally:
        conn.close()


@pytest.fixture
def srv(tmp_path: Path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.bin").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "secret.txt").write_text("outside img")
    with FaultServer(tmp_path / "img") as s:
        yield s


def test_serves_files_and_logs_requests(srv: FaultServer) -> None:
    status, headers, body = _get(srv, "/a.bin?x=1")
    assert status == 200 and body == bytes(range(256)) * 4
    assert headers["content-length"] == ["1024"]
    assert srv.count("/a.bin") == 1 and srv.requests("/a.bin")[0].query == {"x": ["1"]}
    assert _get(srv, "/missing.bin")[0] == 404
    assert _get(srv, "/../secret.txt")[0] == 404  # never serves outside root
    assert srv.count() == 3


def test_status_faults_and_retry_after(srv: FaultServer) -> None:
    status, headers, _ = _get(srv, "/a.bin?fault=503&retry_after=7")
    assert status == 503 and headers["retry-after"] == ["7"]
    assert _get(srv, "/a.bin?fault=429")[0] == 429
    assert [_get(srv, "/a.bin?fault=flaky500&n=2")[0] for _ in range(3)] == [500, 500, 200]


def test_per_path_fault_and_optout_headers(srv: FaultServer) -> None:
    srv.set_fault("/a.bin", "404")
    assert _get(srv, "/a.bin")[0] == 404
    assert _get(srv, "/a.bin?fault=truncate&frac=0.25")[2] == (bytes(range(256)) * 4)[:256]
    srv.set_fault("/a.bin", None)
    _, headers, _ = _get(srv, "/a.bin?optout=noai&optout=clipcurate%3A+noimageai")
    assert headers["x-robots-tag"] == ["noai", "clipcurate: noimageai"]


def test_redirect_chain(srv: FaultServer) -> None:
    status, headers, _ = _get(srv, "/a.bin?fault=redirect&hops=2&to=http%3A%2F%2F127.0.0.2%2Fz")
    assert status == 302
    nxt = headers["location"][0]
    assert nxt.startswith("/a.bin?") and "hops=1" in nxt
    status, headers, _ = _get(srv, nxt)
    assert status == 302 and headers["location"] == ["http://127.0.0.2/z"]


def test_lie_length_and_lie_type(srv: FaultServer) -> None:
    with pytest.raises(http.client.IncompleteRead):
        _get(srv, "/a.bin?fault=lie_length")
    status, headers, body = _get(srv, "/a.bin?fault=lie_length&len=short")
    assert headers["content-length"] == ["512"] and len(body) == 512
    _, headers, body = _get(srv, "/a.bin?fault=lie_type&body=html")
    assert headers["content-type"] == ["image/jpeg"] and body.startswith(b"<!doctype html>")


def test_endless_body_keeps_going(srv: FaultServer) -> None:
    conn = http.client.HTTPConnection(srv.host, srv.port, timeout=5)
    conn.request("GET", "/a.bin?fault=endless")
    resp = conn.getresponse()
    got = sum(len(resp.read(65536)) for _ in range(64))
    assert got == 64 * 65536  # 4 MB and still streaming
    conn.close()


def test_slow_trickles(srv: FaultServer) -> None:
    conn = http.client.HTTPConnection(srv.host, srv.port, timeout=5)
    start = time.monotonic()
    conn.request("GET", "/a.bin?fault=slow&chunk=256&interval=0.1")
    body = conn.getresponse().read()
    assert len(body) == 1024 and time.monotonic() - start >= 0.3  # 4 chunks, 3+ waits
    conn.close()


def test_close_and_stall(srv: FaultServer) -> None:
    with pytest.raises(http.client.RemoteDisconnected):
        _get(srv, "/a.bin?fault=close")
    conn = http.client.HTTPConnection(srv.host, srv.port, timeout=0.3)
    conn.request("GET", "/a.bin?fault=stall&seconds=2")
    with pytest.raises(TimeoutError):
        conn.getresponse()
    conn.close()


def test_png_bomb_is_a_valid_30000_square_png(monkeypatch: pytest.MonkeyPatch) -> None:
    data = bomb_png()
    assert len(data) < 200_000
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # only the header is read below
    with Image.open(io.BytesIO(data)) as im:
        assert im.size == (30000, 30000) and im.format == "PNG"
    # The IDAT stream really inflates to every row (checked in bounded pieces).
    (length,) = struct.unpack(">I", data[33:37])
    assert data[37:41] == b"IDAT"
    d = zlib.decompressobj()
    total, buf = 0, data[41 : 41 + length]
    while buf:
        total += len(d.decompress(buf, 1 << 24))
        buf = d.unconsumed_tail
    assert total == 30000 * (1 + 30000 // 8) and d.eof


def test_gif_bomb_has_10000_frames() -> None:
    data = bomb_gif()
    assert len(data) < 300_000
    with Image.open(io.BytesIO(data)) as im:
        assert im.size == (1000, 1000) and im.format == "GIF"
        assert im.n_frames == 10000
        im.seek(1234)
        im.load()


def test_binds_a_second_loopback_address_and_refuses_others(tmp_path: Path) -> None:
    with FaultServer(tmp_path, host="127.0.0.2") as s:
        assert s.base_url.startswith("http://127.0.0.2:")
        assert _get(s, "/nothing")[0] == 404
        assert s.requests()[0].client.startswith("127.")
    with pytest.raises(ValueError, match="loopback"):
        FaultServer(tmp_path, host="0.0.0.0")


def test_command_line_entry(tmp_path: Path) -> None:
    (tmp_path / "x.jpg").write_bytes(b"\xff\xd8\xffhello")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "testkit.http_server",
            "--root",
            str(tmp_path),
            "--port",
            str(port),
        ],
        stdout=subprocess.PIPE,
        env=subprocess_env(),
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert f"http://127.0.0.1:{port}" in proc.stdout.readline()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("GET", "/x.jpg")
        resp = conn.getresponse()
        assert resp.status == 200 and resp.read() == b"\xff\xd8\xffhello"
        assert resp.getheader("Content-Type") == "image/jpeg"
        conn.close()
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()
