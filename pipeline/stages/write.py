"""Write the embedded rows as Parquet, one file per input shard: ``<output>/<shard>.parquet``.

The name comes from the shard, so re-running a shard replaces its file instead of adding a
second copy. Files go through pyarrow's filesystem for the URI (``pipeline.storage``: S3
endpoint, region and retries from the config or the standard AWS variables). A file appears
whole or not at all: locally it is written under a temporary name and renamed; on S3 the
object only exists once its upload completes.

Columns: ``schema.output_fields(D)`` in order, then every other column the rows carry
(passthrough input columns, debug columns), minus working columns (pixels, tokens, image
bytes, shard bookkeeping). Embeddings are ``fixed_size_list<float16>[D]``; zstd; row groups
of ``row_group_rows``.

A shard must be written once, whole. Batches after the embed stage hold ``rows_per_call`` rows,
so a shard usually arrives in parts: the stage keeps parts until it has the row count the
shard's manifest records (the shard stage committed it before these rows left it), then
writes. One actor therefore writes all files (Parquet encoding is cheap next to embedding).
"""

from __future__ import annotations

import io
import logging
import uuid
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import schema as S
from pipeline.config import StorageConfig, WriteConfig
from pipeline.stages.base import Stage
from pipeline.storage import Storage, filesystem_for, is_s3

log = logging.getLogger("clipcurate.write")

# Columns that only carry work between stages.
INTERNAL_COLUMNS = frozenset(
    {S.PIXELS, S.TOKENS, S.IMAGE, S.IMAGE_BYTES, S.SHARD_ROWS, S.SHARD_STARTED, S.SHARD_ID}
)


def output_table(rows: pa.Table, dim: int) -> pa.Table:
    """``rows`` conformed to the output schema: fixed columns first (cast, or null when the
    rows lack them), then the other non-internal, non-binary columns; sorted by key."""
    n = rows.num_rows
    cols: dict[str, pa.Array | pa.ChunkedArray] = {}
    fields = []
    for f in S.output_fields(dim):
        if f.name in rows.column_names:
            cols[f.name] = rows.column(f.name).cast(f.type)
        elif f.name == S.KEEP:
            cols[f.name] = pc.fill_null(pc.equal(rows.column(S.STATUS), S.OK), False)
        elif f.name == S.DROP_REASON:
            st = rows.column(S.STATUS).to_pylist()
            cols[f.name] = pa.array([None if s == S.OK else f"status:{s}" for s in st], f.type)
        else:
            cols[f.name] = pa.nulls(n, f.type)
        fields.append(f)
    for name in rows.column_names:
        if name in cols or name in INTERNAL_COLUMNS:
            continue
        t = rows.schema.field(name).type
        if pa.types.is_binary(t) or pa.types.is_large_binary(t):
            continue
        cols[name] = rows.column(name)
        fields.append(pa.field(name, t))
    table = pa.table(list(cols.values()), schema=pa.schema(fields))
    return table.sort_by(S.KEY)


def write_parquet(table: pa.Table, uri: str, cfg: WriteConfig, storage: StorageConfig) -> int:
    """Write ``table`` to ``uri`` (local path or ``s3://``) atomically; returns the file size."""
    buf = io.BytesIO()
    pq.write_table(
        table,
        buf,
        row_group_size=cfg.row_group_rows,
        compression=None if cfg.compression == "none" else cfg.compression,
        compression_level=cfg.compression_level,
    )
    data = buf.getvalue()
    fs, path = filesystem_for(uri, storage)
    parent = path.rsplit("/", 1)[0]
    if is_s3(uri):
        # The object becomes visible only when the upload completes: no partial file.
        with fs.open_output_stream(path) as f:
            f.write(data)
        return len(data)
    fs.create_dir(parent, recursive=True)
    tmp = f"{parent}/.{path.rsplit('/', 1)[1]}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with fs.open_output_stream(tmp) as f:
            f.write(data)
        fs.move(tmp, path)
    except BaseException:
        try:
            fs.delete_file(tmp)
        except OSError:
            pass
        raise
    return len(data)


@dataclass
class WriteStage(Stage):
    """Writes ``<shard>.parquet`` per shard once all its rows arrived; rows flow on without
    their embeddings (the driver only counts them).

    ``shard_folder``: where the shard manifests are (they give each shard's row count);
    ``dim``: embedding size (fixes the schema even for a shard where no row has an embedding).
    """

    cfg: WriteConfig = field(default_factory=WriteConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    shard_folder: str = ""
    dim: int = 0

    def __post_init__(self) -> None:
        self._pending: dict[str, list[pa.Table]] = {}
        self._expected: dict[str, int] = {}
        self._shards: Storage | None = None
        self._ready = False
        self.files_written: list[str] = []

    def __getstate__(self) -> dict[str, Any]:
        # Travels to the actor without held rows or clients.
        return {**self.__dict__, "_pending": {}, "_expected": {}, "_shards": None, "_ready": False}

    def setup(self) -> None:
        self._shards = Storage(self.shard_folder, self.storage) if self.shard_folder else None
        self._ready = True

    def _rows_of(self, shard: str, have: int) -> int:
        if shard not in self._expected:
            manifest = self._shards.read_manifest(shard) if self._shards is not None else None
            if manifest is None:
                log.warning("no manifest for shard %s; writing the %d rows at hand", shard, have)
                return have
            self._expected[shard] = int(manifest["count"])
        return self._expected[shard]

    def uri_of(self, shard: str) -> str:
        root = self.cfg.output_folder.rstrip("/")
        return f"{root}/{shard}.parquet"

    def process_batch(self, batch: pa.Table) -> pa.Table:
        if not self._ready:
            self.setup()
        shards = batch.column(S.SHARD).to_pylist()
        for shard in dict.fromkeys(shards):
            part = batch.filter(pc.equal(batch.column(S.SHARD), shard))
            parts = self._pending.pop(shard, []) + [part]
            have = sum(p.num_rows for p in parts)
            if have < self._rows_of(shard, have):
                self._pending[shard] = parts
                continue
            whole = pa.concat_tables(parts, promote_options="permissive") if len(parts) > 1 else part
            table = output_table(whole, self.dim)
            size = write_parquet(table, self.uri_of(shard), self.cfg, self.storage)
            self._expected.pop(shard, None)
            self.files_written.append(shard)
            log.info("wrote %s (%d rows, %d bytes)", self.uri_of(shard), table.num_rows, size)
        drop = [c for c in (S.IMAGE_EMBEDDING, S.TEXT_EMBEDDING, S.PIXELS, S.TOKENS) if c in batch.column_names]
        return batch.drop_columns(drop)

    @property
    def pending_shards(self) -> list[str]:
        """Shards with some rows received and not yet written."""
        return sorted(self._pending)
