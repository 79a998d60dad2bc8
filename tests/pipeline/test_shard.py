"""ShardStage and the shard format: img2dataset's tar layout, per-shard parquet/stats, manifest;
a shard is written from all its rows at once or not at all."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline import schema as S
from pipeline.config import ShardConfig
from pipeline.stages.shard import ShardStage


def _jpeg(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 6), color).save(buf, "JPEG")
    return buf.getvalue()


def _rows(shard_id: int, statuses: list[str], n_per_shard: int = 100) -> pa.Table:
    n = len(statuses)
    ok = [s == "ok" for s in statuses]
    images = [_jpeg((i * 20 % 255, 0, 0)) if ok[i] else None for i in range(n)]
    return pa.table(
        {
            S.KEY: [S.make_key(shard_id, i, n_per_shard) for i in range(n)],
            S.SHARD_ID: pa.array([shard_id] * n, pa.int64()),
            S.URL: [f"http://h/{shard_id}/{i}" for i in range(n)],
            S.CAPTION: [f"caption {i}" if i % 3 else None for i in range(n)],
            S.STATUS: statuses,
            S.ERROR: [None if o else "why" for o in ok],
            S.SHARD_ROWS: pa.array([n] * n, pa.int64()),
            S.SHARD_STARTED: pa.array([1000.0] * n, pa.float64()),
            S.HTTP_STATUS: pa.array([200 if o else 404 for o in ok], pa.int32()),
            S.DOWNLOAD_S: pa.array([0.01] * n, pa.float32()),
            "source_id": list(range(n)),
            "_label": [f"l{i}" for i in range(n)],
            S.IMAGE: pa.array(images, pa.binary()),
            S.IMAGE_FORMAT: ["jpg" if o else None for o in ok],
            S.WIDTH: pa.array([8 if o else None for o in ok], pa.int32()),
            S.HEIGHT: pa.array([6 if o else None for o in ok], pa.int32()),
            S.ORIGINAL_WIDTH: pa.array([80 if o else None for o in ok], pa.int32()),
            S.ORIGINAL_HEIGHT: pa.array([60 if o else None for o in ok], pa.int32()),
            S.SHA256: [hashlib.sha256(b).hexdigest() if b else None for b in images],
        }
    )


STATUSES = ["ok", "http_404", "ok", "decode_error", "ok", "too_small", "missing_url", "ok"]


def _stage(tmp_path: Path) -> ShardStage:
    stage = ShardStage(cfg=ShardConfig(output_folder=str(tmp_path)), passthrough=("source_id", "_label"))
    stage.setup()
    return stage


def test_shard_files_layout_and_contents(tmp_path: Path) -> None:
    rows = _rows(7, STATUSES)
    out = _stage(tmp_path).process_batch(rows)

    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "00007.manifest.json",
        "00007.parquet",
        "00007.tar",
        "00007_stats.json",
    ]
    ok_keys = [S.make_key(7, i, 100) for i, s in enumerate(STATUSES) if s == "ok"]
    with tarfile.open(tmp_path / "00007.tar") as tar:
        names = tar.getnames()
        assert names == [f"{k}.{e}" for k in ok_keys for e in ("jpg", "json", "txt")]
        meta = json.loads(tar.extractfile(f"{ok_keys[1]}.json").read())  # row 2
        jpg = tar.extractfile(f"{ok_keys[1]}.jpg").read()
        txt = tar.extractfile(f"{ok_keys[0]}.txt").read()
    # img2dataset's json fields (plus the additional column), with its "success" status.
    assert meta == {
        "url": "http://h/7/2",
        "caption": "caption 2",
        "source_id": 2,
        "_label": "l2",
        "key": ok_keys[1],
        "status": "success",
        "error_message": None,
        "width": 8,
        "height": 6,
        "original_width": 80,
        "original_height": 60,
        "sha256": hashlib.sha256(jpg).hexdigest(),
    }
    assert jpg == rows.column(S.IMAGE).to_pylist()[2]
    assert txt == b""  # row 0 has no caption: img2dataset writes an empty .txt

    table = pq.read_table(tmp_path / "00007.parquet")
    assert table.num_rows == len(STATUSES)
    assert table.column("status").to_pylist() == STATUSES
    assert table.column("shard").to_pylist() == ["00007"] * len(STATUSES)
    assert table.column("source_id").to_pylist() == list(range(len(STATUSES)))
    # A passthrough column keeps its name even when it starts with "_"; bookkeeping columns don't.
    assert table.column("_label").to_pylist() == [f"l{i}" for i in range(len(STATUSES))]
    assert "image" not in table.column_names and "_shard_rows" not in table.column_names
    assert table.schema.field("width").type == pa.int32()

    stats = json.loads((tmp_path / "00007_stats.json").read_text())
    assert stats["count"] == 8 and stats["successes"] == 4
    assert stats["failed_to_resize"] == 2  # decode_error, too_small
    assert stats["failed_to_download"] == 2  # http_404, missing_url
    assert stats["status_dict"] == {"decode_error": 1, "http_404": 1, "missing_url": 1, "ok": 4, "too_small": 1}
    assert stats["start_time"] == 1000.0 and stats["end_time"] >= stats["start_time"]

    manifest = json.loads((tmp_path / "00007.manifest.json").read_text())
    assert manifest["count"] == 8 and manifest["samples"] == 4 and manifest["keys"] == ok_keys
    for name, info in manifest["files"].items():
        data = (tmp_path / name).read_bytes()
        assert info == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}

    # Rows flow on: same rows, no image bytes, with the shard name.
    assert out.num_rows == 8 and S.IMAGE not in out.column_names
    assert out.column(S.SHARD).to_pylist() == ["00007"] * 8
    assert out.column(S.KEY).to_pylist() == rows.column(S.KEY).to_pylist()


def test_tar_reads_with_webdataset(tmp_path: Path) -> None:
    import webdataset as wds

    _stage(tmp_path).process_batch(_rows(0, STATUSES))
    samples = list(wds.WebDataset(str(tmp_path / "00000.tar"), shardshuffle=False))
    assert [s["__key__"] for s in samples] == [S.make_key(0, i, 100) for i in (0, 2, 4, 7)]
    assert all(set(s) >= {"jpg", "json", "txt"} for s in samples)
    assert json.loads(samples[2]["json"])["url"] == "http://h/0/4"


def test_part_of_a_shard_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    stage = _stage(tmp_path)
    rows = _rows(3, STATUSES)
    with pytest.raises(RuntimeError, match="one whole shard per batch"):
        stage.process_batch(rows.slice(5, 3))
    with pytest.raises(RuntimeError, match="one whole shard per batch"):
        stage.process_batch(pa.concat_tables([rows, _rows(4, ["ok", "ok"])], promote_options="permissive"))
    assert list(tmp_path.iterdir()) == []
    out = stage.process_batch(rows)
    assert out.column(S.SHARD_ROWS).to_pylist() == [8] * 8  # flows on to the write stage
    table = pq.read_table(tmp_path / "00003.parquet")
    assert table.column("key").to_pylist() == rows.column(S.KEY).to_pylist()  # input order
    with tarfile.open(tmp_path / "00003.tar") as tar:
        assert len(tar.getnames()) == 3 * 4


def test_ok_row_without_image_is_not_stored(tmp_path: Path) -> None:
    rows = _rows(1, ["ok", "ok"])
    images = rows.column(S.IMAGE).to_pylist()
    images[1] = None
    rows = rows.set_column(rows.schema.get_field_index(S.IMAGE), S.IMAGE, pa.array(images, pa.binary()))
    out = _stage(tmp_path).process_batch(rows)
    table = pq.read_table(tmp_path / "00001.parquet")
    assert table.column("status").to_pylist() == ["ok", "decode_error"]
    assert out.column(S.STATUS).to_pylist() == ["ok", "decode_error"]  # the rows flowing on agree
    with tarfile.open(tmp_path / "00001.tar") as tar:
        assert len(tar.getnames()) == 3


def test_unsafe_keys_are_rejected(tmp_path: Path) -> None:
    rows = _rows(0, ["ok"])
    rows = rows.set_column(0, S.KEY, pa.array(["../evil"]))
    with pytest.raises(ValueError, match="not tar-safe"):
        _stage(tmp_path).process_batch(rows)
    assert list(tmp_path.iterdir()) == []
