"""A hostile URL list end to end through the job (issue 7, acceptance 4): pipeline.job.run on a
local Ray (127.0.0.1 only) and the local S3 server, with the loopback image server and the
bundled tiny model.

The list is JSON lines mixing good rows with every kind of malformed row: missing, null, empty,
non-string and non-http URLs, a URL with a NUL byte, non-string captions, a 1 MiB caption, NUL
bytes and line separators in captions, invalid UTF-8, cut-off and non-object JSON, a binary
line, an exact duplicate row, a body that is not an image, a refused address. The run must
not crash, and the output must hold every input line exactly once, each with ``ok`` or the
reason it failed, and a keep/drop decision that names it.
"""

from __future__ import annotations

import json
import tarfile
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from pipeline import job
from pipeline import schema as S
from pipeline.config import (
    DecodeConfig,
    DedupConfig,
    DownloadConfig,
    EmbedConfig,
    FilterConfig,
    JobConfig,
    ModerateConfig,
    ReadConfig,
    ShardConfig,
)
from testkit.http_server import FaultServer
from testkit.synthetic import generate_world

PER_SHARD = 8
BIG = "".join(chr(0x41 + i % 26) for i in range(1 << 20))  # 1 MiB of ASCII
NUL = "nul\x00in\x00caption"
SEPARATORS = "line\u2028sep\u0085nel \"quoted\" \r\n crlf"
REPAIRED = "invalid UTF-8 in column 'caption' replaced with U+FFFD"


