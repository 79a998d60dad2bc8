"""Blocklists and sticky takedowns through the whole job on loopback (issue 15, acceptance 1-2).

One job run over a small synthetic world where six rows are each named by one kind of list
(URL, domain, md5, sha1, sha256 of the downloaded bytes, PDQ of the picture). Then a takedown
of another row and a second run, on a new output that names the first, with the taken-down URL,
the same bytes under a new URL and a re-encoded copy under a third.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs.takedown import main as takedown_main
from pipeline import job
from pipeline import schema as S
from pipeline.blocklist import pdq_of
from pipeline.config import (
    BlocklistConfig,
    DecodeConfig,
    DownloadConfig,
    JobConfig,
    ShardConfig,
)
from pipeline.stages.decode import decode_image
from testkit.http_server import FaultServer
from testkit.synthetic import decode_display, generate_world
from tests.ray_data_warnings import IGNORE_LEGACY_FIELDS

pytestmark = [
    pytest.mark.slow,
    pytest.mark.shared_ray,
    IGNORE_LEGACY_FIELDS,
]
KINDS = ("url", "domain", "md5", "sha1", "sha256", "pdq")
PER_SHARD = 8
DECODE = DecodeConfig()  # the job's default decode: what a stored copy would have been


def _config(input_: Path, output: Path, **kw: Any) -> JobConfig:
    return JobConfig(
        input=str(input_), output=str(output),
        download=DownloadConfig(timeout=10, retries=0, allowed_networks=("127.0.0.1/32",)),
        shard=ShardConfig(number_sample_per_shard=PER_SHARD), **kw,
    )


def _all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _forms(data: bytes) -> list[bytes]:
    """The bytes as downloaded, as they would have been stored, and both in base64."""
    stored = decode_image(data, DECODE).data
    return [data, stored, base64.b64encode(data), base64.b64encode(stored)]


def _found_anywhere(files: dict[str, bytes], data: bytes) -> list[str]:
    return [name for name, blob in files.items() for form in _forms(data) if form in blob]


@pytest.fixture(scope="module")
def first_run(shared_ray: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("safety-world")
    with FaultServer(root) as srv:
        world = generate_world(root, 24, 1515, srv.base_url + "/", exact_dup_rate=0, near_dup_rate=0,
                               unsafe_rate=0, min_side=200, max_side=400,
                               formats={"jpeg": 0.8, "png_alpha": 0.2}).to_pylist()
        data = {r["_gt_row"]: (root / r["_gt_path"]).read_bytes() for r in world}
        urls = [r["url"] for r in world]
        # Row 1's URL names a host under a listed domain: it is refused before any lookup.
        urls[1] = urls[1].replace(srv.base_url, "http://img.blocked.invalid")
        lists = root / "lists"
        lists.mkdir()
        (lists / "urls.txt").write_text(f"# test list\n{urls[0]}\n")
        (lists / "domains.txt").write_text("blocked.invalid\n")
        (lists / "md5.txt").write_text(hashlib.md5(data[2]).hexdigest() + "\n")
        (lists / "sha1.txt").write_text(hashlib.sha1(data[3]).hexdigest() + "  some-file.jpg\n")
        (lists / "sha256.txt").write_text(hashlib.sha256(data[4]).hexdigest().upper() + "\n")
        # PDQ of the picture as a viewer decodes it, full size: not the job's own computation.
        (lists / "pdq.txt").write_text(pdq_of(decode_display(data[5])).hex() + ",100\n")
        import pyarrow as pa

        pq.write_table(pa.table({"url": urls, "caption": [r["caption"] for r in world]}), root / "urls.parquet")
        blocklist = BlocklistConfig(**{
            "urls": (f"u-list={lists / 'urls.txt'}",), "domains": (f"d-list={lists / 'domains.txt'}",),
            "md5": (f"m-list={lists / 'md5.txt'}",), "sha1": (f"s1-list={lists / 'sha1.txt'}",),
            "sha256": (f"s256-list={lists / 'sha256.txt'}",), "pdq": (f"p-list={lists / 'pdq.txt'}",),
        })
        out = root / "run1"
        lines: list[str] = []
        summary = job.run(_config(root / "urls.parquet", out, blocklist=blocklist), emit=lines.append)
        rows = pq.read_table(out / "embeddings").to_pylist()
        yield {"root": root, "srv": srv, "world": world, "data": data, "out": out, "summary": summary,
               "rows": {r["url"]: r for r in rows}, "urls": urls, "lines": lines}


@pytest.mark.parametrize("row,kind", list(enumerate(KINDS)))
def test_listed_row_is_blocked_and_none_of_it_is_stored(first_run: dict[str, Any], row: int, kind: str) -> None:
    r = first_run["rows"][first_run["urls"][row]]
    name = {"url": "u-list", "domain": "d-list", "md5": "m-list", "sha1": "s1-list",
            "sha256": "s256-list", "pdq": "p-list"}[kind]
    assert r[S.STATUS] == "blocked" and r[S.ERROR].startswith(f"blocklist {name} ({kind} match)")
    assert r[S.KEEP] is False and r[S.DROP_REASON] == "status:blocked"
    for col in (S.IMAGE_EMBEDDING, S.IMAGE_THUMB, S.SHA256, S.SOURCE_SHA256, S.PDQ, S.WIDTH):
        assert r[col] is None, col
    files = _all_files(first_run["out"])
    assert not _found_anywhere(files, first_run["data"][row])
    page = files["report.html"].decode()
    figures = dict(re.findall(r'<figure data-key="([^"]+)"[^>]*>(.*?)</figure>', page))
    assert "<img" not in figures.get(r[S.KEY], "")


def test_stats_count_blocked_rows_and_the_rest_is_stored(first_run: dict[str, Any]) -> None:
    stats = json.loads((first_run["out"] / "_stats.json").read_text())
    assert stats["status"]["blocked"] == len(KINDS)
    assert first_run["summary"].status_counts["blocked"] == len(KINDS)
    files = _all_files(first_run["out"])
    # The byte search finds what is stored: every other row's stored copy is in a tar.
    for i in range(len(KINDS), len(first_run["world"])):
        assert any(name.endswith(".tar") for name in _found_anywhere(files, first_run["data"][i])), i
    assert any(line.startswith("blocklists: ") for line in first_run["lines"])


def test_takedown_sticks_for_a_later_run_that_names_the_output(first_run: dict[str, Any]) -> None:
    """Acceptance 2: after a takedown, a run naming the output sends no request for the URL,
    and blocks the same bytes under a new URL (sha256) and a re-encoded copy (PDQ)."""
    root, srv, out1 = first_run["root"], first_run["srv"], first_run["out"]
    victim = len(KINDS) + 2
    url = first_run["urls"][victim]
    path = url[len(srv.base_url):]
    assert first_run["rows"][url][S.STATUS] == "ok"
    assert takedown_main(["--output", str(out1), "--url", url, "--reason", "test takedown"]) == 0
    own = {p.name: p.read_text() for p in (out1 / "_blocklist").iterdir()}
    assert url in own["urls.txt"]
    assert hashlib.sha256(first_run["data"][victim]).hexdigest() in own["sha256.txt"]
    assert first_run["rows"][url][S.PDQ] in own["pdq.txt"]

    original = first_run["data"][victim]
    pic = decode_display(original)
    buf = io.BytesIO()
    pic.resize((pic.width * 3 // 4, pic.height * 3 // 4), Image.Resampling.BICUBIC).save(buf, "JPEG", quality=60)
    srv.files["/mirror/same-bytes.jpg"] = original
    srv.files["/mirror/re-encoded.jpg"] = buf.getvalue()
    others = [first_run["urls"][i] for i in range(len(KINDS), len(KINDS) + 2)]
    urls2 = [url, srv.url("/mirror/same-bytes.jpg"), srv.url("/mirror/re-encoded.jpg"), *others]
    import pyarrow as pa

    pq.write_table(pa.table({"url": urls2, "caption": ["x"] * len(urls2)}), root / "urls2.parquet")
    srv.reset_log()
    out2 = root / "run2"
    job.run(_config(root / "urls2.parquet", out2, blocklist=BlocklistConfig(outputs=(str(out1),))), emit=lambda _: None)
    assert srv.count(path) == 0  # not one request for the taken-down URL
    assert srv.count("/mirror/same-bytes.jpg") == 1
    rows = {r["url"]: r for r in pq.read_table(out2 / "embeddings").to_pylist()}
    name = f"takedowns:{out1}"
    assert rows[urls2[0]][S.ERROR].startswith(f"blocklist {name} (url match)")
    assert rows[urls2[1]][S.ERROR] == f"blocklist {name} (sha256 match)"
    assert rows[urls2[2]][S.ERROR] == f"blocklist {name} (pdq match)"
    assert all(rows[u][S.STATUS] == "blocked" for u in urls2[:3])
    assert all(rows[u][S.STATUS] == "ok" for u in others)
    files = _all_files(out2)
    assert not _found_anywhere(files, original)
    assert not _found_anywhere(files, buf.getvalue())
