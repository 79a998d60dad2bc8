"""DownloadStage against the fault-injecting loopback server: one test per fault, the address
guard end to end, retries, deadlines, byte caps, opt-outs and the per-host limit.

Deadlines are 1 s so the whole file stays well under a minute.
"""

from __future__ import annotations

import datetime
import hashlib
import io
import ipaddress
import pickle
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pytest
from PIL import Image

from pipeline.config import DownloadConfig
from pipeline.netguard import Resolver
from pipeline.stages.download import DownloadStage
from testkit.http_server import FaultServer, bomb_gif, bomb_png

TIMEOUT = 1.0


def _jpeg(size: tuple[int, int] = (96, 64), color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "JPEG", quality=90)
    return buf.getvalue()


# ~20 KB of noise so slow/truncated transfers have something to cut.
def _big_png() -> bytes:
    import random

    rng = random.Random(0)
    img = Image.frombytes("RGB", (80, 80), bytes(rng.randrange(256) for _ in range(80 * 80 * 3)))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


JPEG = _jpeg()
PNG = _big_png()
FILES = {"/a.jpg": JPEG, "/b.png": PNG}


@pytest.fixture(scope="module")
def server() -> Iterator[FaultServer]:
    with FaultServer(files=FILES) as srv:
        yield srv


@pytest.fixture(scope="module")
def other_host() -> Iterator[FaultServer]:
    """A second "host": the same files on 127.0.0.2, which the guard refuses by default."""
    with FaultServer(files=FILES, host="127.0.0.2") as srv:
        yield srv


def _config(**overrides: object) -> DownloadConfig:
    base: dict[str, object] = dict(
        timeout=TIMEOUT,
        retries=2,
        backoff_base=0.05,
        max_retry_after=5.0,
        thread_count=8,
        allowed_networks=("127.0.0.1/32",),
    )
    base.update(overrides)
    return DownloadConfig(**base)  # type: ignore[arg-type]


def _run(
    urls: list[str | None], resolver: Resolver | None = None, **overrides: object
) -> list[dict]:
    stage = DownloadStage(config=_config(**overrides), resolver=resolver)
    try:
        out = stage.process_batch(pa.table({"url": pa.array(urls, pa.string())}))
    finally:
        stage.close()
    assert out.num_rows == len(urls)
    return out.to_pylist()


def _one(url: str, **overrides: object) -> dict:
    return _run([url], **overrides)[0]


def _assert_failed(row: dict, status: str) -> None:
    assert row["status"] == status, row["error"]
    assert row["image_bytes"] is None
    assert row["error"]


# -- plain success and the columns ----------------------------------------------------------


def test_success_columns_and_passthrough(server: FaultServer) -> None:
    server.reset_log()
    batch = pa.table(
        {
            "key": ["000000000", "000000001", "000000002"],
            "url": [server.url("/a.jpg"), server.url("/b.png"), server.url("/a.jpg")],
            "caption": ["red", "noise", "skipped"],
            "status": ["ok", "ok", "missing_url"],
            "error": [None, None, "read said so"],
        }
    )
    stage = DownloadStage(config=_config())
    try:
        out = stage.process_batch(batch)
    finally:
        stage.close()
    assert out.column_names == [
        "key",
        "url",
        "caption",
        "status",
        "error",
        "image_bytes",
        "http_status",
        "download_s",
        "source_sha256",
    ]
    assert out.schema.field("image_bytes").type == pa.binary()
    assert out.schema.field("http_status").type == pa.int32()
    assert out.schema.field("download_s").type == pa.float32()
    rows = out.to_pylist()
    assert [r["status"] for r in rows] == ["ok", "ok", "missing_url"]
    assert rows[0]["image_bytes"] == JPEG and rows[1]["image_bytes"] == PNG
    assert rows[1]["source_sha256"] == hashlib.sha256(PNG).hexdigest() and rows[2]["source_sha256"] is None
    assert rows[0]["http_status"] == 200 and rows[0]["error"] is None
    assert 0 < rows[0]["download_s"] < TIMEOUT
    # A row that failed upstream is passed through untouched and never requested.
    assert rows[2]["error"] == "read said so" and rows[2]["image_bytes"] is None
    assert rows[2]["http_status"] is None and rows[2]["download_s"] is None
    assert server.count("/a.jpg") == 1
    ua = server.requests("/a.jpg")[0].headers["User-Agent"]
    assert ua.startswith("clipcurate/") and "token clipcurate" in ua and "https://github.com/" in ua


