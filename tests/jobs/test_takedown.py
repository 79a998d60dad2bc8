"""jobs/takedown.py on a small finished output built with the real shard, write and report code
(build_shard/commit_shard, output_table/write_parquet, report.write_report), local and on S3."""

from __future__ import annotations

import hashlib
import io
import json
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs.takedown import main
from pipeline import report
from pipeline import schema as S
from pipeline.config import WriteConfig
from pipeline.shard_format import committed_shards
from pipeline.stages.shard import build_shard, commit_shard
from pipeline.stages.write import output_table, write_parquet
from pipeline.storage import Storage
from pipeline.takedown import AUDIT_NAME, TAKEDOWN, Matchers, TakedownError, takedown
from pipeline.thumbnails import thumbnail
from testkit.testdata import photos

REPO = Path(__file__).resolve().parents[2]
PHOTOS = photos()
PER_SHARD = 10
DIM = 8


def _url(shard: int, i: int) -> str:
    return f"http://img.test/{shard}/{i}.jpg"


def _photo(shard: int, i: int) -> bytes:
    # Row (1, 2) holds the same photo as row (0, 1): an exact duplicate across shards.
    idx = 1 if (shard, i) == (1, 2) else (shard * 4 + i) % len(PHOTOS)
    return PHOTOS[idx].read_bytes()


def _build(root: str) -> dict[str, str]:
    """Two committed shards of 4 rows (row 3 of each failed with http_404), their embeddings
    files and a report. Returns key -> sha256 of the ok rows."""
    rng = np.random.default_rng(0)
    shards = Storage(f"{root}/shards")
    hashes = {}
    emb_tables = []
    for shard in (0, 1):
        rows = []
        for i in range(4):
            ok = i != 3
            image = _photo(shard, i) if ok else None
            key = S.make_key(shard, i, PER_SHARD)
            sha = hashlib.sha256(image).hexdigest() if ok else None
            if ok:
                hashes[key] = sha
            rows.append({
                S.KEY: key, S.SHARD_ID: shard, S.URL: _url(shard, i), S.CAPTION: f"photo {shard}-{i}",
                S.STATUS: S.OK if ok else "http_404", S.ERROR: None if ok else "404",
                S.IMAGE: image, S.IMAGE_FORMAT: "jpg" if ok else None,
                S.WIDTH: 64 if ok else None, S.HEIGHT: 64 if ok else None, S.SHA256: sha,
            })
        table = pa.Table.from_pylist(rows)
        commit_shard(shards, build_shard(shard, table))
        emb = rng.standard_normal((4, DIM)).astype(np.float32)
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        ok_mask = [r[S.STATUS] == S.OK for r in rows]
        rest = table.drop_columns([S.IMAGE, S.SHARD_ID]).append_column(
            S.SHARD, pa.array([S.shard_name(shard)] * 4)
        )
        rest = rest.append_column(
            S.IMAGE_EMBEDDING,
            pa.array([list(e.astype(np.float16)) if m else None for e, m in zip(emb, ok_mask, strict=True)],
                     S.embedding_type(DIM)),
        ).append_column(
            S.TEXT_EMBEDDING, pa.array([list(e.astype(np.float16)) for e in emb], S.embedding_type(DIM))
        ).append_column(
            S.IMAGE_THUMB,
            pa.array([thumbnail(Image.open(io.BytesIO(r[S.IMAGE]))) if r[S.IMAGE] else None for r in rows], pa.binary()),
        )
        dup = [S.make_key(0, 1, PER_SHARD) if (shard, i) == (1, 2) else None for i in range(4)]
        rest = rest.append_column(S.DUPLICATE_OF, pa.array(dup, pa.string()))
        out = output_table(rest, DIM)
        keep = [m and d is None for m, d in zip(ok_mask, dup, strict=True)]
        out = out.set_column(out.column_names.index(S.KEEP), S.KEEP, pa.array(keep))
        reasons = ["dedup:exact(sha256)" if d else (None if m else "status:http_404")
                   for m, d in zip(ok_mask, dup, strict=True)]
        out = out.set_column(out.column_names.index(S.DROP_REASON), S.DROP_REASON, pa.array(reasons))
        write_parquet(out, f"{root}/embeddings/{S.shard_name(shard)}.parquet", WriteConfig(), _storage_cfg())
        emb_tables.append(out)
    table = pa.concat_tables(emb_tables).drop_columns([S.IMAGE_EMBEDDING, S.TEXT_EMBEDDING])
    thumbs = report.read_thumbnails_from_shards(f"{root}/shards", table, report.sample_keys(table), _storage_cfg())
    assert len(thumbs) == 6  # every ok row has a thumbnail before the takedown
    report.write_report(table, root, thumbnails=thumbs, storage=_storage_cfg(), timings={"stream": 3.0})
    return hashes


