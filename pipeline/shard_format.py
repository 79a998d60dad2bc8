"""The shard format, in one place: what a committed shard is, and how it is written, read and
checked. Used by the shard stage (write), resume (read rows and images back), the report
(thumbnails) and takedowns (rewrite).

A shard ``00012`` is four files in the shard folder, in img2dataset's layout plus a manifest:

- ``00012.tar``: for every ``ok`` row, ``<key>.jpg`` (or ``.png``/``.webp``), ``<key>.json`` and
  ``<key>.txt``, written like webdataset's ``TarWriter`` (USTAR, members of a sample adjacent
  and sorted by extension, mode 0444). The ``.json`` holds img2dataset's fields: the url and
  caption columns, additional columns, ``key``, ``status`` (``"success"``), ``error_message``,
  ``width``, ``height``, ``original_width``, ``original_height`` and ``sha256``.
- ``00012.parquet``: every row of the shard, in key order, whatever its status (columns:
  ``schema.SHARD_TABLE_FIELDS`` then passthrough columns).
- ``00012_stats.json``: img2dataset's per-shard stats (``count``, ``successes``,
  ``failed_to_download``, ``failed_to_resize``, ``duration``, ``start_time``, ``end_time``,
  ``status_dict``).
- ``00012.manifest.json``, last: row count, the keys in the tar, and size + sha256 of the three
  files above. Its presence (with matching sizes) is what marks the shard committed.

Each file is built in memory and committed with :meth:`Storage.write_atomic`, so a crash never
leaves a half file under a final name; a shard without a manifest is simply redone on resume.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import schema as S
from pipeline.storage import MANIFEST_SUFFIX, Storage

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")

_SAFE_KEY = re.compile(r"^[0-9A-Za-z_-]+$")
_INTERNAL = {S.SHARD_ROWS, S.SHARD_STARTED, S.SHARD_ID, S.IMAGE, S.IMAGE_BYTES}
_TAR_USER = "bigdata"  # what webdataset's TarWriter (and so img2dataset) records


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
    """The serialized files of one shard (bytes), its manifest (dict) and its rows as stored
    in the parquet (``table``: key order, final statuses)."""

    name: str
    tar: bytes
    parquet: bytes
    stats: bytes
    manifest: dict[str, Any]
    table: pa.Table


def build_shard(shard_id: int, rows: pa.Table, passthrough: tuple[str, ...] = ()) -> ShardFiles:
    """Serialize one whole shard. ``rows`` holds all of the shard's rows, in any order.

    ``passthrough`` names input columns copied into each ``.json`` (img2dataset's
    ``save_additional_columns``); every non-binary column that is not part of the shard table
    schema is also kept in the parquet.
    """
    name = S.shard_name(shard_id)
    rows = rows.sort_by(S.KEY)
    n = rows.num_rows
    keys = S.column_list(rows, S.KEY)
    statuses = S.column_list(rows, S.STATUS)
    for k in keys:
        if not isinstance(k, str) or not _SAFE_KEY.match(k):
            raise ValueError(f"shard {name}: key {k!r} is not tar-safe")
    if len(set(keys)) != n:
        raise ValueError(f"shard {name}: duplicate keys")

    urls = S.column_list(rows, S.URL)
    captions = S.column_list(rows, S.CAPTION)
    errors = S.column_list(rows, S.ERROR)
    images = S.column_list(rows, S.IMAGE)
    fmts = S.column_list(rows, S.IMAGE_FORMAT)
    sizes = {c: S.column_list(rows, c) for c in (S.WIDTH, S.HEIGHT, S.ORIGINAL_WIDTH, S.ORIGINAL_HEIGHT)}
    hashes = S.column_list(rows, S.SHA256)
    extra = {c: S.column_list(rows, c) for c in passthrough if c in rows.column_names}

    now = time.time()
    tar_buf = io.BytesIO()
    stored: list[str] = []
    with tarfile.open(fileobj=tar_buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for i in range(n):
            if statuses[i] != S.OK:
                continue
            if images[i] is None:
                # A stage upstream said ok without producing an image: record it, store nothing.
                statuses[i] = S.DECODE_ERROR
                errors[i] = "no image after decode"
                continue
            # img2dataset's .json fields (what its readers expect), not our column names.
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
    started = [t for t in S.column_list(rows, S.SHARD_STARTED) if t is not None]
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
    return ShardFiles(name, tar_bytes, parquet_bytes, stats_bytes, manifest, table)


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


def read_tar_images(data: bytes, keys: set[str] | None = None) -> dict[str, bytes]:
    """Image bytes of the members ``<key>.<jpg|jpeg|png|webp>`` of a shard's tar, for the
    wanted keys (None: all)."""
    found: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for member in tar:
            if not member.isfile():
                continue
            stem, _, ext = member.name.rpartition(".")
            if (keys is None or stem in keys) and ext.lower() in IMAGE_EXTENSIONS:
                f = tar.extractfile(member)
                if f is not None:
                    found[stem] = f.read()
    return found


def read_rows(storage: Storage, shard: str) -> pa.Table:
    """The shard's parquet: every row of the shard, whatever its status."""
    return pq.read_table(pa.BufferReader(storage.read_bytes(f"{shard}.parquet")))


def read_images(storage: Storage, shard: str, keys: set[str] | None = None) -> dict[str, bytes]:
    """Stored image bytes by key, from the shard's tar."""
    return read_tar_images(storage.read_bytes(f"{shard}.tar"), keys)
