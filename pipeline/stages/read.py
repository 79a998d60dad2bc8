"""Read URL lists (parquet / csv / tsv / jsonl / txt; local or ``s3://``; globs) into shards.

Shard assignment is deterministic so that keys are stable across runs and resume works: the
input files are sorted by path, and each file is cut into consecutive chunks of
``number_sample_per_shard`` rows (a file's last chunk may be shorter; shards never span two
files). Shard ids count up over the files in that order.

:func:`plan_shards` runs once on the driver and returns one :class:`ShardDescriptor` per shard;
:class:`ReadStage` turns a batch of descriptors into the shard's rows. Every input row becomes
exactly one output row: a row without a usable URL, or a line that does not parse, gets a
status (``missing_url``, ``malformed_row``) instead of being dropped.

Text files are read as UTF-8 (a leading byte-order mark is skipped; only ``\n`` ends a jsonl or
txt line). Invalid bytes, and lone surrogates from ``\ud800``-style JSON escapes, become U+FFFD;
such a row keeps status ``ok`` and its ``error`` names the repaired column. A file with no rows
(empty, or a header only) adds no shards. csv/tsv fields may be of any length.

``input_format: img2dataset`` reads the per-shard tables of an img2dataset output (or of a
clipcurate output's ``shards/``) as the list, with what the unpack stage needs to take each
row's image from the tar beside its table (pipeline/stages/unpack.py).

LAION's column names work without flags: when ``url_col`` (``caption_col``) is not in a file,
a column with the same name in another case (``URL``, ``TEXT`` for ``caption``) is used.
"""

from __future__ import annotations

import csv
import fnmatch
import io
import json
import logging
import posixpath
import time
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Any, ClassVar

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline import schema as S
from pipeline.config import ConfigError, ReadConfig, StorageConfig
from pipeline.stages.base import Stage
from pipeline.storage import filesystem_for, is_s3

log = logging.getLogger(__name__)

MALFORMED = S.MALFORMED_ROW
MISSING_URL = S.MISSING_URL
# Python's csv module refuses fields over 128 KiB by default; LAION captions can be longer and
# one long field must not fail the whole file.
_CSV_FIELD_LIMIT = 1 << 30

_EXTENSIONS = {
    "parquet": (".parquet",),
    "csv": (".csv",),
    "tsv": (".tsv",),
    "jsonl": (".jsonl", ".json"),
    "txt": (".txt",),
    # An img2dataset output: its per-shard tables (each beside the tar of the same stem).
    "img2dataset": (".parquet",),
}
_PARQUET_TABLES = ("parquet", "img2dataset")
# What an img2dataset output's tables must hold besides url (and caption): the row's key in the
# tar and the tool's status; its message is optional (img2dataset's error_message, a clipcurate
# table's error).
_SOURCE_COLUMNS = {"key": S.SOURCE_KEY, "status": S.SOURCE_STATUS, "error_message": S.SOURCE_ERROR,
                   S.ERROR: S.SOURCE_ERROR}
# Column-name fallbacks for LAION-style lists.
_ALIASES = {"caption": ("text",)}


@dataclass(frozen=True)
class ShardDescriptor:
    """One shard to read: rows ``[start, start + length)`` of input file ``path`` (a URI)."""

    shard_id: int
    path: str
    start: int
    length: int

    def as_row(self) -> dict[str, Any]:
        return asdict(self)


def _has_glob(s: str) -> bool:
    return any(c in s for c in "*?[")


def _to_uri(fs: pafs.FileSystem, path: str, original: str) -> str:
    return f"s3://{path}" if is_s3(original) else path