def test_success_keeps_an_upstream_note_and_failure_replaces_it(server: FaultServer) -> None:
    # The read stage records repairs (e.g. invalid UTF-8 replaced) on rows it still passes as ok.
    batch = pa.table(
        {
            "url": [server.url("/a.jpg"), server.url("/a.jpg", fault="404")],
            "status": ["ok", "ok"],
            "error": ["caption repaired", "caption repaired"],
        }
    )
    stage = DownloadStage(config=_config())
    try:
        rows = stage.process_batch(batch).to_pylist()
    finally:
        stage.close()
    assert rows[0]["status"] == "ok" and rows[0]["error"] == "caption repaired"
    assert rows[1]["status"] == "http_404" and "404" in rows[1]["error"]


def test_missing_and_malformed_urls_are_recorded_not_raised() -> None:
    rows = _run([None, "", "not a url", "http://", "www.example.com/a.jpg"])
    assert [r["status"] for r in rows] == ["bad_url", "bad_url", "bad_url", "bad_url", "bad_scheme"]


# -- one test per fault -------------------------------------------------------------------------


def test_404_is_requested_once(server: FaultServer) -> None:
    server.reset_log()
    row = _one(server.url("/a.jpg", "404"))
    _assert_failed(row, "http_404")
    assert row["http_status"] == 404
    assert server.count("/a.jpg") == 1


def test_missing_file_is_404_once(server: FaultServer) -> None:
    server.reset_log()
    _assert_failed(_one(server.url("/nope.jpg")), "http_404")
    assert server.count("/nope.jpg") == 1


def test_403_and_410_are_not_retried(server: FaultServer) -> None:
    server.reset_log()
    rows = _run([server.url("/a.jpg", "403"), server.url("/b.png", "410")])
    assert [r["status"] for r in rows] == ["http_403", "http_410"]
    assert server.count("/a.jpg") == 1 and server.count("/b.png") == 1


def test_500_then_200_is_retried(server: FaultServer) -> None:
    server.reset_log()
    row = _one(server.url("/a.jpg", "flaky500", n=1))
    assert row["status"] == "ok" and row["image_bytes"] == JPEG
    assert server.count("/a.jpg") == 2


def test_persistent_500_gives_up_after_retries(server: FaultServer) -> None:
    server.reset_log()
    row = _one(server.url("/a.jpg", "500"), retries=2)
    _assert_failed(row, "http_500")
    assert server.count("/a.jpg") == 3  # one attempt + two retries
    # Jittered exponential backoff: gaps of ~0.05 s and ~0.1 s (each within ±50 %).
    t = server.times("/a.jpg")
    assert 0.02 <= t[1] - t[0] <= 0.2 and 0.045 <= t[2] - t[1] <= 0.4


def test_503_is_retried_after_retry_after(server: FaultServer) -> None:
    server.reset_log()
    row = _one(server.url("/a.jpg", "flaky503", n=1, retry_after=1))
    assert row["status"] == "ok" and row["image_bytes"] == JPEG
    t = server.times("/a.jpg")
    assert len(t) == 2
    assert 1.0 <= t[1] - t[0] < 1.6  # waited what the server asked, not the 0.05 s backoff


def test_retry_after_as_http_date(server: FaultServer) -> None:
    server.reset_log()
    when = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 2))
    row = _one(server.url("/b.png", "flaky503", n=1, retry_after=when))
    assert row["status"] == "ok"
    t = server.times("/b.png")
    # The date has 1 s resolution, so the wait is between ~1 and ~2 s.
    assert len(t) == 2 and 0.9 <= t[1] - t[0] < 2.6


def test_retry_after_beyond_the_cap_is_not_waited_for(server: FaultServer) -> None:
    server.reset_log()
    start = time.monotonic()
    row = _one(server.url("/a.jpg", "503", retry_after=3600))
    _assert_failed(row, "http_503")
    assert "max_retry_after" in row["error"]
    assert server.count("/a.jpg") == 1 and time.monotonic() - start < 1


