"""The shard format, in one place: what a committed shard is, and how it is written, read,
checked and rewritten. Used by the shard stage (write), resume (which shards are committed;
rows and images read back), the report (thumbnails streamed from the tars) and takedowns
(tar and manifest rewritten without some samples). Nothing else parses a shard's files.

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
A shard is committed when its manifest exists and the files it names exist with the sizes it
records (:func:`committed_shards`).
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
from pipeline.storage import Storage

MANIFEST_SUFFIX = ".manifest.json"
PARQUET_SUFFIX = ".parquet"
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


def file_digest(data: bytes) -> dict[str, Any]:
    """How a manifest records one of its files: ``{"size": bytes, "sha256": hex}``."""
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
    # The manifest's fields (this format's own JSON), not column names.
    manifest = {
        "shard": name,
        "shard_id": shard_id,
        "count": n,
        "samples": len(stored),
        "keys": stored,
        "files": {
            tar_name(name): file_digest(tar_bytes),
            parquet_name(name): file_digest(parquet_bytes),
            stats_name(name): file_digest(stats_bytes),
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
    storage.write_atomic(tar_name(files.name), files.tar)
    storage.write_atomic(parquet_name(files.name), files.parquet)
    storage.write_atomic(stats_name(files.name), files.stats)
    storage.write_atomic(manifest_name(files.name), manifest_bytes(files.manifest))


def tar_name(shard: str) -> str:
    """``"00012" -> "00012.tar"``."""
    return f"{shard}.tar"


def parquet_name(shard: str) -> str:
    """``"00012" -> "00012.parquet"`` (the shard's rows, in the shard folder)."""
    return f"{shard}{PARQUET_SUFFIX}"


def stats_name(shard: str) -> str:
    """``"00012" -> "00012_stats.json"``."""
    return f"{shard}_stats.json"


def manifest_name(shard: str) -> str:
    """``"00012" -> "00012.manifest.json"``."""
    return f"{shard}{MANIFEST_SUFFIX}"


def shards_with_rows(names: set[str] | list[str]) -> list[str]:
    """The shards (sorted) of a shard folder's file ``names`` that have a parquet of rows,
    committed or not (temporary files, which start with ".", are not shards)."""
    return sorted(
        n[: -len(PARQUET_SUFFIX)] for n in names if n.endswith(PARQUET_SUFFIX) and not n.startswith(".")
    )


def manifest_bytes(manifest: dict[str, Any]) -> bytes:
    """A manifest as it is stored (indented JSON, UTF-8)."""
    return json.dumps(manifest, indent=2).encode("utf-8")


# ------------------------------------------------------------------------------ verify


def read_manifest(storage: Storage, shard: str) -> dict[str, Any] | None:
    """The shard's manifest, or None when it is missing or not JSON. An unreachable store
    raises StorageError: "cannot read" must never pass for "not committed", or a writer
    would treat a shard's rows as complete with only the rows at hand."""
    try:
        return json.loads(storage.read_bytes(manifest_name(shard)))
    except (FileNotFoundError, ValueError):
        return None


def manifest_matches(storage: Storage, manifest: dict[str, Any]) -> bool:
    """True when every file a manifest names exists with the size it records."""
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        return False
    return all(
        isinstance(info, dict) and storage.size(name) == info.get("size")
        for name, info in files.items()
    )


def file_matches(manifest: dict[str, Any], name: str, data: bytes) -> bool:
    """True when ``manifest`` records the file ``name`` with the sha256 of ``data``."""
    recorded = dict(manifest.get("files") or {}).get(name, {})
    return recorded.get("sha256") == file_digest(data)["sha256"]


def manifest_keys(manifest: dict[str, Any]) -> list[str]:
    """The sample keys a manifest says its tar holds, in tar order."""
    return list(manifest.get("keys", []))


def committed_shards(storage: Storage) -> set[str]:
    """Shard names (``"00012"``) under ``storage`` whose manifest exists and matches the files
    on storage (the manifest is written last, so it is the commit marker): what resume skips."""
    done: set[str] = set()
    for name in storage.list_names():
        if not name.endswith(MANIFEST_SUFFIX) or name.startswith("."):
            continue
        shard = name[: -len(MANIFEST_SUFFIX)]
        manifest = read_manifest(storage, shard)
        if manifest is not None and manifest_matches(storage, manifest):
            done.add(shard)
    return done


# ------------------------------------------------------------------------------ read


def _image_stem(member: tarfile.TarInfo) -> str | None:
    """The key of an image member ``<key>.<jpg|jpeg|png|webp>``, None for any other member."""
    if not member.isfile():
        return None
    stem, _, ext = member.name.rpartition(".")
    return stem if ext.lower() in IMAGE_EXTENSIONS else None


def read_tar_images(data: bytes, keys: set[str] | None = None) -> dict[str, bytes]:
    """Image bytes of the members ``<key>.<jpg|jpeg|png|webp>`` of a shard's tar, for the
    wanted keys (None: all)."""
    found: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for member in tar:
            stem = _image_stem(member)
            if stem is not None and (keys is None or stem in keys):
                f = tar.extractfile(member)
                if f is not None:
                    found[stem] = f.read()
    return found


def stream_tar_images(shards_root: str, wanted: dict[str, set[str]], storage: Any = None) -> dict[str, bytes]:
    """Image bytes of the wanted keys (``{shard: keys}``) from the tars under ``shards_root``
    (folder or ``s3://`` URI). Each tar is streamed once, in shard order, and only until its
    last wanted member, so memory stays at one image whatever the tar's size. A missing or
    unreadable tar leaves its keys out. ``storage``: a :class:`pipeline.config.StorageConfig`
    or None."""
    import posixpath

    from pipeline.storage import filesystem_for, open_sequential

    fs, root = filesystem_for(shards_root, storage)
    found: dict[str, bytes] = {}
    for shard, keys in sorted(wanted.items()):
        left = set(keys)
        try:
            with open_sequential(fs, posixpath.join(root, tar_name(shard))) as stream:
                with tarfile.open(fileobj=stream, mode="r|") as tar:
                    for member in tar:
                        stem = _image_stem(member)
                        if stem in left:
                            f = tar.extractfile(member)
                            if f is not None:
                                found[stem] = f.read()
                                left.discard(stem)
                        if not left:
                            break
        except (OSError, tarfile.TarError):
            continue
    return found


def read_rows(storage: Storage, shard: str) -> pa.Table:
    """The shard's parquet: every row of the shard, whatever its status."""
    return pq.read_table(pa.BufferReader(storage.read_bytes(parquet_name(shard))))


def read_images(storage: Storage, shard: str, keys: set[str] | None = None) -> dict[str, bytes]:
    """Stored image bytes by key, from the shard's tar."""
    return read_tar_images(storage.read_bytes(tar_name(shard)), keys)


def read_stats(storage: Storage, shard: str) -> dict[str, Any]:
    """The shard's img2dataset stats (``count``, ``successes``, ``failed_to_download``,
    ``failed_to_resize``, ``status_dict``, times)."""
    return json.loads(storage.read_bytes(stats_name(shard)))


# ------------------------------------------------------------------------------ rewrite


def sample_key(member_name: str) -> str:
    """The sample a tar member belongs to: its basename up to the first dot, as WebDataset
    groups members (keys never hold dots)."""
    return member_name.rsplit("/", 1)[-1].split(".", 1)[0]


def tar_sample_keys(tar_bytes: bytes) -> list[str]:
    """Sample keys in a tar, in member order, each once."""
    with tarfile.open(fileobj=io.BytesIO(tar_bytes), mode="r:") as tar:
        return list(dict.fromkeys(sample_key(m.name) for m in tar.getmembers() if m.isfile()))


def filter_tar(tar_bytes: bytes, drop: set[str]) -> tuple[bytes, int]:
    """``tar_bytes`` without the members of the samples ``drop``; returns (new bytes, samples
    removed). Kept members are copied with their original headers and data, so a sample that
    stays is byte-identical in the new tar. Unchanged input is returned as is."""
    with tarfile.open(fileobj=io.BytesIO(tar_bytes), mode="r:") as src:
        members = src.getmembers()
        removed = {sample_key(m.name) for m in members if sample_key(m.name) in drop}
        if not removed:
            return tar_bytes, 0
        out = io.BytesIO()
        with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as dst:
            for m in members:
                if sample_key(m.name) in drop:
                    continue
                dst.addfile(m, src.extractfile(m) if m.isfile() else None)
    return out.getvalue(), len(removed)


def rewritten_manifest(manifest: dict[str, Any], shard: str, tar_bytes: bytes, parquet_bytes: bytes) -> dict[str, Any]:
    """``manifest`` for the shard's new tar and parquet: their size and sha256, the tar's
    ``keys`` and ``samples``, and ``taken_down``: every key an earlier manifest listed that
    the tar no longer holds (kept from earlier rewrites too). The stats file's entry and
    everything else are unchanged."""
    new = dict(manifest)
    files = dict(manifest.get("files") or {})
    files[tar_name(shard)] = file_digest(tar_bytes)
    files[parquet_name(shard)] = file_digest(parquet_bytes)
    keys = tar_sample_keys(tar_bytes)
    new["files"] = files
    new["keys"] = keys
    new["samples"] = len(keys)
    removed = sorted(set(manifest.get("taken_down", [])) | (set(manifest.get("keys", [])) - set(keys)))
    if removed:
        new["taken_down"] = removed
    return new
