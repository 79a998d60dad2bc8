"""Read stage: formats, globs, LAION names, deterministic shards, malformed rows kept."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import ConfigError, ReadConfig
from pipeline.stages.read import (
    ReadStage,
    ShardDescriptor,
    list_input_files,
    plan_shards,
    read_shard,
)


def _read_all(cfg: ReadConfig, n: int) -> pa.Table:
    shards = plan_shards(cfg, n)
    stage = ReadStage(cfg=cfg, number_sample_per_shard=n)
    return pa.concat_tables(
        stage.process_batch(pa.Table.from_pylist([d.as_row()])) for d in shards
    )


def test_parquet_shards_are_deterministic_and_keys_img2dataset_shaped(tmp_path: Path) -> None:
    # Two files, written out of order, with small row groups so shards cross them.
    pq.write_table(
        pa.table({"url": [f"http://h/b{i}" for i in range(7)], "caption": [f"b{i}" for i in range(7)]}),
        tmp_path / "part-1.parquet",
        row_group_size=3,
    )
    pq.write_table(
        pa.table({"url": [f"http://h/a{i}" for i in range(5)], "caption": [f"a{i}" for i in range(5)]}),
        tmp_path / "part-0.parquet",
        row_group_size=2,
    )
    cfg = ReadConfig(url_list=str(tmp_path / "part-*.parquet"))
    shards = plan_shards(cfg, 4)
    assert [(Path(d.path).name, d.shard_id, d.start, d.length) for d in shards] == [
        ("part-0.parquet", 0, 0, 4),
        ("part-0.parquet", 1, 4, 1),
        ("part-1.parquet", 2, 0, 4),
        ("part-1.parquet", 3, 4, 3),
    ]
    t = _read_all(cfg, 4)
    assert t.column("url").to_pylist() == [f"http://h/a{i}" for i in range(5)] + [
        f"http://h/b{i}" for i in range(7)
    ]
    # img2dataset: 10**ceil(log10(4)) * shard + row, padded to 5 + 1 digits.
    assert t.column("key").to_pylist()[:6] == ["000000", "000001", "000002", "000003", "000010", "000020"]
    assert t.column("shard_id").to_pylist() == [0] * 4 + [1] + [2] * 4 + [3] * 3
    assert set(t.column("status").to_pylist()) == {"ok"}
    assert t.column("caption").to_pylist()[5] == "b0"


@pytest.mark.filterwarnings("ignore:'imghdr' is deprecated:DeprecationWarning")
def test_key_width_matches_img2dataset_compute_key() -> None:
    import os

    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    from img2dataset.downloader import compute_key

    from pipeline.schema import make_key, sample_digits

    for n in (1, 9, 10, 11, 1000, 10000):
        oom = sample_digits(n)
        for shard, row in ((0, 0), (12, n - 1), (99999, 0)):
            assert make_key(shard, row, n) == compute_key(row, shard, oom, 5)


def test_csv_tsv_with_malformed_and_empty_rows(tmp_path: Path) -> None:
    (tmp_path / "l.csv").write_text(
        'url,caption,extra\nhttp://h/1,"a, quoted",x1\n,no url,x2\nhttp://h/3,too,many,fields\nhttp://h/4,d,x4\n'
    )
    cfg = ReadConfig(url_list=str(tmp_path / "l.csv"), input_format="csv", save_additional_columns=("extra",))
    t = _read_all(cfg, 10)
    assert t.num_rows == 4
    assert t.column("status").to_pylist() == ["ok", "missing_url", "malformed_row", "ok"]
    assert t.column("caption").to_pylist()[0] == "a, quoted"
    assert t.column("extra").to_pylist() == ["x1", "x2", None, "x4"]
    assert "4 fields" in t.column("error").to_pylist()[2]
    (tmp_path / "l.tsv").write_text("URL\tTEXT\nhttp://h/1\tfirst\nhttp://h/2\tsecond\n")
    t = _read_all(ReadConfig(url_list=str(tmp_path / "l.tsv"), input_format="tsv"), 10)
    assert t.column("url").to_pylist() == ["http://h/1", "http://h/2"]
    assert t.column("caption").to_pylist() == ["first", "second"]


def test_laion_column_names_in_parquet(tmp_path: Path) -> None:
    pq.write_table(
        pa.table({"URL": ["http://h/x", None], "TEXT": ["cap", "cap2"], "WIDTH": [10, 20]}),
        tmp_path / "laion.parquet",
    )
    cfg = ReadConfig(url_list=str(tmp_path / "laion.parquet"), save_additional_columns=("WIDTH",))
    t = _read_all(cfg, 100)
    assert t.column("url").to_pylist() == ["http://h/x", None]
    assert t.column("caption").to_pylist() == ["cap", "cap2"]
    assert t.column("status").to_pylist() == ["ok", "missing_url"]
    assert t.column("WIDTH").to_pylist() == [10, 20]
    assert t.schema.field("WIDTH").type == pa.int64()  # parquet types are kept


def test_jsonl_bad_lines_become_rows(tmp_path: Path) -> None:
    lines = [
        json.dumps({"url": "http://h/1", "caption": "one"}),
        "{not json",
        json.dumps([1, 2]),
        json.dumps({"url": 5, "caption": None}),
        "",
        json.dumps({"caption": "no url"}),
    ]
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n")
    t = _read_all(ReadConfig(url_list=str(tmp_path / "a.jsonl"), input_format="jsonl"), 2)
    assert t.num_rows == 5  # the blank line is not a row
    assert t.column("status").to_pylist() == ["ok", "malformed_row", "malformed_row", "ok", "missing_url"]
    assert t.column("url").to_pylist()[3] == "5"
    assert t.column("shard_id").to_pylist() == [0, 0, 1, 1, 2]


def test_txt_and_directory_input(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "b.txt").write_text("http://h/3\n\nhttp://h/4\n\n")
    (tmp_path / "d" / "a.txt").write_text("http://h/1\nhttp://h/2")
    (tmp_path / "d" / "ignored.csv").write_text("url\nhttp://nope\n")
    cfg = ReadConfig(url_list=str(tmp_path / "d"), input_format="txt")
    assert [Path(p).name for p in list_input_files(cfg.url_list, "txt")] == ["a.txt", "b.txt"]
    t = _read_all(cfg, 10)
    assert t.column("url").to_pylist() == ["http://h/1", "http://h/2", "http://h/3", None, "http://h/4"]
    assert t.column("status").to_pylist()[3] == "missing_url"
    assert t.column("caption").null_count == 5


def test_missing_inputs_and_columns_fail_before_work(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="read.url_list"):
        plan_shards(ReadConfig(url_list=str(tmp_path / "nothing-*.parquet")), 10)
    pq.write_table(pa.table({"link": ["http://h"]}), tmp_path / "x.parquet")
    with pytest.raises(ConfigError, match="read.url_col"):
        plan_shards(ReadConfig(url_list=str(tmp_path / "x.parquet")), 10)
    with pytest.raises(ConfigError, match="read.save_additional_columns"):
        plan_shards(ReadConfig(url_list=str(tmp_path / "x.parquet"), url_col="link", caption_col=None,
                               save_additional_columns=("nope",)), 10)


def test_s3_input_with_glob(s3_bucket: str, s3_server: object) -> None:
    import io

    client = s3_server.client()  # type: ignore[attr-defined]
    for name, rows in (("lists/p-1.parquet", 3), ("lists/p-0.parquet", 2), ("other/p-9.parquet", 1)):
        buf = io.BytesIO()
        pq.write_table(pa.table({"url": [f"http://h/{name}/{i}" for i in range(rows)]}), buf)
        client.put_object(Bucket=s3_bucket, Key=name, Body=buf.getvalue())
    cfg = ReadConfig(url_list=f"s3://{s3_bucket}/lists/p-*.parquet", caption_col=None)
    shards = plan_shards(cfg, 2)
    assert [d.path for d in shards] == [
        f"s3://{s3_bucket}/lists/p-0.parquet",
        f"s3://{s3_bucket}/lists/p-1.parquet",
        f"s3://{s3_bucket}/lists/p-1.parquet",
    ]
    t = read_shard(ShardDescriptor(2, shards[2].path, 2, 1), cfg, 2)
    assert t.column("url").to_pylist() == ["http://h/lists/p-1.parquet/2"]
    assert t.column("key").to_pylist() == ["000020"]  # 10 * shard 2 + row 0, 5 + 1 digits