def _line(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode("utf-8")


def _hostile_list(srv: FaultServer, images: list[str]) -> tuple[bytes, list[dict[str, Any]]]:
    """The JSON-lines file and, per input line, what the output row must say: ``status``,
    ``caption`` (exact, when given), ``error`` (a substring), ``dup_of`` (the line it copies)."""
    u = [srv.url(p) for p in images]
    lines: list[bytes] = []
    want: list[dict[str, Any]] = []

    def add(line: bytes, **w: Any) -> None:
        lines.append(line)
        want.append(w)

    add(_line({"url": u[0], "caption": "a plain row"}), status=S.OK, caption="a plain row")
    add(_line({"caption": "no url key"}), status="missing_url")
    add(_line({"url": None, "caption": "null url"}), status="missing_url")
    add(_line({"url": "   ", "caption": "blank url"}), status="missing_url")
    add(_line({"url": u[1], "caption": 12}), status=S.OK, caption="12")  # non-string captions
    add(_line({"url": u[2], "caption": ["x", 1]}), status=S.OK, caption="['x', 1]")
    add(_line({"url": u[3], "caption": {"nested": True}}), status=S.OK, caption="{'nested': True}")
    add(_line({"url": u[4], "caption": BIG}), status=S.OK, caption=BIG)
    add(_line({"url": u[5], "caption": NUL}), status=S.OK, caption=NUL)
    add(_line({"url": u[6], "caption": SEPARATORS}), status=S.OK, caption=SEPARATORS)
    add(b'{"url": "' + u[7].encode() + b'", "caption": "caf\xe9 \xff\xfe"}', status=S.OK,
        caption="caf\ufffd \ufffd\ufffd", error=REPAIRED)
    add(b'{"url": "' + u[8].encode() + b'", "caption": "lone \\ud800 surrogate"}',  # a JSON escape
        status=S.OK, caption="lone \ufffd surrogate", error=REPAIRED)
    add(_line({"url": u[0], "caption": "a plain row"}), status=S.OK, caption="a plain row", dup_of=0)  # duplicate
    add(_line({"url": u[9] + "\x00", "caption": "NUL in the url"}), status="bad_url", error="control characters")
    # Invalid UTF-8 in the url: repaired to U+FFFD by the read stage, then no such file; the
    # failure's reason replaces the repair note.
    add(b'{"url": "' + srv.url("/images/\xff\xfe.jpg").encode("latin-1") + b'", "caption": "bad utf-8 url"}',
        status="http_404", error="404")
    add(_line({"url": 5, "caption": "int url"}), status="bad_scheme")
    add(_line({"url": "ftp://127.0.0.1/x.jpg", "caption": "ftp"}), status="bad_scheme")
    add(_line({"url": "http://127.0.0.2:1/x.jpg", "caption": "not allowed"}), status="blocked_address")
    add(_line({"url": srv.url("/not-an-image.txt"), "caption": "html"}), status="unsupported_format")
    add(_line({"url": srv.url("/missing.jpg"), "caption": "404"}), status="http_404")
    add(b'{"url": "' + u[9].encode() + b'", "caption": ', status="malformed_row", error="line")  # cut off
    add(b"[1, 2, 3]", status="malformed_row", error="not a JSON object")
    add(b"\x00\x01\xff binary garbage", status="malformed_row", error="line")
    add(_line({"url": u[9], "caption": None, "extra": "x"}), status=S.OK, caption=None)
    return b"\n".join(lines) + b"\n", want


pytestmark = pytest.mark.shared_ray


@pytest.fixture(scope="module")
def hostile_run(shared_ray: None, s3_server: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("hostile-job")
    bucket = f"hostile-{uuid.uuid4().hex[:12]}"
    s3_server.create_bucket(bucket)
    with FaultServer(root, files={"/not-an-image.txt": b"<html>not an image</html>"}) as srv:
        world = generate_world(root, 10, 5, srv.base_url + "/", exact_dup_rate=0, near_dup_rate=0,
                               min_side=48, max_side=96)
        data, want = _hostile_list(srv, world.column("_gt_path").to_pylist())
        (root / "list.jsonl").write_bytes(data)
        cfg = JobConfig(
            input=str(root / "list.jsonl"),
            output=f"s3://{bucket}/run",
            read=ReadConfig(input_format="jsonl"),
            download=DownloadConfig(timeout=10, retries=0, allowed_networks=("127.0.0.1/32",)),
            decode=DecodeConfig(image_size=64, resize_mode="center_crop"),
            shard=ShardConfig(number_sample_per_shard=PER_SHARD),
            embed=EmbedConfig(model="tiny-synthetic", pretrained="synthetic", inference_batch=16),
            moderate=ModerateConfig(enabled=False),
            # Only byte-identical images count as duplicates here (cos >= 1).
            dedup=DedupConfig(threshold=1.0),
            # Hostile captions do not describe their images: no clip_score filter (the model's
            # default would drop them), so every ok row but the duplicate is kept.
            filter=FilterConfig(clip_score_threshold=None),
        )
        lines: list[str] = []
        summary = job.run(cfg, emit=lines.append)
    fs = pafs.S3FileSystem(endpoint_override=s3_server.endpoint_url.split("://")[1], scheme="http",
                           access_key="testing", secret_key="testing", region="us-east-1")
    out = pq.read_table(f"{bucket}/run/embeddings", filesystem=fs).sort_by(S.KEY)
    yield {"want": want, "summary": summary, "out": out, "fs": fs, "bucket": bucket, "log": lines}
    fs.delete_dir_contents(bucket)


def test_every_input_line_is_one_output_row_with_its_reason(hostile_run: dict[str, Any]) -> None:
    want, out, summary = hostile_run["want"], hostile_run["out"], hostile_run["summary"]
    rows = out.to_pylist()
    assert len(rows) == len(want) == summary.input_rows == summary.rows
    keys = [r[S.KEY] for r in rows]
    assert len(set(keys)) == len(keys)
    # Keys are img2dataset's: shard * 10 + row in shard (8 rows a shard -> 1 digit).
    assert keys == [S.make_key(i // PER_SHARD, i % PER_SHARD, PER_SHARD) for i in range(len(want))]
    for i, (row, w) in enumerate(zip(rows, want, strict=True)):
        assert row[S.STATUS] == w["status"], (i, row[S.STATUS], row[S.ERROR])
        if "caption" in w:
            assert row[S.CAPTION] == w["caption"], i
        if "error" in w:
            assert w["error"] in (row[S.ERROR] or ""), (i, row[S.ERROR])
        elif row[S.STATUS] != S.OK:
            assert row[S.ERROR], i  # every failure says why
        if row[S.STATUS] == S.OK:
            assert row[S.SHA256] and row[S.WIDTH] == row[S.HEIGHT] == 64, i
            norm = np.linalg.norm(np.asarray(row[S.IMAGE_EMBEDDING], np.float64))
            assert abs(norm - 1) < 2e-3, i
        else:
            assert row[S.IMAGE_EMBEDDING] is None and row[S.SHA256] is None, i
            assert row[S.KEEP] is False and row[S.DROP_REASON] == f"status:{row[S.STATUS]}", i
    assert summary.status_counts == dict(Counter(r[S.STATUS] for r in rows))


def test_the_duplicate_row_is_kept_once(hostile_run: dict[str, Any]) -> None:
    want, rows = hostile_run["want"], hostile_run["out"].to_pylist()
    for i, w in enumerate(want):
        if "dup_of" not in w:
            continue
        first, dup = rows[w["dup_of"]], rows[i]
        assert first[S.SHA256] == dup[S.SHA256]
        assert first[S.KEEP] is True and first[S.DROP_REASON] is None
        assert dup[S.KEEP] is False and dup[S.DUPLICATE_OF] == first[S.KEY]
        assert dup[S.DROP_REASON] == "dedup:exact(sha256)"
    kept_ok = [r for r in rows if r[S.STATUS] == S.OK and r[S.KEEP]]
    assert len(kept_ok) == sum(1 for w in want if w.get("status") == S.OK) - 1


def test_shards_hold_the_exact_caption_bytes_and_stats_count_every_row(hostile_run: dict[str, Any]) -> None:
    fs, bucket, out = hostile_run["fs"], hostile_run["bucket"], hostile_run["out"]
    by_key = {r[S.KEY]: r for r in out.to_pylist()}
    members: dict[str, bytes] = {}
    shard_rows = 0
    for info in fs.get_file_info(pafs.FileSelector(f"{bucket}/run/shards")):
        if info.path.endswith(".tar"):
            with fs.open_input_stream(info.path) as f, tarfile.open(fileobj=pa.BufferReader(f.read())) as tar:
                members.update({m.name: tar.extractfile(m).read() for m in tar.getmembers()})  # type: ignore[union-attr]
        elif info.path.endswith(".parquet"):
            shard_rows += pq.read_metadata(info.path, filesystem=fs).num_rows
    assert shard_rows == len(by_key)
    ok = [k for k, r in by_key.items() if r[S.STATUS] == S.OK]
    assert sorted(members) == sorted(f"{k}.{ext}" for k in ok for ext in ("jpg", "json", "txt"))
    for k in ok:
        assert members[f"{k}.txt"] == (by_key[k][S.CAPTION] or "").encode("utf-8"), k
        assert json.loads(members[f"{k}.json"])["caption"] == by_key[k][S.CAPTION]
    with fs.open_input_stream(f"{bucket}/run/_stats.json") as f:
        stats = json.loads(f.read())
    counts = Counter(r[S.STATUS] for r in by_key.values())
    assert stats["rows"] == stats["input_rows"] == len(by_key)
    assert stats["status"] == dict(sorted(counts.items()))
