"""The wanted content of each file a takedown changes, computed from the current files: a
shard's tar (without the samples), parquet (``takedown`` column) and manifest
(:func:`plan_shard`), and an embeddings file's rows (:func:`mark_embeddings`). Parquet files
are written back with the encoding of the file they replace. Nothing is written here.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import schema as S
from pipeline.config import StorageConfig
from pipeline.shard_format import (
    file_matches,
    filter_tar,
    manifest_bytes,
    manifest_keys,
    manifest_name,
    parquet_name,
    read_manifest,
    rewritten_manifest,
    tar_name,
    tar_sample_keys,
)
from pipeline.storage import Storage, filesystem_for
from pipeline.takedown.match import TakedownError

TAKEDOWN = S.TAKEDOWN  # string column: the takedown reason, null for rows not taken down
REASON_PREFIX = S.REASON_TAKEDOWN


def read_table(store: Storage, rel: str) -> tuple[pa.Table, bytes]:
    data = store.read_bytes(rel)
    return pq.read_table(pa.BufferReader(data)), data


def table_bytes(table: pa.Table, like: bytes) -> bytes:
    """Parquet bytes of ``table``, with the compression and row group size of the file
    ``like`` it replaces (so a takedown does not change a file's encoding)."""
    meta = pq.ParquetFile(pa.BufferReader(like)).metadata
    compression = "snappy"
    row_group = None
    if meta.num_row_groups and meta.num_columns:
        compression = meta.row_group(0).column(0).compression.lower()
        row_group = max(1, meta.row_group(0).num_rows)
    if compression == "uncompressed":
        compression = "none"
    buf = io.BytesIO()
    pq.write_table(table, buf, compression=compression, row_group_size=row_group)
    return buf.getvalue()


EMBEDDING_COLUMNS = (S.IMAGE_EMBEDDING, S.TEXT_EMBEDDING)


def read_light(uri: str, storage: StorageConfig) -> pa.Table:
    """A Parquet file without its embedding columns (only the other columns are fetched)."""
    fs, path = filesystem_for(uri, storage)
    names = pq.read_schema(path, filesystem=fs).names
    return pq.read_table(path, filesystem=fs, columns=[c for c in names if c not in EMBEDDING_COLUMNS])


def reason_text(reason: str) -> str:
    return f"{REASON_PREFIX}{reason}"


@dataclass
class Plan:
    """Writes wanted for one shard (rel path -> bytes), in commit order, manifest last."""

    shard: str
    writes: list[tuple[str, bytes]] = field(default_factory=list)
    samples_removed: int = 0
    newly_marked: set[str] = field(default_factory=set)


def mark_shard_table(table: pa.Table, hit: list[bool], reason: str) -> tuple[pa.Table, set[str]]:
    current = S.column_list(table, TAKEDOWN)
    keys = S.column_list(table, S.KEY)
    new = [reason if h and c is None else c for h, c in zip(hit, current, strict=True)]
    newly = {k for k, a, b in zip(keys, current, new, strict=True) if a != b}
    return S.set_column(table, TAKEDOWN, pa.array(new, pa.string()), keep_type=True), newly


def plan_shard(
    store: Storage, shard: str, hit_keys: set[str], reason: str, names: set[str]
) -> Plan:
    """The writes that take ``hit_keys`` down in shard ``shard`` (possibly none).

    Raises :class:`TakedownError` when the shard's files disagree with its manifest in a way a
    crashed takedown cannot explain (another writer, or a shard never committed)."""
    plan = Plan(shard)
    tar_rel, pq_rel, man_rel = tar_name(shard), parquet_name(shard), manifest_name(shard)
    manifest = read_manifest(store, shard) if man_rel in names else None

    tar_old = store.read_bytes(tar_rel) if tar_rel in names else None
    tar_new = tar_old
    if tar_old is not None:
        tar_new, plan.samples_removed = filter_tar(tar_old, hit_keys)

    table, pq_old = read_table(store, pq_rel)
    hit = [k in hit_keys for k in S.column_list(table, S.KEY)]
    marked, plan.newly_marked = mark_shard_table(table, hit, reason)
    pq_new = pq_old if marked.equals(table) else table_bytes(marked, pq_old)

    if manifest is not None:
        if tar_old is not None and not file_matches(manifest, tar_rel, tar_old):
            # A tar that differs from its manifest is only ours to finish when it is exactly
            # the manifest's samples minus the ones this takedown removes.
            listed = manifest_keys(manifest)
            want = [k for k in listed if k not in hit_keys]
            if tar_sample_keys(tar_old) != want:
                gone = sorted(set(listed) - set(tar_sample_keys(tar_old)))
                raise TakedownError(
                    f"shard {shard}: {tar_rel} does not match its manifest and is not this "
                    f"takedown's rewrite of it (samples missing from the tar: {gone[:10]}); if an "
                    "earlier takedown was interrupted, run that one again first; else check "
                    "whether a job is writing this output"
                )
        if not file_matches(manifest, pq_rel, pq_old) and TAKEDOWN not in table.column_names:
            raise TakedownError(f"shard {shard}: {pq_rel} does not match its manifest")

    if tar_new is not None and tar_new is not tar_old:
        plan.writes.append((tar_rel, tar_new))
    if pq_new is not pq_old:
        plan.writes.append((pq_rel, pq_new))

    if manifest is not None and tar_new is not None:
        new_manifest = rewritten_manifest(manifest, shard, tar_new, pq_new)
        if new_manifest != manifest:
            plan.writes.append((man_rel, manifest_bytes(new_manifest)))
    return plan


def mark_embeddings(table: pa.Table, hit_keys: set[str], reason: str) -> tuple[pa.Table, set[str]]:
    """Embeddings rows of ``hit_keys`` marked; returns (table, keys whose marks changed)."""
    keys = S.column_list(table, S.KEY)
    hit = [k in hit_keys for k in keys]
    if not any(hit):
        return table, set()
    text = reason_text(reason)
    keep = S.column_list(table, S.KEEP)
    drop = S.column_list(table, S.DROP_REASON)
    mark = S.column_list(table, TAKEDOWN)
    newly: set[str] = set()
    for i, h in enumerate(hit):
        if not h:
            continue
        if mark[i] is None:
            mark[i] = reason
        before = (keep[i], drop[i])
        keep[i] = False
        # A row taken down twice keeps the reason of the first takedown.
        drop[i] = drop[i] if isinstance(drop[i], str) and drop[i].startswith(REASON_PREFIX) else text
        if before != (keep[i], drop[i]):
            newly.add(keys[i])
    out = S.set_column(table, S.KEEP, pa.array(keep, pa.bool_()), keep_type=True)
    out = S.set_column(out, S.DROP_REASON, pa.array(drop, pa.string()), keep_type=True)
    out = S.set_column(out, TAKEDOWN, pa.array(mark, pa.string()), keep_type=True)
    # The thumbnail (dedup.pixel_check) is the picture itself, only smaller.
    for name in (S.IMAGE_EMBEDDING, S.IMAGE_THUMB):
        if name in out.column_names:
            col = out.column(name)
            vals = [None if h else v for h, v in zip(hit, col.to_pylist(), strict=True)]
            out = S.set_column(out, name, pa.array(vals, col.type), keep_type=True)
    return out, newly