def list_input_files(url_list: str, input_format: str, storage: StorageConfig | None = None) -> list[str]:
    """Expand a path, a directory or a glob into a sorted list of file URIs.

    A directory yields the files in it whose extension fits ``input_format``. Raises
    ``ConfigError`` when nothing matches, so a typo fails before any work starts.
    """
    fs, path = filesystem_for(url_list, storage)
    if _has_glob(path):
        # Walk from the deepest directory without glob characters.
        parts = path.split("/")
        fixed = []
        for p in parts:
            if _has_glob(p):
                break
            fixed.append(p)
        base = "/".join(fixed) or "/"
        recursive = "**" in path or len(fixed) < len(parts) - 1
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=recursive, allow_not_found=True))
        found = [
            i.path
            for i in infos
            if i.type == pafs.FileType.File and fnmatch.fnmatchcase(i.path, path)
        ]
    else:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.Directory:
            exts = _EXTENSIONS[input_format]
            infos = fs.get_file_info(pafs.FileSelector(path, recursive=False))
            found = [
                i.path
                for i in infos
                if i.type == pafs.FileType.File
                and i.path.endswith(exts)
                and not posixpath.basename(i.path).startswith(".")
            ]
        elif info.type == pafs.FileType.File:
            found = [path]
        else:
            found = []
    if not found:
        raise ConfigError(f"read.url_list: no input files match {url_list!r}")
    return sorted(_to_uri(fs, p, url_list) for p in found)


def _resolve(names: list[str], wanted: str, what: str, path: str) -> str:
    if wanted in names:
        return wanted
    candidates = [wanted.lower(), *_ALIASES.get(wanted.lower(), ())]
    for n in names:
        if n.lower() in candidates:
            return n
    raise ConfigError(f"read.{what}: column {wanted!r} is not in {path} (columns: {names})")


@dataclass
class _Parsed:
    """A text-format input file parsed into columns; ``bad[i]`` is set for unparseable rows."""

    columns: dict[str, list[Any]]
    bad: list[str | None]

    @property
    def num_rows(self) -> int:
        return len(self.bad)


def _read_text(uri: str, storage: StorageConfig | None) -> str:
    # utf-8-sig: a byte-order mark (Excel's CSV export) must not become part of the first
    # column name. surrogateescape: invalid bytes survive parsing as lone surrogates, which
    # read_shard replaces with U+FFFD and records per row (see _clean).
    fs, path = filesystem_for(uri, storage)
    with fs.open_input_stream(path) as f:
        return f.read().decode("utf-8-sig", errors="surrogateescape")


def _clean(s: str) -> tuple[str, bool]:
    """``s`` with lone surrogates (invalid UTF-8 bytes of a text file, or ``\\ud800``-style
    JSON escapes) replaced by U+FFFD, and whether any were; Arrow and tar members need valid
    UTF-8."""
    try:
        s.encode("utf-8")
        return s, False
    except UnicodeEncodeError:
        return "".join("\ufffd" if "\ud800" <= c <= "\udfff" else c for c in s), True


def _parse_delimited(text: str, delimiter: str) -> _Parsed:
    if csv.field_size_limit() < _CSV_FIELD_LIMIT:
        csv.field_size_limit(_CSV_FIELD_LIMIT)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = next(reader)
    except StopIteration:
        return _Parsed({}, [])
    # A repeated header name keeps its first column; appending to it twice per row would
    # shift every later row of that column.
    first: dict[str, int] = {}
    for i, h in enumerate(header):
        first.setdefault(h, i)
    columns: dict[str, list[Any]] = {h: [] for h in first}
    bad: list[str | None] = []
    for row in reader:
        if not row:  # a blank line is not a row
            continue
        ok = len(row) == len(header)
        for h, i in first.items():
            columns[h].append(row[i] if ok else None)
        # reader.line_num: a quoted field may span lines, so count physical lines.
        bad.append(None if ok else f"line {reader.line_num}: {len(row)} fields, header has {len(header)}")
    return _Parsed(columns, bad)


def _parse_jsonl(text: str) -> _Parsed:
    records: list[dict[str, Any] | None] = []
    bad: list[str | None] = []
    # Split on "\n" only: str.splitlines also breaks at U+2028, U+0085 and other characters
    # that JSON allows unescaped inside strings, which would cut one record in two.
    for line_no, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict):
                raise ValueError("not a JSON object")
            records.append(rec)
            bad.append(None)
        except ValueError as e:
            records.append(None)
            bad.append(f"line {line_no}: {e}"[:200])
    names: list[str] = []
    for rec in records:
        for k in rec or ():
            if k not in names:
                names.append(k)
    columns = {n: [rec.get(n) if rec else None for rec in records] for n in names}
    return _Parsed(columns, bad)