def test_429_is_retried(server: FaultServer) -> None:
    server.reset_log()
    rows = _run([server.url("/a.jpg", "flaky429", n=2), server.url("/b.png", "429")])
    assert rows[0]["status"] == "ok" and server.count("/a.jpg") == 3
    _assert_failed(rows[1], "http_429")
    assert server.count("/b.png") == 3


def test_retries_zero_means_one_request(server: FaultServer) -> None:
    server.reset_log()
    _assert_failed(_one(server.url("/a.jpg", "flaky500", n=1), retries=0), "http_500")
    assert server.count("/a.jpg") == 1


def test_connection_drop_is_retried(server: FaultServer) -> None:
    server.reset_log()
    rows = _run([server.url("/a.jpg", "flakyclose", n=1), server.url("/b.png", "close")])
    assert rows[0]["status"] == "ok" and server.count("/a.jpg") == 2
    _assert_failed(rows[1], "connection_error")
    assert rows[1]["http_status"] is None and server.count("/b.png") == 3


def test_connection_refused() -> None:
    # A port nobody listens on: bind, read the port, close.
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    row = _one(f"http://127.0.0.1:{port}/a.jpg", retries=1)
    _assert_failed(row, "connection_error")


@pytest.mark.parametrize(
    "fault,params",
    [
        ("slow", {"chunk": 256, "interval": 0.1}),  # ~8 s for the 20 KB file
        ("slow_headers", {"interval": 0.05}),  # headers alone take ~13 s
        ("stall", {"seconds": 5}),
    ],
)
def test_slow_servers_hit_the_total_deadline(server: FaultServer, fault: str, params: dict) -> None:
    server.reset_log()
    start = time.monotonic()
    row = _one(server.url("/b.png", fault, **params))
    elapsed = time.monotonic() - start
    _assert_failed(row, "timeout")
    # One deadline for the whole attempt (the servers take 5-13 s), and no retry of a timeout:
    # a retry would add a second deadline. The slack below that is for a loaded CI machine.
    assert TIMEOUT <= elapsed < 2 * TIMEOUT
    assert server.count("/b.png") == 1


@pytest.mark.parametrize("chunked", ["1", "0"])
def test_endless_body_hits_the_byte_cap(server: FaultServer, chunked: str) -> None:
    start = time.monotonic()
    row = _one(server.url("/a.jpg", "endless", chunked=chunked), max_bytes=200_000)
    _assert_failed(row, "too_large")
    assert "200000" in row["error"] and time.monotonic() - start < TIMEOUT


def test_honest_body_over_the_cap(server: FaultServer) -> None:
    server.reset_log()
    row = _one(server.url("/b.png"), max_bytes=len(PNG) - 1)
    _assert_failed(row, "too_large")
    assert server.count("/b.png") == 1
    assert _one(server.url("/b.png"), max_bytes=len(PNG))["image_bytes"] == PNG


