"""Shard stage: write each shard (tar + parquet + stats + manifest, pipeline/shard_format.py),
committed atomically, by the task that downloaded and decoded it.

A shard is written once, whole: the schedulers hand the stage one shard's rows per call (the
read stage emits a shard as one batch and nothing in the fused task splits it). Many tasks
write many shards at once; no single process writes them all.

The rows flow on in key order with the shard's final statuses (a row that reached this stage
``ok`` without an image is recorded as ``decode_error``), a ``shard`` column, and without
their image bytes: the model's input (``_pixels``) made by the decode stage goes on, the
stored copy stays in the tar.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa

from pipeline import schema as S
from pipeline.config import ShardConfig, StorageConfig
from pipeline.shard_format import build_shard, commit_shard
from pipeline.stages.base import Resources, Stage, per_process
from pipeline.storage import Storage


@dataclass
class ShardStage(Stage):
    """Writes the batch's shard; rows flow on without image bytes and with a ``shard`` column."""

    resources: Resources = field(default_factory=lambda: Resources(num_cpus=0))
    cfg: ShardConfig = field(default_factory=ShardConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    passthrough: tuple[str, ...] = ()

    def _store(self) -> Storage:
        return per_process(("shard-storage", self.cfg.output_folder, self.storage),
                           lambda: Storage(self.cfg.output_folder, self.storage))

    def process_batch(self, batch: pa.Table) -> pa.Table:
        if batch.num_rows == 0:
            return S.set_column(batch, S.SHARD, pa.array([], pa.string()))
        ids = set(batch.column(S.SHARD_ID).to_pylist())
        expected = set(S.column_list(batch, S.SHARD_ROWS))
        if len(ids) != 1 or len(expected) != 1 or (expected != {None} and expected != {batch.num_rows}):
            # A shard written from part of its rows would be committed incomplete: that is a
            # scheduler bug, never a property of the data.
            raise RuntimeError(
                f"shard stage needs one whole shard per batch, got shard ids {sorted(ids)} "
                f"with {batch.num_rows} rows (expected {sorted(expected, key=str)})"
            )
        (sid,) = ids
        files = build_shard(sid, batch, self.passthrough)
        commit_shard(self._store(), files)
        rows = batch.sort_by(S.KEY)
        rows = S.set_column(rows, S.STATUS, files.table.column(S.STATUS))
        rows = S.set_column(rows, S.ERROR, files.table.column(S.ERROR))
        rows = S.drop_if_present(rows, [S.IMAGE, S.IMAGE_BYTES, S.SHARD_STARTED])
        return S.set_column(rows, S.SHARD, pa.array([files.name] * rows.num_rows, pa.string()))