def _parse_txt(text: str) -> _Parsed:
    lines = text.split("\n")
    while lines and not lines[-1].strip():
        lines.pop()
    return _Parsed({"url": [ln.strip() or None for ln in lines]}, [None] * len(lines))


@lru_cache(maxsize=2)
def _parse_file(uri: str, input_format: str, storage: StorageConfig | None) -> _Parsed:
    # Cached because consecutive shards of one file usually land in the same worker.
    text = _read_text(uri, storage)
    if input_format == "csv":
        return _parse_delimited(text, ",")
    if input_format == "tsv":
        return _parse_delimited(text, "\t")
    if input_format == "jsonl":
        return _parse_jsonl(text)
    if input_format == "txt":
        return _parse_txt(text)
    raise ValueError(f"not a text format: {input_format}")


def _column_names(uri: str, cfg: ReadConfig, storage: StorageConfig | None) -> tuple[list[str], int, bool]:
    """Column names, row count, and whether the names can be checked: not when every line of
    a text file failed to parse (the rows are recorded as malformed instead)."""
    if cfg.input_format in _PARQUET_TABLES:
        fs, path = filesystem_for(uri, storage)
        with fs.open_input_file(path) as f:
            meta = pq.ParquetFile(f).metadata
            return list(meta.schema.to_arrow_schema().names), meta.num_rows, True
    parsed = _parse_file(uri, cfg.input_format, storage)
    all_bad = parsed.num_rows > 0 and all(b is not None for b in parsed.bad)
    return list(parsed.columns), parsed.num_rows, not all_bad


@dataclass(frozen=True)
class _Columns:
    url: str
    caption: str | None
    extra: tuple[str, ...]


def _resolve_columns(names: list[str], cfg: ReadConfig, uri: str, strict: bool = True) -> _Columns:
    if cfg.input_format == "txt":
        return _Columns("url", None, ())

    def res(wanted: str, what: str) -> str:
        try:
            return _resolve(names, wanted, what, uri)
        except ConfigError:
            if strict:
                raise
            return wanted

    url = res(cfg.url_col, "url_col")
    caption = res(cfg.caption_col, "caption_col") if cfg.caption_col else None
    extra = tuple(res(c, "save_additional_columns") for c in cfg.save_additional_columns)
    if cfg.input_format == "img2dataset":
        lacking = [c for c in ("key", "status") if c not in names]
        if lacking:
            raise ConfigError(
                f"read.input_format: img2dataset reads an img2dataset output's shard tables, but "
                f"{uri} has no {' or '.join(repr(c) for c in lacking)} column (columns: {names})"
            )
    return _Columns(url, caption, extra)


def plan_shards(
    cfg: ReadConfig, number_sample_per_shard: int, storage: StorageConfig | None = None
) -> list[ShardDescriptor]:
    """List the input files and cut them into shards; checks that the named columns exist.

    Raises ``ConfigError`` (naming the field) for missing files or columns.
    """
    shards: list[ShardDescriptor] = []
    next_id = 0
    split = 0
    for uri in list_input_files(cfg.url_list, cfg.input_format, storage):
        names, num_rows, checkable = _column_names(uri, cfg, storage)
        if num_rows == 0:
            continue  # an empty or header-only file has no rows to account for
        _resolve_columns(names, cfg, uri, checkable)
        split += cfg.input_format == "img2dataset" and num_rows > number_sample_per_shard
        for start in range(0, num_rows, number_sample_per_shard):
            length = min(number_sample_per_shard, num_rows - start)
            shards.append(ShardDescriptor(next_id, uri, start, length))
            next_id += 1
    if split:
        # Each shard streams its source tar up to its last image: k shards of one tar read it
        # about (k + 1) / 2 times over.
        log.warning("%d img2dataset shard(s) hold more rows than shard.number_sample_per_shard=%d, so "
                    "their tars are read more than once; set it to the source's shard size "
                    "(img2dataset's default: 10000) to read each once", split, number_sample_per_shard)
    return shards