def test_lying_content_length(server: FaultServer) -> None:
    server.reset_log()
    rows = _run(
        [
            server.url("/b.png", "lie_length", len="huge"),
            server.url("/b.png", "lie_length", len="long"),
            server.url("/b.png", "lie_length", len="short"),
        ]
    )
    # Declared 10**12 bytes: refused from the header alone, no retry.
    _assert_failed(rows[0], "too_large")
    assert "Content-Length" in rows[0]["error"]
    # Declared twice the size, then closed: an incomplete body (retried, then recorded).
    _assert_failed(rows[1], "incomplete_body")
    # Declared half the size: only the declared bytes are read; decode finds them truncated.
    assert rows[2]["status"] == "ok" and rows[2]["image_bytes"] == PNG[: len(PNG) // 2]
    counts = {r.target: 0 for r in server.requests()}
    for r in server.requests():
        counts[r.target] += 1
    assert sorted(counts.values()) == [1, 1, 3]


def test_lying_content_type_does_not_decide(server: FaultServer) -> None:
    # The body is judged by its magic bytes in the decode stage, never by Content-Type.
    rows = _run(
        [
            server.url("/a.jpg", "lie_type", type="text/html"),
            server.url("/a.jpg", "lie_type", body="html"),
        ]
    )
    assert rows[0]["status"] == "ok" and rows[0]["image_bytes"] == JPEG
    assert rows[1]["status"] == "ok" and rows[1]["image_bytes"].startswith(b"<!doctype html>")


def test_truncated_file_is_downloaded_as_served(server: FaultServer) -> None:
    row = _one(server.url("/b.png", "truncate", frac=0.3))
    assert row["status"] == "ok" and row["image_bytes"] == PNG[: int(len(PNG) * 0.3)]


def test_decompression_bombs_arrive_intact_for_the_decoder(server: FaultServer) -> None:
    bomb_png(), bomb_gif()  # built (and cached) before the 1 s deadline starts
    rows = _run([server.url("/x.png", "bomb_png"), server.url("/x.gif", "bomb_gif")])
    assert rows[0]["image_bytes"] == bomb_png() and len(rows[0]["image_bytes"]) < 200_000
    assert rows[1]["image_bytes"] == bomb_gif() and len(rows[1]["image_bytes"]) < 300_000


def test_redirect_chain_is_followed(server: FaultServer) -> None:
    server.reset_log()
    rows = _run(
        [server.url("/a.jpg", "redirect", hops=3), server.url("/b.png", "redirect", code=301)]
    )
    assert rows[0]["status"] == "ok" and rows[0]["image_bytes"] == JPEG
    assert server.count("/a.jpg") == 4  # three redirects + the file
    assert rows[1]["status"] == "ok" and rows[1]["image_bytes"] == PNG


def test_too_many_redirects(server: FaultServer) -> None:
    server.reset_log()
    row = _one(server.url("/a.jpg", "redirect", hops=4), max_redirects=3)
    _assert_failed(row, "too_many_redirects")
    assert server.count("/a.jpg") == 4  # the 4th redirect is not followed
    assert _one(server.url("/a.jpg", "redirect", hops=3), max_redirects=3)["status"] == "ok"


@pytest.mark.parametrize(
    "optout",
    [
        "noai",
        "noimageai",
        "noindex",
        "noimageindex",
        "none",
        "nofollow, NoAI",
        "clipcurate: noai",
        "CLIPCURATE: noimageai",
        "otherbot: noindex, clipcurate: noai",
        "max-snippet: 20, noimageai",
        ["otherbot: noai", "noimageindex"],
    ],
)
def test_opt_out_headers_are_honoured(server: FaultServer, optout: str | list[str]) -> None:
    row = _one(server.url("/a.jpg", optout=optout))
    _assert_failed(row, "opt_out")
    assert row["http_status"] == 200 and "X-Robots-Tag" in row["error"]


@pytest.mark.parametrize(
    "optout",
    [
        "otherbot: noai",
        "googlebot: noindex, noimageindex",
        "nofollow",
        "noarchive",
        "max-image-preview: none",
    ],
)
def test_directives_for_other_agents_or_irrelevant_ones_are_ignored(
    server: FaultServer, optout: str
) -> None:
    row = _one(server.url("/a.jpg", optout=optout))
    assert row["status"] == "ok" and row["image_bytes"] == JPEG


@pytest.mark.parametrize(
    "optout",
    [
        "img2dataset: noimageai",  # the scoped form site owners used against img2dataset
        "IMG2DATASET: noai",
        "googlebot: noindex, img2dataset: noai",  # scoped inside a list of agents
        ["otherbot: noindex", "img2dataset: noimageindex"],  # its own header line
    ],
)
def test_opt_outs_addressed_to_img2dataset_are_honoured(server: FaultServer, optout: str | list[str]) -> None:
    """We do img2dataset's job with its flags, so its name's opt-outs bind us (both forms:
    one value per header line and agents listed in one value)."""
    row = _one(server.url("/a.jpg", optout=optout))
    _assert_failed(row, "opt_out")
    assert "noi" in row["error"] or "noai" in row["error"]


def test_opt_out_tokens_are_configurable(server: FaultServer) -> None:
    url = server.url("/a.jpg", optout="img2dataset: noai")
    assert _one(url, optout_tokens=("clipcurate",))["status"] == "ok"
    # Our own user-agent token is always honoured, whatever the list says.
    assert _one(server.url("/a.jpg", optout="mybot: noai"), user_agent_token="mybot",
                optout_tokens=())["status"] == "opt_out"
    assert _one(server.url("/a.jpg", optout="otherbot: noai"), optout_tokens=("otherbot",))["status"] == "opt_out"


def test_user_agent_names_project_token_and_honoured_tokens(server: FaultServer) -> None:
    server.reset_log()
    assert _one(server.url("/a.jpg"))["status"] == "ok"
    ua = server.requests("/a.jpg")[-1].headers["User-Agent"]
    assert ua.startswith("clipcurate/") and "token clipcurate" in ua and "honours img2dataset" in ua


# -- blocklists ----------------------------------------------------------------------------------


def _blocked_run(to_fetch: list[str], tmp_path, **lists: list[str]) -> list[dict]:
    from pipeline.blocklist import BlocklistSpec
    from pipeline.config import BlocklistConfig

    files = {}
    for kind, entries in lists.items():
        path = tmp_path / f"{kind}-list.txt"
        path.write_text("\n".join(entries) + "\n")
        files[kind] = (f"my{kind}={path}",)
    spec = BlocklistSpec(BlocklistConfig(**files))
    stage = DownloadStage(config=_config(), blocklist=spec)
    try:
        return stage.process_batch(pa.table({"url": pa.array(to_fetch, pa.string())})).to_pylist()
    finally:
        stage.close()


def test_blocked_url_and_domain_are_never_requested(server: FaultServer, tmp_path) -> None:
    server.reset_log()
    listed = server.url("/a.jpg")
    rows = _blocked_run(
        [listed, "http://sub.blocked.example/x.jpg", server.url("/b.png")], tmp_path,
        urls=["# takedowns", listed.upper().replace("/A.JPG", "/a.jpg")], domains=["blocked.example"],
    )
    assert [r["status"] for r in rows] == ["blocked", "blocked", "ok"]
    assert "myurls" in rows[0]["error"] and "url match" in rows[0]["error"]
    assert "mydomains" in rows[1]["error"] and "domain match" in rows[1]["error"]
    assert server.count("/a.jpg") == 0  # no request for a listed URL
    assert rows[0]["image_bytes"] is None and rows[0]["source_sha256"] is None


def test_blocked_url_on_a_redirect_hop_is_not_followed(server: FaultServer, tmp_path) -> None:
    server.reset_log()
    rows = _blocked_run([server.url("/a.jpg", "redirect")], tmp_path, urls=[server.url("/a.jpg")])
    assert rows[0]["status"] == "blocked"
    assert server.count("/a.jpg") == 1  # the redirecting request only


@pytest.mark.parametrize("kind", ["md5", "sha1", "sha256"])
def test_downloaded_bytes_on_a_hash_list_are_dropped(server: FaultServer, tmp_path, kind: str) -> None:
    import hashlib

    digest = getattr(hashlib, kind)(PNG).hexdigest()
    rows = _blocked_run([server.url("/b.png"), server.url("/a.jpg")], tmp_path, **{kind: [digest.upper()]})
    assert rows[0]["status"] == "blocked" and f"my{kind}" in rows[0]["error"]
    assert rows[0]["image_bytes"] is None and rows[0]["source_sha256"] is None
    assert rows[1]["status"] == "ok" and rows[1]["source_sha256"] == hashlib.sha256(JPEG).hexdigest()


def test_opt_out_can_be_switched_off(server: FaultServer) -> None:
    assert _one(server.url("/a.jpg", optout="noai"), respect_optout=False)["status"] == "ok"


def test_opt_out_on_a_redirect_hop(server: FaultServer) -> None:
    server.reset_log()
    row = _one(server.url("/a.jpg", "redirect", optout="clipcurate: noai"))
    _assert_failed(row, "opt_out")
    assert server.count("/a.jpg") == 1  # the redirect was not followed


# -- the address guard end to end ---------------------------------------------------------------


def test_address_guard_refuses_before_connecting(
    server: FaultServer, other_host: FaultServer
) -> None:
    server.reset_log()
    other_host.reset_log()
    p = other_host.port
    cases = {
        f"http://127.0.0.2:{p}/a.jpg": "blocked_address",
        f"http://2130706434:{p}/a.jpg": "blocked_address",  # decimal 127.0.0.2
        f"http://0x7f000002:{p}/a.jpg": "blocked_address",  # hex
        f"http://0177.0.0.2:{p}/a.jpg": "blocked_address",  # octal
        f"http://127.2:{p}/a.jpg": "blocked_address",  # short form
        f"http://[::1]:{p}/a.jpg": "blocked_address",
        f"http://[::ffff:127.0.0.1]:{server.port}/a.jpg": "blocked_address",
        f"http://[::ffff:7f00:2]:{p}/a.jpg": "blocked_address",
        "file:///etc/passwd": "bad_scheme",
        f"ftp://127.0.0.1:{server.port}/a.jpg": "bad_scheme",
        "data:image/jpeg;base64,/9j/4AAQSkZJRg==": "bad_scheme",
        # Redirects from the allowed host to the refused one, to a file, and via a relative path.
        server.url("/a.jpg", "redirect", to=other_host.url("/a.jpg")): "blocked_address",
        server.url(
            "/a.jpg", "redirect", hops=2, to=f"http://0x7f000002:{p}/a.jpg"
        ): "blocked_address",
        server.url("/a.jpg", "redirect", to="file:///etc/passwd"): "bad_scheme",
    }
    rows = _run(list(cases))
    for row, (url, status) in zip(rows, cases.items(), strict=True):
        assert row["status"] == status, (url, row["error"])
        assert row["image_bytes"] is None and row["error"]
    assert other_host.count() == 0
    # Only the three redirect URLs reached the allowed server (1 + 2 + 1 requests).
    assert server.count("/a.jpg") == 4
    # The same forms of the ALLOWED address are understood (not refused as unparseable).
    q = server.port
    ok = _run(
        [f"http://2130706433:{q}/a.jpg", f"http://0x7f.1:{q}/a.jpg", f"http://0177.0.0.1:{q}/a.jpg"]
    )
    assert [r["status"] for r in ok] == ["ok"] * 3 and all(r["image_bytes"] == JPEG for r in ok)


def test_redirect_to_an_allowed_second_host_is_followed(
    server: FaultServer, other_host: FaultServer
) -> None:
    other_host.reset_log()
    row = _one(
        server.url("/a.jpg", "redirect", to=other_host.url("/b.png")),
        allowed_networks=("127.0.0.1/32", "127.0.0.2/32"),
    )
    assert row["status"] == "ok" and row["image_bytes"] == PNG
    assert other_host.count("/b.png") == 1


class _FakeDNS(Resolver):
    def __init__(self, table: dict[str, list[str]]) -> None:
        super().__init__()
        self.table = table
        self.lookups: list[str] = []

    def _lookup(self, host: str, port: int) -> list:
        self.lookups.append(host)
        return [ipaddress.ip_address(a) for a in self.table[host]]


def test_names_connect_to_the_checked_address(server: FaultServer, other_host: FaultServer) -> None:
    server.reset_log()
    other_host.reset_log()
    dns = _FakeDNS(
        {
            "images.test": ["127.0.0.1"],
            "sneaky.test": ["127.0.0.1", "127.0.0.2"],  # one refused address refuses the name
            "internal.test": ["127.0.0.2"],
        }
    )
    urls = [
        f"http://images.test:{server.port}/a.jpg",
        f"http://sneaky.test:{server.port}/a.jpg",
        f"http://internal.test:{other_host.port}/a.jpg",
    ]
    rows = _run(urls, resolver=dns)
    assert [r["status"] for r in rows] == ["ok", "blocked_address", "blocked_address"]
    assert "127.0.0.2 is loopback" in rows[1]["error"]
    assert other_host.count() == 0 and server.count("/a.jpg") == 1
    # The connection went to the checked IP while the request named the host.
    assert server.requests("/a.jpg")[0].headers["Host"] == f"images.test:{server.port}"


def test_per_host_concurrency_limit(server: FaultServer) -> None:
    server.reset_log()
    urls = [server.url("/a.jpg", delay=0.25, i=i) for i in range(6)]
    start = time.monotonic()
    rows = _run(urls, per_host_concurrency=2, thread_count=6, timeout=3.0)
    elapsed = time.monotonic() - start
    assert all(r["status"] == "ok" for r in rows)
    # Each request is answered 0.25 s after it arrives, so with two slots arrivals come in
    # pairs: never three within 0.2 s (without the limit all six arrive within milliseconds).
    t = sorted(server.times("/a.jpg"))
    assert len(t) == 6 and all(t[i + 2] - t[i] > 0.2 for i in range(4))
    assert elapsed >= 3 * 0.25  # three rounds of two


def test_connections_are_reused_across_batches(server: FaultServer) -> None:
    server.reset_log()
    stage = DownloadStage(config=_config(thread_count=1))
    try:
        for _ in range(3):
            out = stage.process_batch(pa.table({"url": [server.url("/a.jpg")] * 5}))
            assert out.column("status").to_pylist() == ["ok"] * 5
    finally:
        stage.close()
    ports = {r.client_port for r in server.requests("/a.jpg")}
    assert server.count("/a.jpg") == 15 and len(ports) == 1


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "rawdeflate"])
def test_a_body_compressed_against_our_accept_encoding_is_decoded(server: FaultServer, encoding: str) -> None:
    # We ask for identity; a server that compresses anyway gets its image stored as an image.
    row = _one(server.url("/b.png", encoding=encoding))
    assert row["status"] == "ok" and row["image_bytes"] == PNG


