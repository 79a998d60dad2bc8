"""WriteStage: one Parquet file per shard, whole, schema-conformant and with its first
decisions, locally and on local S3; a partial shard is passed on unwritten."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from pipeline import schema as S
from pipeline.config import DedupConfig, FilterConfig, StorageConfig, WriteConfig
from pipeline.decisions import decide
from pipeline.schema import embedding_array
from pipeline.stages.write import SUMMARY_COLUMNS, WriteStage, output_table

D = 4


def _rows(keys: list[str], shard: str = "00003", total: int | None = None) -> pa.Table:
    """Embedded rows of one shard; ``total``: the shard's row count (default: these rows)."""
    n = len(keys)
    rng = np.random.default_rng(len(keys))
    emb = rng.normal(size=(n, D)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    ok = np.array([int(k) % 3 != 0 for k in keys])
    return pa.table(
        {
            S.KEY: keys,
            S.SHARD: [shard] * n,
            S.SHARD_ID: [3] * n,
            S.CAPTION: [f"caption {k}" for k in keys],
            S.STATUS: [S.OK if o else "http_404" for o in ok],
            S.ERROR: [None if o else "not found" for o in ok],
            S.WIDTH: pa.array([64] * n, pa.int64()),  # cast to the schema's int32
            S.IMAGE_EMBEDDING: embedding_array(emb, ok),
            S.TEXT_EMBEDDING: embedding_array(emb[::-1].copy(), np.ones(n, bool)),
            S.CLIP_SCORE: pa.array(np.where(ok, 0.5, np.nan), pa.float32(), mask=~ok),
            S.PIXELS: pa.array([b"x"] * n, pa.binary()),
            S.SHARD_ROWS: pa.array([total or n] * n, pa.int64()),
            "extra_col": list(range(n)),
            "blob": pa.array([b"y"] * n, pa.binary()),
        }
    )


def test_output_table_schema() -> None:
    t = output_table(_rows(["000030002", "000030001", "000030000"]), D, FilterConfig())
    fixed = [f.name for f in S.output_fields(D)]
    assert t.column_names[: len(fixed)] == fixed
    assert t.column_names[len(fixed) :] == ["extra_col"]  # working and binary columns dropped
    assert t.schema.field(S.IMAGE_EMBEDDING).type == pa.list_(pa.float16(), D)
    assert t.schema.field(S.WIDTH).type == pa.int32()
    assert t.column(S.KEY).to_pylist() == ["000030000", "000030001", "000030002"]
    assert t.column(S.KEEP).to_pylist() == [False, True, True]
    assert t.column(S.DROP_REASON).to_pylist() == ["status:http_404", None, None]
    assert t.column(S.UNSAFE_SCORE).null_count == 3  # no moderation ran: nulls, not zeros
    # Complete the first time: the global pass finds nothing to change for rows dedup leaves
    # alone (kept rows are their own group of one; failed rows take no part).
    assert t.column(S.DUP_GROUP_SIZE).to_pylist() == [None, 1, 1]
    again = decide(t, FilterConfig(), DedupConfig())
    assert again.equals(t)


def test_writes_the_shard_once_whole_and_rerun_overwrites(tmp_path) -> None:
    out = tmp_path / "out"
    cfg = WriteConfig(output_folder=str(out), row_group_rows=2)
    stage = WriteStage(cfg=cfg, dim=D)
    got = stage.process_batch(_rows(["000030004", "000030001", "000030002", "000030000", "000030003"]))
    assert got.column_names == list(SUMMARY_COLUMNS)  # only what the driver counts flows on
    assert got.column(S.KEY).to_pylist() == [f"00003000{i}" for i in range(5)]
    path = out / "00003.parquet"
    meta = pq.ParquetFile(path).metadata
    assert meta.num_rows == 5 and meta.num_row_groups == 3
    assert meta.row_group(0).column(0).compression == "ZSTD"
    t = pq.read_table(path)
    assert t.column(S.KEY).to_pylist() == [f"00003000{i}" for i in range(5)]
    emb = np.asarray([e for e in t.column(S.IMAGE_EMBEDDING).to_pylist() if e is not None], np.float32)
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-3)

    # A re-run of the shard replaces the file: still one file, five rows, no temp leftovers.
    again = WriteStage(cfg=cfg, dim=D)
    again.process_batch(_rows([f"00003000{i}" for i in range(5)]))
    assert sorted(p.name for p in out.iterdir()) == ["00003.parquet"]
    assert pq.read_table(out).num_rows == 5


def test_part_of_a_shard_flows_on_unwritten(tmp_path) -> None:
    stage = WriteStage(cfg=WriteConfig(output_folder=str(tmp_path / "o")), dim=D)
    part = _rows(["000070001"], shard="00007", total=3)
    got = stage.process_batch(part)
    assert not (tmp_path / "o").exists()
    assert got.column(S.UNWRITTEN).to_pylist() == [True]
    assert got.column(S.IMAGE_EMBEDDING).equals(part.column(S.IMAGE_EMBEDDING))  # whole rows, for the driver


def test_writes_to_s3(s3_bucket, tmp_path) -> None:
    uri = f"s3://{s3_bucket}/run/emb"
    stage = WriteStage(cfg=WriteConfig(output_folder=uri), storage=StorageConfig(), dim=D)
    stage.process_batch(_rows(["000030000", "000030001"]))
    # Read back with a plain pyarrow client on the server's endpoint, not the writer's code.
    fs = pafs.S3FileSystem(endpoint_override=os.environ["AWS_ENDPOINT_URL"].split("://")[1], scheme="http")
    infos = fs.get_file_info(pafs.FileSelector(f"{s3_bucket}/run", recursive=True))
    assert [i.path for i in infos if i.type == pafs.FileType.File] == [f"{s3_bucket}/run/emb/00003.parquet"]
    t = pq.read_table(f"{s3_bucket}/run/emb/00003.parquet", filesystem=fs)
    assert t.num_rows == 2 and t.schema.field(S.TEXT_EMBEDDING).type == pa.list_(pa.float16(), D)


def test_write_config_validation() -> None:
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match="write.output_folder"):
        WriteConfig().validate()
    with pytest.raises(ConfigError, match="write.compression"):
        WriteConfig(output_folder="x", compression="lzma").validate()