def _storage_cfg():
    from pipeline.config import StorageConfig

    return StorageConfig()


def _snapshot(root: str) -> dict[str, bytes]:
    out = {}
    for sub in ("", "shards", "embeddings"):
        store = Storage(f"{root}/{sub}".rstrip("/"))
        for name in store.list_names():
            out[f"{sub}/{name}"] = store.read_bytes(name)
    return out


def _members(tar_bytes: bytes) -> dict[str, bytes]:
    """member name -> its raw header blocks + data, exactly as stored."""
    with tarfile.open(fileobj=io.BytesIO(tar_bytes), mode="r:") as tar:
        return {m.name: tar_bytes[m.offset : m.offset_data + m.size] for m in tar.getmembers()}


@pytest.fixture(params=["local", "s3"])
def output(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "out")
    bucket = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/runs/day1"


def test_takedown_by_url_and_hash(output: str, tmp_path: Path, capsys) -> None:
    import webdataset as wds

    hashes = _build(output)
    before = _snapshot(output)
    k01, k12, k02 = (S.make_key(s, i, PER_SHARD) for s, i in ((0, 1), (1, 2), (0, 2)))
    taken = {k01, k12, k02}  # k01 and k12 share a hash; k02 is named by its URL
    hashes_file = tmp_path / "hashes.txt"
    hashes_file.write_text(f"# takedown list\n{hashes[k01].upper()}\n\n")
    argv = ["--output", output, "--url", f"  {_url(0, 2)}\t", "--url", "http://img.test/unknown.jpg",
            "--hashes-file", str(hashes_file), "--reason", "DMCA 118"]

    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "rows matched: 3" in printed
    assert "shards rewritten: 2" in printed
    assert "not found: url http://img.test/unknown.jpg" in printed
    after = _snapshot(output)

    shards = Storage(f"{output}/shards")
    assert committed_shards(shards) == {"00000", "00001"}
    for name in ("00000", "00001"):
        tar_bytes = after[f"shards/{name}.tar"]
        old, new = _members(before[f"shards/{name}.tar"]), _members(tar_bytes)
        assert not {m.split(".")[0] for m in new} & taken
        # Every other sample's members are byte-identical, headers included.
        assert new == {m: b for m, b in old.items() if m.split(".")[0] not in taken}
        manifest = json.loads(after[f"shards/{name}.manifest.json"])
        for fname, info in manifest["files"].items():
            data = after[f"shards/{fname}"]
            assert info == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        # webdataset's own tar reader (what WebDataset(url) runs), on an in-memory stream.
        files = wds.tariterators.tar_file_expander([{"stream": io.BytesIO(tar_bytes), "url": name}])
        samples = list(wds.tariterators.group_by_keys(files))
        assert all(set(s) >= {"jpg", "json", "txt"} for s in samples)
        read = [s["__key__"] for s in samples]
        assert read == manifest["keys"] and manifest["samples"] == len(read)
        assert set(manifest["taken_down"]) == taken & {k for k in hashes if k.startswith(name)}
        assert after[f"shards/{name}_stats.json"] == before[f"shards/{name}_stats.json"]

        rows = pq.read_table(pa.BufferReader(after[f"shards/{name}.parquet"]))
        old_rows = pq.read_table(pa.BufferReader(before[f"shards/{name}.parquet"]))
        assert rows.num_rows == old_rows.num_rows == 4
        assert rows.drop_columns([TAKEDOWN]).equals(old_rows)  # status and the rest untouched
        marks = dict(zip(rows.column(S.KEY).to_pylist(), rows.column(TAKEDOWN).to_pylist(), strict=True))
        assert {k for k, v in marks.items() if v is not None} == taken & set(marks)
        assert {v for v in marks.values() if v is not None} <= {"DMCA 118"}

        emb = pq.read_table(pa.BufferReader(after[f"embeddings/{name}.parquet"]))
        old_emb = pq.read_table(pa.BufferReader(before[f"embeddings/{name}.parquet"]))
        assert emb.num_rows == old_emb.num_rows == 4
        for new_row, old_row in zip(emb.to_pylist(), old_emb.to_pylist(), strict=True):
            if new_row[S.KEY] in taken:
                assert new_row[S.KEEP] is False
                assert new_row[S.DROP_REASON] == "takedown: DMCA 118"
                assert new_row[S.IMAGE_EMBEDDING] is None
                assert new_row[S.IMAGE_THUMB] is None and old_row[S.IMAGE_THUMB] is not None
                assert new_row[S.STATUS] == old_row[S.STATUS] == S.OK
                assert new_row[TAKEDOWN] == "DMCA 118"
            else:
                assert new_row.pop(TAKEDOWN) is None
                assert new_row == old_row

    # The report no longer counts them as kept and shows no thumbnail of them.
    stats = json.loads(after["/_stats.json"])
    assert stats["drop_reasons"]["takedown: DMCA 118"] == 3
    assert stats["kept"] == json.loads(before["/_stats.json"])["kept"] - 2  # k12 was already a duplicate
    assert stats["timings"] == {"stream": 3.0}
    page = after["/report.html"].decode()
    figures = dict(re.findall(r'<figure data-key="([^"]+)"[^>]*>(.*?)</figure>', page))
    assert taken <= set(figures)
    assert all("<img" not in figures[k] for k in taken)
    assert sum("<img" in f for f in figures.values()) == 3  # the ok rows still stored

    audit = [json.loads(line) for line in after[f"/{AUDIT_NAME}"].splitlines()]
    assert len(audit) == 1
    assert audit[0]["keys"] == sorted(taken)
    assert audit[0]["sha256"] == [hashes[k01]] and audit[0]["urls"] == sorted([_url(0, 2), "http://img.test/unknown.jpg"])
    assert audit[0]["urls_not_found"] == ["http://img.test/unknown.jpg"]
    assert len(after[f"/{AUDIT_NAME}"]) < 2000  # a record, never image bytes

    # The same takedown again: nothing written, not even the audit log.
    assert main(argv) == 0
    assert "shards rewritten: 0" in capsys.readouterr().out
    assert _snapshot(output) == after


