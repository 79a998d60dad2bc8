"""clip_model.job_data: the trainer's reader of a job's output (shards + embeddings Parquet),
from a local folder and from S3, on a hand-made output in the job's layout (the job itself
writes one in tests/jobs/test_multilingual_job.py)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from clip_model.config import PreprocessConfig
from clip_model.job_data import JobOutputError, epoch_order, index_rows, job_output_batches
from clip_model.tokenizer import default_tokenizer

PP = PreprocessConfig(image_size=32)
COLORS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (30, 60, 220)}


def _jpeg(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (48, 40), color).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def write_output(root: Path, shards: int = 3, per_shard: int = 6, uncommitted: int = 1) -> dict:
    """A job output: ``shards`` committed shards plus ``uncommitted`` without a manifest.
    Rows alternate keep True/False; one row per shard failed (no image in the tar)."""
    (root / "shards").mkdir(parents=True)
    (root / "embeddings").mkdir()
    truth = {}
    for s in range(shards + uncommitted):
        name = f"{s:05d}"
        keys, keep, status, caption = [], [], [], []
        tar_buf = io.BytesIO()
        with tarfile.open(fileobj=tar_buf, mode="w") as tar:
            for i in range(per_shard):
                key = f"{name}{i:04d}"
                color = list(COLORS)[(s + i) % 3]
                ok = i != per_shard - 1
                keys.append(key)
                keep.append(ok and i % 2 == 0)
                status.append("ok" if ok else "http_404")
                caption.append(f"a {color} square")
                if ok:
                    for ext, data in (("jpg", _jpeg(COLORS[color])), ("txt", caption[-1].encode()),
                                      ("json", json.dumps({"key": key}).encode())):  # fmt: skip
                        info = tarfile.TarInfo(f"{key}.{ext}")
                        info.size = len(data)
                        tar.addfile(info, io.BytesIO(data))
                truth[key] = (color, keep[-1], ok, s < shards)
        (root / "shards" / f"{name}.tar").write_bytes(tar_buf.getvalue())
        if s < shards:
            (root / "shards" / f"{name}.manifest.json").write_text("{}")
        pq.write_table(
            pa.table({"key": keys, "keep": keep, "status": status, "caption": caption}),
            root / "embeddings" / f"{name}.parquet",
        )
    return truth


def _batches(root: str, keep_only: bool = True, batch_size: int = 4, seed: int = 0):
    return job_output_batches(root, image_size=32, batch_size=batch_size, seed=seed,
                              preprocess=PP, tokenizer=default_tokenizer(), keep_only=keep_only)  # fmt: skip


def test_index_counts_only_committed_rows_and_the_kept_ones(tmp_path):
    truth = write_output(tmp_path)
    rows, counts = index_rows(str(tmp_path))
    assert counts == {"rows": 18, "ok": 15, "kept": 9, "shards": 3}
    assert {r.key for r in rows} == {k for k, (_, keep, ok, com) in truth.items() if keep and ok and com}
    all_rows, _ = index_rows(str(tmp_path), keep_only=False)
    assert len(all_rows) == 15
    with pytest.raises(JobOutputError, match="no committed shards"):
        index_rows(str(tmp_path / "nope"))


def test_batches_pair_each_image_with_its_caption_and_repeat_per_step(tmp_path):
    truth = write_output(tmp_path)
    make = _batches(str(tmp_path))
    images, tokens = make(2)
    assert images.shape == (4, 3, 32, 32) and images.dtype == torch.float32
    assert tokens.shape == (4, 77) and tokens.dtype == torch.int64
    for row, img in zip(make.rows_of(2), images, strict=True):
        color = truth[row.key][0]
        assert row.caption == f"a {color} square"
        # The image's dominant channel is its colour's (normalised pixels, mean per channel).
        assert int(img.mean(dim=(1, 2)).argmax()) == {"red": 0, "green": 1, "blue": 2}[color]
    again = _batches(str(tmp_path))(2)  # a fresh reader (a resumed run) gives the same batch
    assert torch.equal(again[0], images) and torch.equal(again[1], tokens)


def test_epochs_visit_every_row_once_in_a_seeded_order(tmp_path):
    write_output(tmp_path, shards=4)
    rows, _ = index_rows(str(tmp_path))
    for epoch in range(3):
        order = epoch_order(rows, seed=5, epoch=epoch, window=2)
        assert sorted(order) == list(range(len(rows)))
    assert epoch_order(rows, 5, 0, 2) != epoch_order(rows, 5, 1, 2)
    assert epoch_order(rows, 5, 0, 2) == epoch_order(rows, 5, 0, 2)
    make = _batches(str(tmp_path), batch_size=len(rows))
    assert sorted(r.key for r in make.rows_of(0)) == sorted(r.key for r in rows)


def test_reads_the_same_batches_from_s3(tmp_path, s3_server, s3_bucket):
    write_output(tmp_path)
    client = s3_server.client()
    for path in tmp_path.rglob("*"):
        if path.is_file():
            client.put_object(Bucket=s3_bucket, Key=f"run/{path.relative_to(tmp_path)}", Body=path.read_bytes())
    local, remote = _batches(str(tmp_path)), _batches(f"s3://{s3_bucket}/run")
    for step in (0, 3):
        a, b = local(step), remote(step)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert np.isfinite(a[0].numpy()).all()