def _as_str(v: Any) -> str | None:
    if v is None:
        return None
    if isinstance(v, str):
        return v
    if isinstance(v, bytes):
        return v.decode("utf-8", errors="surrogateescape")
    if isinstance(v, float) and v != v:  # NaN from pandas-written files
        return None
    return str(v)


def _array(values: list[Any]) -> pa.Array:
    values = [_clean(v)[0] if isinstance(v, str) else v for v in values]
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        # Mixed types in a JSON column: keep them as JSON text rather than fail the shard.
        return pa.array([None if v is None else json.dumps(v) for v in values], pa.string())


def read_shard(
    desc: ShardDescriptor,
    cfg: ReadConfig,
    number_sample_per_shard: int,
    storage: StorageConfig | None = None,
) -> pa.Table:
    """The rows of one shard: key, shard_id, url, caption, status, error, bookkeeping and
    passthrough columns (names in :mod:`pipeline.schema`)."""
    names, _, checkable = _column_names(desc.path, cfg, storage)
    cols = _resolve_columns(names, cfg, desc.path, checkable)
    wanted = [cols.url] + ([cols.caption] if cols.caption else []) + list(cols.extra)
    wanted = list(dict.fromkeys(wanted))
    bad: list[str | None]
    source: dict[str, pa.Array] = {}
    if cfg.input_format in _PARQUET_TABLES:
        fs, path = filesystem_for(desc.path, storage)
        with fs.open_input_file(path) as f:
            pf = pq.ParquetFile(f)
            if cfg.input_format == "img2dataset":
                table, source = _read_source_table(pf, wanted, desc)
            else:
                table = _read_parquet_rows(pf, wanted, desc.start, desc.length)
        data = {n: table.column(n) for n in wanted}
        bad = [None] * desc.length
    else:
        parsed = _parse_file(desc.path, cfg.input_format, storage)
        stop = desc.start + desc.length
        absent = [None] * parsed.num_rows  # only when no line of the file parsed
        data = {n: parsed.columns.get(n, absent)[desc.start : stop] for n in wanted}
        bad = parsed.bad[desc.start : stop]

    def pylist(name: str) -> list[Any]:
        col = data[name]
        return col.to_pylist() if isinstance(col, pa.ChunkedArray | pa.Array) else list(col)

    urls = [_as_str(u) for u in pylist(cols.url)]
    urls = [u.strip() if u is not None else None for u in urls]
    captions = [_as_str(c) for c in pylist(cols.caption)] if cols.caption else [None] * desc.length
    # Invalid UTF-8 is replaced, not fatal; an ok row says which of its fields were repaired.
    repaired: list[list[str]] = [[] for _ in range(desc.length)]
    for name, values in ((cols.url, urls), (cols.caption, captions)):
        for i, v in enumerate(values):
            if v is not None:
                values[i], changed = _clean(v)
                if changed:
                    repaired[i].append(repr(name))
    statuses: list[str] = []
    errors: list[str | None] = []
    for i in range(desc.length):
        if bad[i] is not None:
            statuses.append(MALFORMED)
            errors.append(bad[i])
            urls[i] = None
        elif not urls[i]:
            statuses.append(MISSING_URL)
            errors.append(f"column {cols.url!r} is empty")
            urls[i] = None
        else:
            statuses.append(S.OK)
            errors.append(
                f"invalid UTF-8 in column {' and '.join(repaired[i])} replaced with U+FFFD"
                if repaired[i]
                else None
            )
    n = number_sample_per_shard
    out: dict[str, Any] = {
        S.KEY: pa.array([S.make_key(desc.shard_id, i, n) for i in range(desc.length)], pa.string()),
        S.SHARD_ID: pa.array([desc.shard_id] * desc.length, pa.int64()),
        S.URL: pa.array(urls, pa.string()),
        S.CAPTION: pa.array(captions, pa.string()),
        S.STATUS: pa.array(statuses, pa.string()),
        S.ERROR: pa.array(errors, pa.string()),
        S.SHARD_ROWS: pa.array([desc.length] * desc.length, pa.int64()),
        S.SHARD_STARTED: pa.array([time.time()] * desc.length, pa.float64()),
    }
    for name, extra in zip(cfg.save_additional_columns, cols.extra, strict=True):
        if name in out:
            continue
        col = data[extra]
        out[name] = col if isinstance(col, pa.ChunkedArray | pa.Array) else _array(col)
    for name, col in source.items():
        out.setdefault(name, col)
    return pa.table(out)


