"""The job over an img2dataset output instead of a URL list (``--input-format img2dataset``):
no request is made (the image server is gone before the job starts), every row img2dataset
recorded is in the output once, stored images are embedded and curated as downloaded ones
are, its failures keep their reason, and a rerun finds the job done."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline import job_config as J
from pipeline import schema as S
from pipeline.config import (
    DecodeConfig,
    EmbedConfig,
    ExecutionConfig,
    JobConfig,
    ReadConfig,
    ShardConfig,
)
from pipeline.job import format_summary, run
from pipeline.stages.decode import _is_padding, _unpad_box
from testkit.img2dataset_output import make_img2dataset_output

ROWS = 30
MISSING = (4, 17)


@pytest.fixture(scope="module")
def i2d(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # The image server is gone when it returns: the job cannot download anything.
    return make_img2dataset_output(tmp_path_factory.mktemp("i2d-job-world"), ROWS, 8, missing=MISSING,
                                   number_sample_per_shard=20, image_size=96, min_side=96, max_side=256)


def _cfg(i2d: Path, out: Path) -> JobConfig:
    return JobConfig(
        input=str(i2d),
        output=str(out),
        read=ReadConfig(input_format="img2dataset", save_additional_columns=("_gt_row",)),
        decode=DecodeConfig(image_size=64, resize_mode="center_crop"),
        shard=ShardConfig(number_sample_per_shard=10),
        embed=EmbedConfig(inference_batch=8),
        execution=ExecutionConfig(scheduler="local", processes=2),
    )


def test_the_job_curates_an_img2dataset_output_without_downloading(i2d: Path, tmp_path: Path) -> None:
    lines: list[str] = []
    summary = run(_cfg(i2d, tmp_path / "out"), lines.append)
    source = {r["key"]: r for p in sorted(i2d.glob("*.parquet")) for r in pq.read_table(p).to_pylist()}
    out = pq.read_table(tmp_path / "out" / "embeddings").to_pylist()
    assert sorted(r["_gt_row"] for r in out) == list(range(ROWS))  # every row, once
    assert sorted(r[S.SOURCE_KEY] for r in out) == sorted(source)
    assert summary.status_counts == {S.OK: ROWS - len(MISSING), S.SOURCE_FAILED: len(MISSING)}
    for r in out:
        src = source[r[S.SOURCE_KEY]]
        assert r["_gt_row"] == src["_gt_row"] and r[S.URL] == src["url"]
        if r["_gt_row"] in MISSING:
            assert r[S.STATUS] == S.SOURCE_FAILED and r[S.ERROR].startswith("failed_to_download: ")
            assert r[S.KEEP] is False and r[S.DROP_REASON] == "status:source_failed"
            assert r[S.IMAGE_EMBEDDING] is None
        else:
            # The image img2dataset stored (96 px), decoded and embedded here; the hash is of
            # the file it downloaded.
            assert r[S.SOURCE_SHA256] == src["sha256"]
            assert (r[S.ORIGINAL_WIDTH], r[S.ORIGINAL_HEIGHT]) == (src["original_width"], src["original_height"])
            assert (src["width"], src["height"]) == (96, 96)  # what img2dataset stored: padded squares
            assert r[S.EMBEDDED_FROM] == "stored" and r[S.CLIP_SCORE] is not None
            norm = np.linalg.norm(np.asarray(r[S.IMAGE_EMBEDDING], np.float64))
            assert abs(norm - 1.0) < 2e-3
    # This job's own shards: the images again (64 px now), with the source key in each .json.
    shards = tmp_path / "out" / "shards"
    shard_rows = [r for p in sorted(shards.glob("*.parquet")) for r in pq.read_table(p).to_pylist()]
    assert sorted(r[S.SOURCE_KEY] for r in shard_rows) == sorted(source)
    assert summary.shards_planned == 3  # img2dataset wrote 20 + 10 rows; 10 per shard here

    assert "3 shards planned (30 rows): 3 to read from img2dataset tars, 0 committed but not embedded, 0 done" in lines
    assert "shards: 3 planned, 3 read from img2dataset tars, 0 re-embedded, 0 already done" in format_summary(summary)

    again = run(_cfg(i2d, tmp_path / "out"), lines.append)
    assert (again.shards_downloaded, again.shards_reembedded, again.shards_skipped) == (0, 0, 3)

    # A clipcurate output's shards are in the same layout: a new output from them (another
    # model, other settings) downloads nothing either, and keeps each row's status.
    run(_cfg(shards, tmp_path / "out2"), lines.append)
    second = {r[S.SOURCE_KEY]: r for r in pq.read_table(tmp_path / "out2" / "embeddings").to_pylist()}
    first = {r[S.KEY]: r for r in out}
    assert sorted(second) == sorted(first)
    for key, r in second.items():
        assert (r[S.STATUS], r[S.ERROR], r["_gt_row"]) == (first[key][S.STATUS], first[key][S.ERROR], first[key]["_gt_row"])
        assert r[S.SOURCE_SHA256] == first[key][S.SOURCE_SHA256]  # still the original's hash
    # Same settings: each stored copy is already the one this job would store, so it is kept
    # byte for byte, not compressed a second time. Except where a center-cropped copy's white
    # margins pass for border padding (docs/operations.md): that one is cut and re-made.
    before, after = _shard_images(shards, S.KEY), _shard_images(tmp_path / "out2" / "shards", S.SOURCE_KEY)
    assert sorted(after) == sorted(before) and len(before) == ROWS - len(MISSING)
    looks_padded = set()
    for key, data in before.items():
        picture = Image.open(io.BytesIO(data)).convert("RGB")
        box = _unpad_box(64, 64, (first[key][S.ORIGINAL_WIDTH], first[key][S.ORIGINAL_HEIGHT]))
        if box is not None and _is_padding(picture, box):
            looks_padded.add(key)
    assert {k for k in before if after[k] != before[k]} == looks_padded and len(looks_padded) <= 2


def _shard_images(shards: Path, by: str) -> dict[str, bytes]:
    """Stored image bytes of an output's shards, by their rows' column ``by``."""
    images = {}
    for table in sorted(shards.glob("*.parquet")):
        origin = {r[S.KEY]: r[by] for r in pq.read_table(table).to_pylist()}
        with tarfile.open(table.with_suffix(".tar")) as tar:
            for m in tar:
                key, _, ext = m.name.partition(".")
                if m.isfile() and ext == "jpg":
                    images[origin[key]] = tar.extractfile(m).read()
    return images


def test_the_cli_takes_the_format(i2d: Path, tmp_path: Path) -> None:
    args = J.build_parser(prog="embed_laion.py").parse_args(
        ["--input", str(i2d), "--output", str(tmp_path / "o"), "--input-format", "img2dataset"])
    cfg = J.from_namespace(args)
    assert cfg.read.input_format == "img2dataset" and cfg.read.passthrough == (S.SOURCE_KEY,)