def test_compressed_bodies_keep_the_cap_and_must_be_whole(server: FaultServer) -> None:
    with FaultServer(files={"/zeros.bin": bytes(1_000_000)}) as srv:
        # ~1 KB on the wire, 1 MB decoded: the cap is on what would be stored.
        row = _one(srv.url("/zeros.bin", encoding="gzip"), max_bytes=200_000)
        _assert_failed(row, "too_large")
        assert "gzip" in row["error"] and "200000" in row["error"]
        row = _one(srv.url("/zeros.bin", encoding="gzip"), max_bytes=1_000_000)
        assert row["status"] == "ok" and row["image_bytes"] == bytes(1_000_000)
    server.reset_log()
    row = _one(server.url("/b.png", encoding="cut-gzip"))
    _assert_failed(row, "incomplete_body")
    assert server.count("/b.png") == 3  # retried, as any body that ended early
    # An encoding we do not undo is kept as sent; the decode stage names what it finds.
    row = _one(server.url("/b.png", encoding="br"))
    assert row["status"] == "ok" and row["image_bytes"] == PNG


def test_urls_in_other_scripts_are_fetched() -> None:
    # The server unescapes the path as UTF-8, so it finds the file only if the request line
    # carried the name percent-encoded as UTF-8.
    with FaultServer(files={"/caf\u00e9/\u732b.jpg": JPEG}) as srv:
        rows = _run([f"http://127.0.0.1:{srv.port}/caf\u00e9/\u732b.jpg?q=\u00fc"])
        assert rows[0]["status"] == "ok" and rows[0]["image_bytes"] == JPEG
        assert srv.requests()[0].target == "/caf%C3%A9/%E7%8C%AB.jpg?q=%C3%BC"