def test_dry_run_changes_nothing(tmp_path: Path, capsys) -> None:
    root = str(tmp_path / "out")
    hashes = _build(root)
    before = _snapshot(root)
    key = S.make_key(1, 0, PER_SHARD)
    assert main(["--output", root, "--sha256", hashes[key], "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "dry run" in printed and "rows matched: 1" in printed and "shards rewritten: 1" in printed
    assert _snapshot(root) == before
    # The script itself, as a user runs it.
    done = subprocess.run(
        [sys.executable, str(REPO / "jobs/takedown.py"), "--output", root, "--url", _url(0, 0), "--dry-run"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert "rows matched: 1" in done.stdout and "samples removed from tars: 1" in done.stdout
    assert _snapshot(root) == before


def test_rerun_completes_a_crashed_takedown(tmp_path: Path, monkeypatch) -> None:
    root = str(tmp_path / "out")
    _build(root)
    url = _url(1, 1)
    real_write = Storage.write_atomic

    def crash_after_tar(self, rel, data):
        real_write(self, rel, data)
        if rel.endswith(".tar"):
            raise OSError("simulated crash")

    monkeypatch.setattr(Storage, "write_atomic", crash_after_tar)
    with pytest.raises(OSError, match="simulated crash"):
        takedown(root, Matchers.build([url]), "x")
    monkeypatch.setattr(Storage, "write_atomic", real_write)
    # The new tar no longer matches the old manifest: the shard is not committed right now.
    assert committed_shards(Storage(f"{root}/shards")) == {"00000"}

    summary = takedown(root, Matchers.build([url]), "x")
    assert summary.shards_rewritten == ["00001"] and summary.samples_removed == 0
    assert committed_shards(Storage(f"{root}/shards")) == {"00000", "00001"}
    manifest = json.loads((tmp_path / "out/shards/00001.manifest.json").read_text())
    assert S.make_key(1, 1, PER_SHARD) not in manifest["keys"] and manifest["samples"] == 2
    emb = pq.read_table(tmp_path / "out/embeddings/00001.parquet").to_pylist()
    assert [r[S.DROP_REASON] for r in emb if r[S.URL] == url] == ["takedown: x"]
    assert json.loads((tmp_path / "out/_stats.json").read_text())["drop_reasons"]["takedown: x"] == 1
    assert len((tmp_path / "out" / AUDIT_NAME).read_text().splitlines()) == 1
    # And now it is complete: a third run writes nothing.
    snap = _snapshot(root)
    assert not takedown(root, Matchers.build([url]), "x").changed
    assert _snapshot(root) == snap


def test_bad_input_is_refused(tmp_path: Path, capsys) -> None:
    root = str(tmp_path / "out")
    assert main(["--output", root, "--sha256", "abc"]) == 2
    assert "not a sha256 hex digest" in capsys.readouterr().err
    assert main(["--output", root]) == 2
    assert "nothing to take down" in capsys.readouterr().err
    assert main(["--output", root, "--url", "http://a/b.jpg"]) == 2
    assert "not a job output" in capsys.readouterr().err
    with pytest.raises(TakedownError, match="empty URL"):
        Matchers.build(["  "])


def test_refuses_a_shard_that_disagrees_with_its_manifest(tmp_path: Path) -> None:
    root = str(tmp_path / "out")
    _build(root)
    tar = tmp_path / "out/shards/00000.tar"
    tar.write_bytes(tar.read_bytes()[:-1024] + b"\0" * 1024 + b"\0" * 512)  # someone else wrote it
    before = _snapshot(root)
    with pytest.raises(TakedownError, match="does not match its manifest"):
        takedown(root, Matchers.build([_url(0, 0)]), "x")
    assert _snapshot(root) == before


def test_rerun_regenerates_a_report_the_crash_left_stale(tmp_path: Path, monkeypatch) -> None:
    root = str(tmp_path / "out")
    _build(root)
    real_write = Storage.write_atomic

    def crash_at_report(self, rel, data):
        if rel == report.STATS_NAME:
            raise OSError("simulated crash")
        real_write(self, rel, data)

    monkeypatch.setattr(Storage, "write_atomic", crash_at_report)
    with pytest.raises(OSError, match="simulated crash"):
        takedown(root, Matchers.build([_url(0, 0)]), "x")
    monkeypatch.setattr(Storage, "write_atomic", real_write)
    assert "takedown: x" not in json.loads((tmp_path / "out/_stats.json").read_text())["drop_reasons"]

    summary = takedown(root, Matchers.build([_url(0, 0)]), "x")
    # Every data file was already done; only the stale report (and the audit) are written.
    assert summary.shards_rewritten == [] and summary.embeddings_rewritten == []
    assert summary.report_rewritten
    assert json.loads((tmp_path / "out/_stats.json").read_text())["drop_reasons"]["takedown: x"] == 1
    page = (tmp_path / "out/report.html").read_text()
    figure = re.search(rf'<figure data-key="{S.make_key(0, 0, PER_SHARD)}"[^>]*>(.*?)</figure>', page)
    assert figure is not None and "<img" not in figure.group(1)
    assert len((tmp_path / "out" / AUDIT_NAME).read_text().splitlines()) == 1
