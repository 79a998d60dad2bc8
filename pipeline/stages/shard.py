"""Write each shard as img2dataset does, plus a manifest, with an atomic commit.

For shard ``00012`` the output folder gets, in this order:

- ``00012.tar``: for every ``ok`` row, ``<key>.jpg`` (or ``.png``/``.webp``), ``<key>.json`` and
  ``<key>.txt``, written like webdataset's ``TarWriter`` (USTAR, members of a sample adjacent
  and sorted by extension, mode 0444). The ``.json`` holds img2dataset's fields: the url and
  caption columns, additional columns, ``key``, ``status`` (``"success"``), ``error_message``,
  ``width``, ``height``, ``original_width``, ``original_height`` and ``sha256``.
- ``00012.parquet``: every row of the shard, in input order, whatever its status (columns:
  ``schema.SHARD_TABLE_FIELDS`` then passthrough columns).
- ``00012_stats.json``: img2dataset's per-shard stats (``count``, ``successes``,
  ``failed_to_download``, ``failed_to_resize``, ``duration``, ``start_time``, ``end_time``,
  ``status_dict``).
- ``00012.manifest.json``, last: row count, the keys in the tar, and size + sha256 of the three
  files above. Its presence (with matching sizes) is what marks the shard committed.

Each file is built in memory and committed with :meth:`Storage.write_atomic`, so a crash never
leaves a half file under a final name; a shard without a manifest is simply redone on resume.

A shard must be written once, whole. The runner sends each shard as one batch; if Ray ever
splits one, the stage keeps the parts it has (``_shard_rows`` says how many rows the shard
has) and writes the shard when the last part arrives, so it never writes two partial tars.

The rows flowing on keep every column except the image bytes (the embed half reads images back
from the tars), so memory after this stage is bounded by metadata.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import schema as S
from pipeline.config import ShardConfig, StorageConfig
from pipeline.stages.base import Stage
from pipeline.storage import MANIFEST_SUFFIX, Storage

_SAFE_KEY = re.compile(r"^[0-9A-Za-z_-]+$")
_INTERNAL = {S.SHARD_ROWS, S.SHARD_STARTED, S.SHARD_ID, S.IMAGE, S.IMAGE_BYTES}
_TAR_USER = "bigdata"  # what webdataset's TarWriter (and so img2dataset) records


def _column(table: pa.Table, name: str, n: int) -> list[Any]:
    return table.column(name).to_pylist() if name in table.column_names else [None] * n


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes, mtime: float) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = int(mtime)
    info.mode = 0o444
    info.uname = info.gname = _TAR_USER
    tar.addfile(info, io.BytesIO(data))


def _digest(data: bytes) -> dict[str, Any]:
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _json_value(v: Any) -> Any:
    if isinstance(v, bytes):
        return v.decode("utf-8", errors="replace")
    return v


@dataclass(frozen=True)
class ShardFiles:
    """The serialized files of one shard (bytes) and its manifest (dict)."""

    name: str
    tar: bytes
    parquet: bytes
    stats: bytes
    manifest: dict[str, Any]


def build_shard(shard_id: int, rows: pa.Table, passthrough: tuple[str, ...] = ()) -> ShardFiles:
    """Serialize one whole shard. ``rows`` holds all of the shard's rows, in any order.

    ``passthrough`` names input columns copied into each ``.json`` (img2dataset's
    ``save_additional_columns``); every non-binary column that is not part of the shard table
    schema is also kept in the parquet.
    """
    name = S.shard_name(shard_id)
    rows = rows.sort_by(S.KEY)
    n = rows.num_rows
    keys = _column(rows, S.KEY, n)
    statuses = _column(rows, S.STATUS, n)
    for k in keys:
        if not isinstance(k, str) or not _SAFE_KEY.match(k):
            raise ValueError(f"shard {name}: key {k!r} is not tar-safe")
    if len(set(keys)) != n:
        raise ValueError(f"shard {name}: duplicate keys")

    urls = _column(rows, S.URL, n)
    captions = _column(rows, S.CAPTION, n)
    errors = _column(rows, S.ERROR, n)
    images = _column(rows, S.IMAGE, n)
    fmts = _column(rows, S.IMAGE_FORMAT, n)
    sizes = {c: _column(rows, c, n) for c in (S.WIDTH, S.HEIGHT, S.ORIGINAL_WIDTH, S.ORIGINAL_HEIGHT)}
    hashes = _column(rows, S.SHA256, n)
    extra = {c: _column(rows, c, n) for c in passthrough if c in rows.column_names}

    now = time.time()
    tar_buf = io.BytesIO()
    stored: list[str] = []
    with tarfile.open(fileobj=tar_buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for i in range(n):
            if statuses[i] != S.OK:
                continue
            if images[i] is None:
                # A stage upstream said ok without producing an image: record it, store nothing.
                statuses[i] = "decode_error"
                errors[i] = "no image after decode"
                continue
            meta: dict[str, Any] = {"url": urls[i], "caption": captions[i]}
            meta.update({c: _json_value(v[i]) for c, v in extra.items()})
            meta.update(
                {
                    "key": keys[i],
                    "status": "success",
                    "error_message": None,
                    **{c: v[i] for c, v in sizes.items()},
                    "sha256": hashes[i],
                }
            )
            members = {
                fmts[i] or "jpg": images[i],
                "json": json.dumps(meta, indent=4).encode("utf-8"),
                "txt": (captions[i] or "").encode("utf-8"),
            }
            for ext in sorted(members):
                _tar_member(tar, f"{keys[i]}.{ext}", members[ext], now)
            stored.append(keys[i])
    tar_bytes = tar_buf.getvalue()

    table = _shard_table(rows, name, statuses, errors, passthrough)
    pq_buf = io.BytesIO()
    pq.write_table(table, pq_buf)
    parquet_bytes = pq_buf.getvalue()

    counts = Counter(statuses)
    started = [t for t in _column(rows, S.SHARD_STARTED, n) if t is not None]
    start_time = min(started) if started else now
    successes = counts.get(S.OK, 0)
    failed_to_resize = sum(c for s, c in counts.items() if S.is_decode_failure(s))
    stats = {
        "count": n,
        "successes": successes,
        "failed_to_download": n - successes - failed_to_resize,
        "failed_to_resize": failed_to_resize,
        "duration": now - start_time,
        "start_time": start_time,
        "end_time": now,
        "status_dict": dict(sorted(counts.items())),
    }
    stats_bytes = json.dumps(stats, indent=4).encode("utf-8")
    manifest = {
        "shard": name,
        "shard_id": shard_id,
        "count": n,
        "samples": len(stored),
        "keys": stored,
        "files": {
            f"{name}.tar": _digest(tar_bytes),
            f"{name}.parquet": _digest(parquet_bytes),
            f"{name}_stats.json": _digest(stats_bytes),
        },
        "created_at": now,
    }
    return ShardFiles(name, tar_bytes, parquet_bytes, stats_bytes, manifest)


def _shard_table(
    rows: pa.Table, name: str, statuses: list[Any], errors: list[Any], passthrough: tuple[str, ...]
) -> pa.Table:
    n = rows.num_rows
    cols: dict[str, pa.Array] = {}
    for f in S.SHARD_TABLE_FIELDS:
        if f.name == S.SHARD:
            cols[f.name] = pa.array([name] * n, f.type)
        elif f.name == S.STATUS:
            cols[f.name] = pa.array(statuses, f.type)
        elif f.name == S.ERROR:
            cols[f.name] = pa.array(errors, f.type)
        elif f.name in rows.column_names:
            cols[f.name] = rows.column(f.name).cast(f.type)
        else:
            cols[f.name] = pa.nulls(n, f.type)
    for c in rows.column_names:
        # "_"-names are the pipeline's bookkeeping, unless the user asked to keep the column.
        if c in cols or c in _INTERNAL or (c.startswith("_") and c not in passthrough):
            continue
        t = rows.schema.field(c).type
        if pa.types.is_binary(t) or pa.types.is_large_binary(t):
            continue
        cols[c] = rows.column(c)
    return pa.table(cols)


def commit_shard(storage: Storage, files: ShardFiles) -> None:
    """Write the tar, parquet and stats, then the manifest (the commit marker)."""
    storage.write_atomic(f"{files.name}.tar", files.tar)
    storage.write_atomic(f"{files.name}.parquet", files.parquet)
    storage.write_atomic(f"{files.name}_stats.json", files.stats)
    storage.write_atomic(
        f"{files.name}{MANIFEST_SUFFIX}", json.dumps(files.manifest, indent=2).encode("utf-8")
    )


@dataclass
class ShardStage(Stage):
    """Writes shards; rows flow on without image bytes and with a ``shard`` column.

    Stateful (it may hold parts of a split shard), so the runner gives it one actor.
    """

    cfg: ShardConfig = field(default_factory=ShardConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    passthrough: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self._store: Storage | None = None
        self._pending: dict[int, list[pa.Table]] = {}
        self.shards_written: list[str] = []

    def setup(self) -> None:
        self._store = Storage(self.cfg.output_folder, self.storage)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_store"] = None
        return state

    def process_batch(self, batch: pa.Table) -> pa.Table:
        if self._store is None:
            self.setup()
        assert self._store is not None
        n = batch.num_rows
        shard_ids = _column(batch, S.SHARD_ID, n)
        expected = _column(batch, S.SHARD_ROWS, n)
        order: list[int] = list(dict.fromkeys(shard_ids))
        for sid in order:
            part = batch.filter(pc.equal(batch.column(S.SHARD_ID), sid))
            want = expected[shard_ids.index(sid)] or part.num_rows
            parts = self._pending.pop(sid, []) + [part]
            have = sum(p.num_rows for p in parts)
            if have < want:
                self._pending[sid] = parts
                continue
            whole = pa.concat_tables(parts, promote_options="permissive") if len(parts) > 1 else part
            files = build_shard(sid, whole, self.passthrough)
            commit_shard(self._store, files)
            self.shards_written.append(files.name)
        drop = [c for c in (S.IMAGE, S.IMAGE_BYTES, S.SHARD_ROWS, S.SHARD_STARTED) if c in batch.column_names]
        out = batch.drop_columns(drop)
        return out.append_column(S.SHARD, pa.array([S.shard_name(s) for s in shard_ids], pa.string()))

    @property
    def pending_shards(self) -> list[int]:
        """Shard ids with some rows received and not yet written."""
        return sorted(self._pending)