def test_connection_close_responses_are_fetched_and_not_reused(server: FaultServer) -> None:
    server.reset_log()
    rows = _run([server.url("/a.jpg", close="1", i=i) for i in range(3)] + [server.url("/b.png")], thread_count=1)
    assert [r["status"] for r in rows] == ["ok"] * 4
    assert rows[0]["image_bytes"] == JPEG and rows[3]["image_bytes"] == PNG
    # One connection per closing response, then a fresh one: none was reused after its close.
    assert len({r.client_port for r in server.requests()}) == 4
    assert server.count() == 4  # and none needed a retry


def test_deadline_cuts_a_slow_body_on_a_closing_connection(server: FaultServer) -> None:
    # With Connection: close the HTTP client hands the socket to the response; the deadline
    # must still reach it (the 20 KB body takes ~8 s).
    server.reset_log()
    start = time.monotonic()
    row = _one(server.url("/b.png", "slow", chunk=256, interval=0.1, close="1"))
    elapsed = time.monotonic() - start
    _assert_failed(row, "timeout")
    assert TIMEOUT <= elapsed < 2 * TIMEOUT
    assert server.count("/b.png") == 1


def test_bytes_beyond_a_short_content_length_never_reach_the_next_response(server: FaultServer) -> None:
    server.reset_log()
    rows = _run([server.url("/b.png", "lie_length", len="short"), server.url("/a.jpg")], thread_count=1, retries=0)
    assert rows[0]["status"] == "ok" and rows[0]["image_bytes"] == PNG[: len(PNG) // 2]
    # The first connection holds the rest of the PNG: the next request goes on a new one.
    assert rows[1]["status"] == "ok" and rows[1]["image_bytes"] == JPEG
    assert len({r.client_port for r in server.requests()}) == 2


def test_stage_pickles_without_its_threads(server: FaultServer) -> None:
    stage = DownloadStage(config=_config())
    stage.setup()
    try:
        clone = pickle.loads(pickle.dumps(stage))
    finally:
        stage.close()
    assert clone.config == stage.config and clone.io_bound and clone._fetcher is None
    try:
        out = clone.process_batch(pa.table({"url": [server.url("/a.jpg")]}))
    finally:
        clone.close()
    assert out.column("image_bytes").to_pylist() == [JPEG]


def test_missing_url_column_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="url"):
        DownloadStage(config=_config()).process_batch(pa.table({"link": ["http://x/"]}))


