"""Hostile URL lists through read -> decode -> shard (issue 7, acceptance 4, stage level).

Each input format gets a file of malformed rows. Every input row must come out of the read
stage exactly once with ``ok`` or a reason, under a unique tar-safe key; the rows then pass a
DecodeStage and build_shard, whose tar holds each stored caption's bytes exactly and whose
parquet holds every row once.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline import schema as S
from pipeline.config import ConfigError, DecodeConfig, ReadConfig, ShardConfig
from pipeline.stages.decode import DecodeStage
from pipeline.stages.read import ReadStage, plan_shards
from pipeline.stages.shard import ShardStage

PER_SHARD = 4
TAR_SAFE = re.compile(r"^[0-9A-Za-z_-]+$")
BIG_CAPTION = "".join(chr(0x41 + i % 26) for i in range(1 << 20))  # 1 MiB of ASCII
LONG_URL = "http://127.0.0.1/" + "a" * 100_000
QUOTY = 'he said "hi", then\nleft\tquickly; \'single\' \\ back'
NUL = "a\x00b\x00"
SEPARATORS = "line\u2028sep\u0085nel\x0cff\x1crs"  # str.splitlines would cut at each of these
REPLACED = "invalid UTF-8 in column 'caption' replaced with U+FFFD"


@dataclass(frozen=True)
class Want:
    """What the read stage must emit for one input row."""

    status: str
    url: str | None = None
    caption: str | None = None
    error: str | None = None  # substring of the row's error, when set


def _read(path: Path, fmt: str, **kw: Any) -> pa.Table:
    cfg = ReadConfig(url_list=str(path), input_format=fmt, **kw)
    shards = plan_shards(cfg, PER_SHARD)
    stage = ReadStage(cfg=cfg, number_sample_per_shard=PER_SHARD)
    tables = [stage.process_batch(pa.Table.from_pylist([d.as_row()])) for d in shards]
    return pa.concat_tables(tables) if tables else None  # type: ignore[return-value]


def _check_rows(table: pa.Table, wants: list[Want]) -> None:
    rows = table.to_pylist()
    assert len(rows) == len(wants), [r[S.STATUS] for r in rows]
    keys = [r[S.KEY] for r in rows]
    assert len(set(keys)) == len(keys)
    assert all(TAR_SAFE.match(k) for k in keys)
    for i, (row, want) in enumerate(zip(rows, wants, strict=True)):
        assert row[S.STATUS] == want.status, (i, row[S.STATUS], row[S.ERROR])
        if want.status == S.OK:
            assert row[S.URL] == want.url, i
            assert row[S.CAPTION] == want.caption, i
        else:
            assert row[S.STATUS] in S.READ_STATUSES
            assert row[S.URL] is None
        if want.error is None and want.status == S.OK:
            assert row[S.ERROR] is None, (i, row[S.ERROR])
        elif want.error is None:
            assert row[S.ERROR], i  # every failure names its reason
        else:
            assert want.error in (row[S.ERROR] or ""), (i, row[S.ERROR])


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (10, 200, 30)).save(buf, "JPEG")
    return buf.getvalue()


def _through_decode_and_shard(table: pa.Table, out_dir: Path) -> None:
    """Decode (without and with image bytes), then ShardStage writes every shard to
    ``out_dir``; check the committed tar and parquet."""
    n = table.num_rows
    read_status = table.column(S.STATUS).to_pylist()
    cfg = DecodeConfig(image_size=16)

    # No image column at all: failures keep their reason, ok rows become "no image bytes".
    no_image = DecodeStage(cfg=cfg).process_batch(table)
    assert no_image.num_rows == n
    assert no_image.column(S.KEY).to_pylist() == table.column(S.KEY).to_pylist()
    for before, after, err in zip(
        read_status, no_image.column(S.STATUS).to_pylist(), no_image.column(S.ERROR).to_pylist(), strict=True
    ):
        assert after == (before if before != S.OK else "decode_error")
        assert err
    assert no_image.column(S.IMAGE).null_count == n

    # Every ok row "downloaded" one small JPEG: all of them are stored.
    jpg = _jpeg()
    with_bytes = table.append_column(
        S.IMAGE_BYTES, pa.array([jpg if s == S.OK else None for s in read_status], pa.binary())
    )
    decoded = DecodeStage(cfg=cfg).process_batch(with_bytes)
    assert decoded.column(S.STATUS).to_pylist() == read_status
    stage = ShardStage(cfg=ShardConfig(output_folder=str(out_dir)))
    stage.setup()
    shard_ids = sorted(set(decoded.column(S.SHARD_ID).to_pylist()))
    # One shard per call, as the schedulers deliver them.
    flowed = pa.concat_tables(
        [stage.process_batch(decoded.filter(pc.equal(decoded.column(S.SHARD_ID), sid))) for sid in shard_ids],
        promote_options="permissive",
    )
    assert flowed.column(S.KEY).to_pylist() == table.column(S.KEY).to_pylist()
    assert sorted(p.name for p in out_dir.glob("*.manifest.json")) == [f"{S.shard_name(s)}.manifest.json" for s in shard_ids]
    for sid in shard_ids:
        part = decoded.filter(pc.equal(decoded.column(S.SHARD_ID), sid))
        name = S.shard_name(sid)
        shard_rows = pq.read_table(out_dir / f"{name}.parquet").to_pylist()
        assert [r[S.KEY] for r in shard_rows] == part.column(S.KEY).to_pylist()
        assert [r[S.STATUS] for r in shard_rows] == part.column(S.STATUS).to_pylist()
        assert [r[S.CAPTION] for r in shard_rows] == part.column(S.CAPTION).to_pylist()
        with tarfile.open(out_dir / f"{name}.tar") as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]
        ok_rows = [r for r in part.to_pylist() if r[S.STATUS] == S.OK]
        assert len(members) == 3 * len(ok_rows)
        for r in ok_rows:
            assert members[f"{r[S.KEY]}.txt"] == (r[S.CAPTION] or "").encode("utf-8")
            meta = json.loads(members[f"{r[S.KEY]}.json"])
            assert meta["caption"] == r[S.CAPTION] and meta["url"] == r[S.URL]
            assert members[f"{r[S.KEY]}.jpg"] == r[S.IMAGE]


def _delimited(delim: str, crlf: bool, bom: bool) -> tuple[bytes, list[Want]]:
    """A csv/tsv file of hostile rows written by hand (the writer's quoting is what is tested)."""

    def field(s: str) -> str:
        if any(c in s for c in f'"{delim}\r\n'):
            return '"' + s.replace('"', '""') + '"'
        return s

    nl = "\r\n" if crlf else "\n"
    lines: list[bytes] = []
    wants: list[Want] = []

    def row(url: str, caption: str, want: Want) -> None:
        lines.append(f"{field(url)}{delim}{field(caption)}{delim}x".encode())
        wants.append(want)

    lines.append(f"url{delim}caption{delim}extra".encode())
    row("http://127.0.0.1/a.jpg", "plain", Want(S.OK, "http://127.0.0.1/a.jpg", "plain"))
    row("", "no url", Want("missing_url", error="empty"))
    row("   ", "blank url", Want("missing_url"))
    row("http://127.0.0.1/b.jpg", BIG_CAPTION, Want(S.OK, "http://127.0.0.1/b.jpg", BIG_CAPTION))
    row("http://127.0.0.1/c.jpg", NUL, Want(S.OK, "http://127.0.0.1/c.jpg", NUL))
    row("http://127.0.0.1/d.jpg", QUOTY, Want(S.OK, "http://127.0.0.1/d.jpg", QUOTY))
    row("http://127.0.0.1/a.jpg", "plain", Want(S.OK, "http://127.0.0.1/a.jpg", "plain"))  # duplicate
    row(LONG_URL, "long", Want(S.OK, LONG_URL, "long"))
    row(" http://127.0.0.1/a b\x01c ", "ctl", Want(S.OK, "http://127.0.0.1/a b\x01c", "ctl"))
    row("http://127.0.0.1/e.jpg", SEPARATORS, Want(S.OK, "http://127.0.0.1/e.jpg", SEPARATORS))
    # Invalid UTF-8 in the caption: replaced, the row stays ok and says so.
    lines.append(b"http://127.0.0.1/f.jpg" + delim.encode() + b"caf\xe9 \xff\xfe!" + delim.encode() + b"x")
    wants.append(Want(S.OK, "http://127.0.0.1/f.jpg", "caf\ufffd \ufffd\ufffd!", REPLACED))
    # Too many and too few fields.
    lines.append(delim.join(["http://127.0.0.1/g.jpg", "c", "x", "surplus"]).encode())
    wants.append(Want("malformed_row", error="4 fields, header has 3"))
    lines.append(b"http://127.0.0.1/h.jpg")
    wants.append(Want("malformed_row", error="1 fields, header has 3"))
    row("http://127.0.0.1/i.jpg", "", Want(S.OK, "http://127.0.0.1/i.jpg", ""))
    data = nl.encode().join(lines) + nl.encode()
    return (b"\xef\xbb\xbf" + data if bom else data), wants


@pytest.mark.parametrize(
    ("fmt", "crlf", "bom"), [("csv", False, False), ("csv", True, True), ("tsv", False, True), ("tsv", True, False)]
)
def test_delimited_hostile_rows(tmp_path: Path, fmt: str, crlf: bool, bom: bool) -> None:
    data, wants = _delimited("," if fmt == "csv" else "\t", crlf, bom)
    path = tmp_path / f"list.{fmt}"
    path.write_bytes(data)
    table = _read(path, fmt)
    _check_rows(table, wants)
    _through_decode_and_shard(table, tmp_path / "out")


def test_jsonl_hostile_rows(tmp_path: Path) -> None:
    def rec(obj: Any) -> bytes:
        return json.dumps(obj, ensure_ascii=False).encode()

    lines = [
        rec({"url": "http://127.0.0.1/a.jpg", "caption": "plain"}),
        rec({"caption": "no url key"}),
        rec({"url": None, "caption": "null url"}),
        rec({"url": "http://127.0.0.1/b.jpg", "caption": BIG_CAPTION}),
        rec({"url": "http://127.0.0.1/c.jpg", "caption": NUL}),
        rec({"url": "http://127.0.0.1/d.jpg", "caption": QUOTY}),
        rec({"url": "http://127.0.0.1/a.jpg", "caption": "plain"}),
        rec({"url": LONG_URL, "caption": 12}),  # non-string caption
        rec({"url": "http://127.0.0.1/e.jpg", "caption": ["x", 1]}),
        rec({"url": "http://127.0.0.1/f.jpg"}),  # no caption key
        rec({"url": 5, "caption": "int url"}),  # wrong type: kept as text, download judges it
        b'{"url": "http://127.0.0.1/g.jpg", "caption": "caf\xe9\xff"}',  # invalid UTF-8 bytes
        b'{"url": "http://127.0.0.1/h.jpg", "caption": "lone \\ud800 surrogate"}',
        rec({"url": "http://127.0.0.1/i.jpg", "caption": SEPARATORS}),  # raw U+2028, U+0085
        b'{"url": "http://127.0.0.1/j.jpg", "caption": ',  # cut-off JSON
        b"[1, 2, 3]",  # JSON but not an object
        b"\x00\x00garbage",
        rec({"url": "http://127.0.0.1/k.jpg", "caption": None}),
    ]
    wants = [
        Want(S.OK, "http://127.0.0.1/a.jpg", "plain"),
        Want("missing_url"),
        Want("missing_url"),
        Want(S.OK, "http://127.0.0.1/b.jpg", BIG_CAPTION),
        Want(S.OK, "http://127.0.0.1/c.jpg", NUL),
        Want(S.OK, "http://127.0.0.1/d.jpg", QUOTY),
        Want(S.OK, "http://127.0.0.1/a.jpg", "plain"),
        Want(S.OK, LONG_URL, "12"),
        Want(S.OK, "http://127.0.0.1/e.jpg", "['x', 1]"),
        Want(S.OK, "http://127.0.0.1/f.jpg", None),
        Want(S.OK, "5", "int url"),
        Want(S.OK, "http://127.0.0.1/g.jpg", "caf\ufffd\ufffd", REPLACED),
        Want(S.OK, "http://127.0.0.1/h.jpg", "lone \ufffd surrogate", REPLACED),
        Want(S.OK, "http://127.0.0.1/i.jpg", SEPARATORS),
        Want("malformed_row", error="line 15"),
        Want("malformed_row", error="not a JSON object"),
        Want("malformed_row", error="line 17"),
        Want(S.OK, "http://127.0.0.1/k.jpg", None),
    ]
    path = tmp_path / "list.jsonl"
    # BOM, CRLF endings and blank lines (not rows) on top of the bad records.
    path.write_bytes(b"\xef\xbb\xbf" + b"\r\n".join(lines[:5]) + b"\r\n\r\n" + b"\n".join(lines[5:]) + b"\n\n")
    for i in range(14, 17):  # line numbers shift by the blank line after record 5
        wants[i] = Want("malformed_row", error=f"line {i + 2}" if i != 15 else "not a JSON object")
    table = _read(path, "jsonl")
    _check_rows(table, wants)
    _through_decode_and_shard(table, tmp_path / "out")


def test_parquet_hostile_rows(tmp_path: Path) -> None:
    bad_utf8 = b"caf\xe9 \xff"
    table = pa.table(
        {
            # url of the wrong type: integers are read as their decimal text.
            "url": pa.array([1, None, 3, 4, 4], pa.int64()),
            # caption stored as binary, one value not UTF-8.
            "caption": pa.array([b"ok", b"x", bad_utf8, NUL.encode(), BIG_CAPTION.encode()], pa.binary()),
        }
    )
    path = tmp_path / "ints.parquet"
    pq.write_table(table, path, row_group_size=2)
    wants = [
        Want(S.OK, "1", "ok"),
        Want("missing_url"),
        Want(S.OK, "3", "caf\ufffd \ufffd", REPLACED),
        Want(S.OK, "4", NUL),
        Want(S.OK, "4", BIG_CAPTION),
    ]
    out = _read(path, "parquet")
    _check_rows(out, wants)
    _through_decode_and_shard(out, tmp_path / "out_ints")

    strings = tmp_path / "strings.parquet"
    pq.write_table(
        pa.table(
            {
                "URL": ["", " ", LONG_URL, "http://127.0.0.1/a b\x00", "http://127.0.0.1/x"],
                "TEXT": [None, "t", QUOTY, SEPARATORS, "\ufeffbom inside"],
            }
        ),
        strings,
    )
    out = _read(strings, "parquet")  # LAION's upper-case names resolve without flags
    _check_rows(
        out,
        [
            Want("missing_url"),
            Want("missing_url"),
            Want(S.OK, LONG_URL, QUOTY),
            Want(S.OK, "http://127.0.0.1/a b\x00", SEPARATORS),
            Want(S.OK, "http://127.0.0.1/x", "\ufeffbom inside"),
        ],
    )
    _through_decode_and_shard(out, tmp_path / "out_strings")


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl", "txt"])
def test_empty_and_header_only_files_add_no_rows(tmp_path: Path, fmt: str) -> None:
    good = tmp_path / f"b.{fmt}"
    header = {"csv": "url,caption\n", "tsv": "url\tcaption\n", "jsonl": "", "txt": ""}[fmt]
    row = {
        "csv": "http://127.0.0.1/a,c\n",
        "tsv": "http://127.0.0.1/a\tc\n",
        "jsonl": '{"url": "http://127.0.0.1/a", "caption": "c"}\n',
        "txt": "http://127.0.0.1/a\n",
    }[fmt]
    good.write_text(header + row)
    (tmp_path / f"a.{fmt}").write_bytes(b"")  # empty file
    (tmp_path / f"c.{fmt}").write_text(header + "\n\n")  # header (if any) and blank lines only
    table = _read(tmp_path / f"*.{fmt}", fmt)
    assert table.column(S.URL).to_pylist() == ["http://127.0.0.1/a"]
    assert table.column(S.STATUS).to_pylist() == [S.OK]


def test_jsonl_file_with_no_parsable_line_is_rows_not_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "junk.jsonl"
    path.write_bytes(b"not json\n\xff\xfe\n[]\n")
    table = _read(path, "jsonl")
    assert table.column(S.STATUS).to_pylist() == ["malformed_row"] * 3
    assert all(table.column(S.ERROR).to_pylist())
    # A file whose records parse but lack the url column is still a configuration error.
    ok = tmp_path / "ok.jsonl"
    ok.write_text('{"link": "http://127.0.0.1/a"}\n')
    with pytest.raises(ConfigError, match="url_col"):
        plan_shards(ReadConfig(url_list=str(ok), input_format="jsonl"), PER_SHARD)


def test_csv_repeated_header_name_keeps_rows_aligned(tmp_path: Path) -> None:
    path = tmp_path / "dup.csv"
    path.write_text("url,caption,caption\nhttp://127.0.0.1/1,one,uno\nhttp://127.0.0.1/2,two,dos\n")
    table = _read(path, "csv")
    assert table.column(S.URL).to_pylist() == ["http://127.0.0.1/1", "http://127.0.0.1/2"]
    assert table.column(S.CAPTION).to_pylist() == ["one", "two"]
