"""The global pass: after the stream, dedup and the final decisions over every shard's
embeddings file at once (exact and semantic duplicates across shards, and against an earlier
run's output), written back only where a decision changed.

The write stage already stored each row's decisions that need no other shard
(pipeline/decisions.py ``first_decisions``), so on a first run only the files holding a
duplicate are rewritten, and re-running a finished job rewrites nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import schema as S
from pipeline.config import ConfigError, JobConfig, StorageConfig
from pipeline.decisions import DECISION_COLUMNS, decide, kept_rows
from pipeline.storage import Storage, filesystem_for
from pipeline.thumbnails import ThumbFile


def _read_parquet(uri: str, storage: StorageConfig, columns: list[str] | None = None) -> pa.Table:
    """One Parquet file's ``columns`` (those it has, when ``columns`` names more; every column
    when None), from one open of the file: its footer gives both the schema and the column
    chunks to fetch (on S3, one request fewer per file than reading the schema first)."""
    fs, path = filesystem_for(uri, storage)
    with fs.open_input_file(path) as f:
        pf = pq.ParquetFile(f, pre_buffer=True)
        if columns is not None:
            have = set(pf.schema_arrow.names)
            columns = [c for c in columns if c in have]
        return pf.read(columns=columns)


def read_previous(against: str, storage: StorageConfig) -> pa.Table:
    """The rows an earlier run kept, for ``dedup.against``: its ``embeddings/`` folder when
    ``against`` is a job output, else ``against`` itself as a folder of Parquet files."""
    import pyarrow.dataset as pads

    root = against.rstrip("/")
    folder = f"{root}/embeddings"
    if not any(n.endswith(".parquet") for n in Storage(folder, storage).list_names()):
        folder = root
    names = [n for n in Storage(folder, storage).list_names() if n.endswith(".parquet") and not n.startswith(".")]
    if not names:
        raise ConfigError(f"dedup.against: no Parquet files under {against!r} or {folder!r}")
    fs, path = filesystem_for(folder, storage)
    dataset = pads.dataset([f"{path}/{n}" for n in names], format="parquet", filesystem=fs)
    have = dataset.schema.names
    missing = [c for c in (S.KEY, S.IMAGE_EMBEDDING) if c not in have]
    if missing:
        raise ConfigError(f"dedup.against: {against!r} lacks column(s) {missing}")
    cols = [c for c in (S.KEY, S.SHA256, S.IMAGE_EMBEDDING, S.STATUS, S.DUPLICATE_OF, S.KEEP, S.IMAGE_THUMB) if c in have]
    return kept_rows(dataset.to_table(columns=cols))


_DECISION_INPUTS = [
    S.KEY, S.SHARD, S.URL, S.CAPTION, S.STATUS, S.ERROR, S.SHA256, S.CLIP_SCORE, S.IMAGE_EMBEDDING,
    S.UNSAFE_SCORE, S.UNSAFE_CONCEPT, S.UNSAFE_SOURCE, S.MODEL, S.TAKEDOWN, S.IMAGE_THUMB,
]


def _pixel_check(cfg: JobConfig) -> bool:
    return cfg.filter.duplicates and cfg.dedup.pixel_check


def _read_inputs(
    cfg: JobConfig, root: str, shards: list[str], thumbs: ThumbFile | None
) -> tuple[pa.Table, bool]:
    """Every shard's decision inputs, in ``shards`` order, and whether any file had
    thumbnails. With ``thumbs``, each file's thumbnails go to that spill file as the file is
    read and the table has none: a run's thumbnails are 3 KiB a row, more than everything else
    the pass holds for a small model, and the pixel check reads back only the rows in
    candidate pairs."""
    tables = []
    seen = False
    for shard in shards:
        t = _read_parquet(f"{root}/{shard}.parquet", cfg.storage, list(_DECISION_INPUTS))
        seen = seen or S.IMAGE_THUMB in t.column_names
        if thumbs is not None:
            thumbs.append(t.column(S.IMAGE_THUMB) if S.IMAGE_THUMB in t.column_names else pa.nulls(t.num_rows, pa.binary()))
            t = t.drop_columns([c for c in (S.IMAGE_THUMB,) if c in t.column_names])
        tables.append(t)
    table = pa.concat_tables(tables, promote_options="permissive")
    # Decoding pages leaves freed buffers in Arrow's pool (~0.7x the table's size on 100 files
    # of 500 rows); hand them back before dedup allocates its own.
    pa.default_memory_pool().release_unused()
    return table, seen


def global_pass(cfg: JobConfig, shards: list[str], emit: Callable[[str], None]) -> tuple[pa.Table, int]:
    """Dedup and decisions over every shard's embeddings file; rewrites the files whose
    decisions changed (atomically, same names). Returns (the decided rows without embeddings,
    the number of files rewritten)."""
    from pipeline.stages.moderate import resolve_rules
    from pipeline.stages.write import parquet_bytes

    root = cfg.write.output_folder.rstrip("/")
    with ThumbFile() if _pixel_check(cfg) else contextlib.nullcontext() as thumbs:
        table, spilled = _read_inputs(cfg, root, shards, thumbs)
        # Files without a thumbnail column at all: dedup reports the missing column itself.
        spilled = spilled and thumbs is not None
        previous = None
        if cfg.dedup.against and cfg.filter.duplicates:
            previous = read_previous(cfg.dedup.against, cfg.storage)
            emit(f"  dedup against {cfg.dedup.against}: {previous.num_rows} kept rows")
        rules = resolve_rules(cfg.moderate, cfg.storage) if cfg.moderate.enabled else None
        decided = decide(
            table, cfg.filter, cfg.dedup, rules, previous, progress=emit,
            thumbs=thumbs if spilled else None,
        )  # fmt: skip
    decided = decided.drop_columns([c for c in (S.IMAGE_EMBEDDING, S.IMAGE_THUMB) if c in decided.column_names])

    rewritten = 0
    out = Storage(root, cfg.storage)
    shard_col = decided.column(S.SHARD).to_pylist()
    by_shard: dict[str, list[int]] = {}
    for i, s in enumerate(shard_col):
        by_shard.setdefault(s, []).append(i)
    for shard in shards:
        uri = f"{root}/{shard}.parquet"
        old = _read_parquet(uri, cfg.storage)
        mine = decided.take(pa.array(by_shard.get(shard, []), pa.int64())).sort_by(S.KEY)
        new = old.sort_by(S.KEY)  # the write stage stores rows sorted by key already
        if new.column(S.KEY).to_pylist() != mine.column(S.KEY).to_pylist():
            raise RuntimeError(f"{uri}: its keys changed while the global pass ran")
        for name in DECISION_COLUMNS:
            arr = mine.column(name)
            if name in new.column_names:
                arr = arr.cast(new.schema.field(name).type)
                new = new.set_column(new.column_names.index(name), name, arr)
            else:
                new = new.append_column(name, arr)
        if not new.equals(old):
            out.write_atomic(f"{shard}.parquet", parquet_bytes(new, cfg.write))
            rewritten += 1
    return decided, rewritten


__all__ = ["global_pass", "read_previous"]
