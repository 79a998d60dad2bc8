"""Write stage: each shard's embedded rows as ``<output>/embeddings/<shard>.parquet``, complete
the first time.

The name comes from the shard, so re-running a shard replaces its file instead of adding a
second copy, and the file appears whole or not at all (:meth:`Storage.write_atomic`). Many
tasks write many shards at once; the schedulers hand the stage one whole shard per call.

Columns: ``schema.output_fields(D)`` in order, then every other column the rows carry
(passthrough input columns, debug columns), minus working columns. The decision columns are
filled here by pipeline/decisions.py with everything that does not need the other shards
(status, takedowns, moderation, clip_score; no duplicates yet), so after the global pass
only files where dedup changed a decision are rewritten.

Rows flow on as ``key``, ``shard``, ``status``, ``keep`` (for progress and counts). Should
a batch ever hold only part of a shard (a scheduler that split it), nothing is written and
the rows flow on whole with ``_unwritten`` set, for the driver to write once it has them all.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import schema as S
from pipeline.config import FilterConfig, StorageConfig, WriteConfig
from pipeline.stages.base import Resources, Stage, per_process
from pipeline.storage import Storage, write_file

log = logging.getLogger("clipcurate.write")

# Columns that only carry work between stages.
INTERNAL_COLUMNS = frozenset(
    {S.PIXELS, S.JPEG, S.TOKENS, S.IMAGE, S.IMAGE_BYTES, S.SHARD_ROWS, S.SHARD_STARTED, S.SHARD_ID, S.UNWRITTEN}
)
# What flows on to the driver after a shard is written.
SUMMARY_COLUMNS = (S.KEY, S.SHARD, S.STATUS, S.KEEP)


def output_table(rows: pa.Table, dim: int, filters: FilterConfig | None = None, rules: Any = None) -> pa.Table:
    """``rows`` conformed to the output schema: fixed columns first (cast, or null when the
    rows lack them), then the other non-internal, non-binary columns; sorted by key. With
    ``filters``, ``keep``/``drop_reason`` are the decisions that need no other shard
    (:func:`pipeline.decisions.first_decisions`); ``rules``: the moderation rules, for the
    thresholds in unsafe reasons."""
    from pipeline.decisions import first_decisions

    if filters is not None:
        rows = first_decisions(rows, filters, rules)
    n = rows.num_rows
    cols: list[pa.Array | pa.ChunkedArray] = []
    fields = []
    for f in S.output_fields(dim):
        if f.name in rows.column_names:
            cols.append(rows.column(f.name).cast(f.type))
        else:
            cols.append(pa.nulls(n, f.type))
        fields.append(f)
    fixed = {f.name for f in fields}
    for name in rows.column_names:
        if name in fixed or name in INTERNAL_COLUMNS:
            continue
        t = rows.schema.field(name).type
        if pa.types.is_binary(t) or pa.types.is_large_binary(t):
            continue
        cols.append(rows.column(name))
        fields.append(pa.field(name, t))
    table = pa.table(cols, schema=pa.schema(fields))
    return table.sort_by(S.KEY)


def parquet_bytes(table: pa.Table, cfg: WriteConfig) -> bytes:
    """``table`` as a Parquet file (zstd by default, row groups of ``cfg.row_group_rows``)."""
    buf = io.BytesIO()
    pq.write_table(
        table,
        buf,
        row_group_size=cfg.row_group_rows,
        compression=None if cfg.compression == "none" else cfg.compression,
        compression_level=cfg.compression_level,
    )
    return buf.getvalue()


def write_parquet(table: pa.Table, uri: str, cfg: WriteConfig, storage: StorageConfig) -> int:
    """Write ``table`` to ``uri`` (local path or ``s3://``) atomically; returns the size in
    bytes."""
    data = parquet_bytes(table, cfg)
    write_file(uri, data, storage)
    return len(data)


@dataclass
class WriteStage(Stage):
    """Writes ``<shard>.parquet`` for the batch's shard; ``dim`` is the embedding size (it
    fixes the schema even for a shard where no row has an embedding)."""

    resources: Resources = field(default_factory=lambda: Resources(num_cpus=0.25))
    cfg: WriteConfig = field(default_factory=WriteConfig)
    # One call per shard, a fraction of a second each, every few seconds: as Ray tasks the
    # worker idles between calls and Ray restarts it for most of them (bench/job_cpu.py on a
    # started head: ~2 ms of CPU per row).
    long_lived: ClassVar[bool] = True
    storage: StorageConfig = field(default_factory=StorageConfig)
    filters: FilterConfig = field(default_factory=FilterConfig)
    rules: Any = None
    dim: int = 0

    def _store(self) -> Storage:
        return per_process(("write-storage", self.cfg.output_folder, self.storage),
                           lambda: Storage(self.cfg.output_folder, self.storage))

    def process_batch(self, batch: pa.Table) -> pa.Table:
        if batch.num_rows == 0:
            return batch.select([c for c in SUMMARY_COLUMNS if c in batch.column_names])
        shards = set(batch.column(S.SHARD).to_pylist())
        expected = set(S.column_list(batch, S.SHARD_ROWS))
        if len(shards) != 1 or expected == {None} or expected != {batch.num_rows}:
            log.warning("write stage got part of a shard (%s, %d rows, expected %s); the driver "
                        "writes it", sorted(shards), batch.num_rows, sorted(expected, key=str))
            return S.set_column(batch, S.UNWRITTEN, pa.array([True] * batch.num_rows))
        (shard,) = shards
        table = output_table(batch, self.dim, self.filters, self.rules)
        data = parquet_bytes(table, self.cfg)
        self._store().write_atomic(f"{shard}.parquet", data)
        log.info("wrote %s/%s.parquet (%d rows, %d bytes)", self.cfg.output_folder, shard, table.num_rows, len(data))
        return table.select(list(SUMMARY_COLUMNS))