def _read_source_table(pf: pq.ParquetFile, wanted: list[str], desc: ShardDescriptor) -> tuple[pa.Table, dict[str, pa.Array]]:
    """The ``wanted`` columns of an img2dataset shard table's rows of ``desc``, and what the
    unpack stage needs of them (``source_key``, ``_source_*``)."""
    names = pf.schema_arrow.names
    have = [c for c in _SOURCE_COLUMNS if c in names]
    # img2dataset's sha256 is of the download; a clipcurate table's is of the stored copy, and
    # its source_sha256 of the download.
    original = next((c for c in (S.SOURCE_SHA256, S.SHA256) if c in names), None)
    sizes = [c for c in (S.ORIGINAL_WIDTH, S.ORIGINAL_HEIGHT) if c in names]
    extra = [*have, *([original] if original else []), *sizes]
    table = _read_parquet_rows(pf, list(dict.fromkeys([*wanted, *extra])), desc.start, desc.length)
    source: dict[str, pa.Array] = {}
    for c in have:  # the first of error_message / error names the message
        source.setdefault(_SOURCE_COLUMNS[c], table.column(c).cast(pa.string()))
    if original:
        source[S.SOURCE_ORIGINAL_SHA256] = table.column(original).cast(pa.string())
    if len(sizes) == 2:
        source[S.SOURCE_ORIGINAL_WIDTH] = table.column(S.ORIGINAL_WIDTH).cast(pa.int64())
        source[S.SOURCE_ORIGINAL_HEIGHT] = table.column(S.ORIGINAL_HEIGHT).cast(pa.int64())
    source[S.SOURCE_TAR] = pa.array([_tar_of(desc.path)] * desc.length, pa.string())
    return table, source


def _tar_of(table_uri: str) -> str:
    """The tar beside an img2dataset shard table: ``.../00012.parquet -> .../00012.tar``."""
    return table_uri[: -len(".parquet")] + ".tar"


def _read_parquet_rows(pf: pq.ParquetFile, columns: list[str], start: int, length: int) -> pa.Table:
    # Read only the row groups that overlap [start, start + length).
    groups: list[int] = []
    first_row = None
    offset = 0
    for g in range(pf.metadata.num_row_groups):
        rows = pf.metadata.row_group(g).num_rows
        if offset + rows > start and offset < start + length:
            groups.append(g)
            if first_row is None:
                first_row = offset
        offset += rows
    if not groups:
        return pf.schema_arrow.empty_table().select(columns)
    table = pf.read_row_groups(groups, columns=columns)
    return table.slice(start - (first_row or 0), length)


@dataclass
class ReadStage(Stage):
    """Descriptors (columns of :class:`ShardDescriptor`) in, the shards' rows out.

    This is the one stage that changes the row count: one descriptor row becomes
    ``length`` input rows. Give it one descriptor per batch so each shard is one block.
    """

    io_bound: ClassVar[bool] = True  # reads an input file, often from S3
    expands: ClassVar[bool] = True

    cfg: ReadConfig = field(default_factory=ReadConfig)
    number_sample_per_shard: int = 1000
    storage: StorageConfig = field(default_factory=StorageConfig)

    def process_batch(self, batch: pa.Table) -> pa.Table:
        tables = [
            read_shard(ShardDescriptor(**row), self.cfg, self.number_sample_per_shard, self.storage)
            for row in batch.to_pylist()
        ]
        return pa.concat_tables(tables) if len(tables) != 1 else tables[0]