# -- https: verify the URL's name while connecting to the checked address ------------------------


def _make_tls_files(folder: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA, and a leaf certificate for images.test signed by it (PEM files)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "clipcurate test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "images.test")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("images.test")]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    ca_pem, leaf_pem, key_pem = folder / "ca.pem", folder / "leaf.pem", folder / "leaf.key"
    ca_pem.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    leaf_pem.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    key_pem.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return ca_pem, leaf_pem, key_pem


def test_https_checks_the_name_on_the_checked_address(tmp_path: Path) -> None:
    ca_pem, leaf_pem, key_pem = _make_tls_files(tmp_path)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(leaf_pem, key_pem)
    sni: list[str | None] = []
    ctx.sni_callback = lambda sock, name, context: sni.append(name)
    with FaultServer(files=FILES, ssl_context=ctx) as srv:
        p = srv.port
        urls = [
            f"https://images.test:{p}/a.jpg",  # name matches the certificate
            f"https://other.test:{p}/a.jpg",  # same address, name not in the certificate
            f"https://127.0.0.1:{p}/a.jpg",  # the address itself is not in the certificate
        ]
        dns = _FakeDNS({"images.test": ["127.0.0.1"], "other.test": ["127.0.0.1"]})
        rows = _run(urls, resolver=dns, ca_certs=str(ca_pem))
        assert [r["status"] for r in rows] == ["ok", "tls_error", "tls_error"], rows
        assert rows[0]["image_bytes"] == JPEG
        assert "images.test" in sni and "other.test" in sni
        assert srv.requests("/a.jpg")[0].headers["Host"] == f"images.test:{p}"
        # Without the test CA the system store does not trust the server.
        row = _run(urls[:1], resolver=_FakeDNS({"images.test": ["127.0.0.1"]}))[0]
        _assert_failed(row, "tls_error")
        assert srv.count("/a.jpg") == 1


def test_ipv6_loopback_is_refused_unless_allowed() -> None:
    with FaultServer(files=FILES, host="::1") as v6:
        url = v6.url("/a.jpg")
        _assert_failed(_one(url), "blocked_address")
        assert v6.count() == 0
        row = _one(url, allowed_networks=("::1/128",))
        assert row["status"] == "ok" and row["image_bytes"] == JPEG
        assert v6.requests("/a.jpg")[0].headers["Host"] == f"[::1]:{v6.port}"


def test_error_status_wins_over_an_opt_out_header(server: FaultServer) -> None:
    server.reset_log()
    row = _one(server.url("/a.jpg", "404", optout="noai"))
    _assert_failed(row, "http_404")
    assert server.count("/a.jpg") == 1


def test_next_checked_address_is_tried_when_connecting_fails(server: FaultServer) -> None:
    server.reset_log()
    # Nothing listens on [::1] at this port; the second (also checked) address serves the file.
    dns = _FakeDNS({"dual.test": ["::1", "127.0.0.1"]})
    row = _run(
        [f"http://dual.test:{server.port}/a.jpg"],
        resolver=dns,
        allowed_networks=("127.0.0.1/32", "::1/128"),
        retries=0,
    )[0]
    assert row["status"] == "ok" and row["image_bytes"] == JPEG
    assert server.count("/a.jpg") == 1
    assert server.requests("/a.jpg")[0].headers["Host"] == f"dual.test:{server.port}"
