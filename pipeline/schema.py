"""Column names, the row status vocabulary and the shard-table schema, in one place.

Every stage of the download half reads and writes pyarrow Tables whose columns are named here,
so a rename happens in one file. The status of a row is ``"ok"`` or the reason it failed; the
reasons are grouped by the stage that sets them, which is also how ``_stats.json`` splits
failures into img2dataset's ``failed_to_download`` and ``failed_to_resize`` counters.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

# --- columns set by the read stage --------------------------------------------------------
KEY = "key"  # img2dataset-shaped: shard id (5 digits) + row in shard, zero padded
SHARD_ID = "shard_id"  # int64, global shard number
URL = "url"
CAPTION = "caption"
STATUS = "status"
ERROR = "error"
# Bookkeeping columns that travel with the rows but are not part of any output table.
SHARD_ROWS = "_shard_rows"  # int64: how many rows the shard has in total
SHARD_STARTED = "_shard_started"  # float64: unix time the read stage emitted the shard
# input_format img2dataset: the row's key in the img2dataset output it was read from (a
# passthrough column: in the shards' tables, their .json and the output) ...
SOURCE_KEY = "source_key"
# ... and, for the unpack stage only, what that output recorded: its status and error message,
# and the tar that holds its images
SOURCE_STATUS = "_source_status"
SOURCE_ERROR = "_source_error"
SOURCE_TAR = "_source_tar"
# hex sha256 of the original download as that output recorded it (img2dataset's ``sha256``, a
# clipcurate shard's ``source_sha256``): its tars hold resized copies, hash lists name originals
SOURCE_ORIGINAL_SHA256 = "_source_original_sha256"
# int: the original's size as that output recorded it (its tars hold a resized copy)
SOURCE_ORIGINAL_WIDTH = "_source_original_width"
SOURCE_ORIGINAL_HEIGHT = "_source_original_height"

# --- columns set by the download stage ----------------------------------------------------
IMAGE_BYTES = "image_bytes"
HTTP_STATUS = "http_status"
DOWNLOAD_S = "download_s"
SOURCE_SHA256 = "source_sha256"  # hex sha256 of the downloaded bytes (what hash lists name)

# --- columns set by the decode stage ------------------------------------------------------
IMAGE = "image"
IMAGE_FORMAT = "image_format"
WIDTH = "width"
HEIGHT = "height"
ORIGINAL_WIDTH = "original_width"
ORIGINAL_HEIGHT = "original_height"
SHA256 = "sha256"
PDQ = "pdq"  # hex PDQ hash of the decoded picture (pipeline/blocklist/), before resizing

# --- column set by the shard stage --------------------------------------------------------
SHARD = "shard"  # "00012": the file stem of the tar/parquet holding the row

OK = "ok"

# --- statuses: "ok" or the reason a row failed, grouped by the stage that sets them ---------
# Statuses the read stage sets.
MISSING_URL = "missing_url"
MALFORMED_ROW = "malformed_row"
READ_STATUSES = frozenset({MISSING_URL, MALFORMED_ROW})

# Statuses the download stage sets (pipeline/fetch.py, pipeline/netguard.py); ``http_<code>``
# (:func:`http_failure`) is open-ended and not listed.
TIMEOUT = "timeout"
CONNECTION_ERROR = "connection_error"
TOO_LARGE = "too_large"
BLOCKED_ADDRESS = "blocked_address"
BAD_SCHEME = "bad_scheme"
BAD_URL = "bad_url"
OPT_OUT = "opt_out"
TOO_MANY_REDIRECTS = "too_many_redirects"
TLS_ERROR = "tls_error"
INCOMPLETE_BODY = "incomplete_body"
DOWNLOAD_ERROR = "download_error"  # an unexpected exception, recorded rather than raised
# A blocklist (URL, domain, md5/sha1/sha256 of the bytes, PDQ of the picture) names the row:
# nothing of it is stored; its error names the list.
BLOCKED = "blocked"
# Reading an img2dataset output instead of downloading (pipeline/stages/unpack.py): the tool
# that wrote it recorded a failure for the row (its status and message are in ``error``), or
# says it stored an image that its tar does not hold (or that cannot be read from it).
SOURCE_FAILED = "source_failed"
SOURCE_MISSING = "source_missing"
DOWNLOAD_STATUSES = frozenset(
    {
        SOURCE_FAILED,
        SOURCE_MISSING,
        TIMEOUT,
        CONNECTION_ERROR,
        TOO_LARGE,
        BLOCKED_ADDRESS,
        BAD_SCHEME,
        BAD_URL,
        OPT_OUT,
        TOO_MANY_REDIRECTS,
        TLS_ERROR,
        INCOMPLETE_BODY,
        DOWNLOAD_ERROR,
        BLOCKED,
    }
)
_HTTP_PREFIX = "http_"


def http_failure(code: int) -> str:
    """The status of a row whose server answered with HTTP ``code``: ``404 -> "http_404"``."""
    return f"{_HTTP_PREFIX}{code}"


# Statuses the decode stage sets when its crash guard (pipeline/crashguard.py) quarantines a
# row: the decoder process died on it, or ran past the per-row timeout, on every attempt.
WORKER_CRASH = "worker_crash"
DECODE_TIMEOUT = "decode_timeout"
# Statuses the decode stage sets.
DECODE_ERROR = "decode_error"
UNSUPPORTED_FORMAT = "unsupported_format"
TOO_MANY_PIXELS = "too_many_pixels"
TOO_MANY_FRAMES = "too_many_frames"
TOO_SMALL = "too_small"
BAD_ASPECT_RATIO = "bad_aspect_ratio"
TRUNCATED = "truncated"
DECODE_STATUSES = frozenset(
    {
        WORKER_CRASH,
        DECODE_TIMEOUT,
        DECODE_ERROR,
        UNSUPPORTED_FORMAT,
        TOO_MANY_PIXELS,
        TOO_MANY_FRAMES,
        TOO_SMALL,
        BAD_ASPECT_RATIO,
        TRUNCATED,
    }
)


def is_decode_failure(status: str) -> bool:
    """True for statuses that mean the bytes arrived but could not become a stored image."""
    return status in DECODE_STATUSES


def is_failure_status(status: object) -> bool:
    """True for a failure status of this vocabulary (read, download incl. ``http_<code>``,
    decode, preprocess); False for ``ok`` and for words of other tools (img2dataset's
    ``failed_to_download``)."""
    if not isinstance(status, str):
        return False
    if status.startswith(_HTTP_PREFIX):
        return status[len(_HTTP_PREFIX):].isdigit()
    return (status in READ_STATUSES or status in DOWNLOAD_STATUSES or status in DECODE_STATUSES
            or status in EMBED_STATUSES)


def stage_of(status: str) -> str:
    """The stage that set a row's status: "ok", "read", "download", "decode" or "preprocess"."""
    if status == OK:
        return "ok"
    if status in READ_STATUSES:
        return "read"
    if is_decode_failure(status):
        return "decode"
    if status in EMBED_STATUSES:
        return "preprocess"
    return "download"


def shard_name(shard_id: int) -> str:
    """File stem of a shard, as img2dataset names it (``oom_shard_count=5``): ``12 -> "00012"``."""
    return f"{shard_id:05d}"


def sample_digits(number_sample_per_shard: int) -> int:
    """Digits of the row part of a key: ``ceil(log10(n))`` exactly as img2dataset computes it."""
    digits = 0
    while 10**digits < number_sample_per_shard:
        digits += 1
    return digits


def make_key(shard_id: int, row_in_shard: int, number_sample_per_shard: int) -> str:
    """img2dataset's key: ``10**digits * shard_id + row``, zero padded to ``5 + digits``.

    ``make_key(12, 42, 10000) == "000120042"``. Digits and letters only, so it is safe as a tar
    member stem and as a WebDataset ``__key__`` (no dots, no slashes).
    """
    digits = sample_digits(number_sample_per_shard)
    return f"{10**digits * shard_id + row_in_shard:0{5 + digits}d}"


# The per-shard parquet table (``<shard>.parquet``): one row per input row of the shard, in
# input order, whatever its status. Passthrough input columns follow these.
SHARD_TABLE_FIELDS: tuple[pa.Field, ...] = (
    pa.field(KEY, pa.string()),
    pa.field(SHARD, pa.string()),
    pa.field(URL, pa.string()),
    pa.field(CAPTION, pa.string()),
    pa.field(STATUS, pa.string()),
    pa.field(ERROR, pa.string()),
    pa.field(HTTP_STATUS, pa.int32()),
    pa.field(DOWNLOAD_S, pa.float32()),
    pa.field(IMAGE_FORMAT, pa.string()),
    pa.field(WIDTH, pa.int32()),
    pa.field(HEIGHT, pa.int32()),
    pa.field(ORIGINAL_WIDTH, pa.int32()),
    pa.field(ORIGINAL_HEIGHT, pa.int32()),
    pa.field(SHA256, pa.string()),
    pa.field(SOURCE_SHA256, pa.string()),
    pa.field(PDQ, pa.string()),
)
SHARD_TABLE_SCHEMA = pa.schema(list(SHARD_TABLE_FIELDS))


# ==============================================================================================
# Embed half: preprocess -> embed -> moderate -> write, and the output Parquet schema.
# ==============================================================================================

# Working columns between the decode task and the embed stage; never written.
PIXELS = "_pixels"  # binary: uint8 [S, S, 3] (height, width, RGB), the model's input before normalising
TOKENS = "_tokens"  # list<int32>: the caption's token ids (the model's tokenizer), no padding
# binary: a stored JPEG the embed stage decodes on its device (embed.stored_decode "device"),
# set by the reread stage instead of _pixels
JPEG = "_jpeg"
# string: which pixels the embedding was computed from: "original" (the downloaded image,
# decoded once in the decode task) or "stored" (the shard's stored copy, read back when a run
# resumes a shard committed by an earlier run but not embedded; or, with input_format
# img2dataset, the copy that output stored, resized by the tool that wrote it)
EMBEDDED_FROM = "embedded_from"
# bool: set by the write stage on rows of a shard it received only part of (never in practice:
# the schedulers hand it whole shards); the driver writes such shards once it has every row
UNWRITTEN = "_unwritten"

# --- columns set by the embed stage -------------------------------------------------------
IMAGE_EMBEDDING = "image_embedding"  # fixed_size_list<float16>[D], unit norm
TEXT_EMBEDDING = "text_embedding"  # fixed_size_list<float16>[D], unit norm
CLIP_SCORE = "clip_score"  # float32: cosine of the two (float32) unit embeddings
MODEL = "model"  # "<architecture>@sha256:<hex of the weights>" (or "@random-init")
# binary: 32 x 32 RGB uint8 thumbnail of the stored image (pipeline/pixel_check.py), set by the
# preprocess stage when dedup.pixel_check is on, else null
IMAGE_THUMB = "image_thumb"
EMBED_WORKER = "embed_worker"  # optional debug column: "<host>:<pid>" of the embedding actor

# --- columns set by the moderate stage ----------------------------------------------------
UNSAFE_SCORE = "unsafe_score"  # float32: max over concepts and sides of (margin - threshold); > 0 flags
UNSAFE_CONCEPT = "unsafe_concept"  # the concept that flagged the row (null when not flagged)
UNSAFE_SOURCE = "unsafe_source"  # "image", "caption" or "head" (null when not flagged)

# --- decisions (pipeline/decisions.py fills these) ------------------------------------------
DUPLICATE_OF = "duplicate_of"  # key of the row this one duplicates (null: not a duplicate)
DUP_GROUP_SIZE = "dup_group_size"  # int32: rows in its duplicate group, itself included
DUP_KIND = "dup_kind"  # DUP_EXACT, DUP_SEMANTIC or DUP_PREVIOUS_RUN (null: not a duplicate)
KEEP = "keep"
DROP_REASON = "drop_reason"
TAKEDOWN = "takedown"  # the takedown reason (pipeline/takedown/), null for rows not taken down

# Values of ``dup_kind``: same sha256 as a kept row, embedding (and pixels) close to a kept row,
# or a repeat of a row an earlier run kept.
DUP_EXACT = "exact"
DUP_SEMANTIC = "semantic"
DUP_PREVIOUS_RUN = "previous_run"

# How each ``drop_reason`` starts (pipeline/decisions.py writes the rest): the category the
# report counts by is the reason up to its first "(" (``status:http_404``, ``unsafe:nudity``,
# ``clip_score<0.28``, ``dedup:semantic``, ``takedown: request``).
REASON_TAKEDOWN = "takedown: "  # + the takedown's reason
REASON_STATUS = "status:"  # + the row's failure status
REASON_UNSAFE = "unsafe:"  # + concept(side, threshold; model)
REASON_CLIP_SCORE = "clip_score<"  # + threshold (model)
REASON_DEDUP = "dedup:"  # + dup_kind(test; model)


def status_reason(status: str) -> str:
    """The drop reason of a row that failed upstream: ``"http_404" -> "status:http_404"``."""
    return f"{REASON_STATUS}{status}"


# --- a similarity search's review table (pipeline/similar.py, ``matches.parquet``) ----------
# key, shard, url and caption as above, then:
MATCH_COSINE = "cosine"  # float32: the row's best cosine to a query
MATCH_QUERY = "query"  # the query (image path, row key or text) it matched
MATCH_PIXEL_CONFIRMED = "pixel_confirmed"  # bool: thumbnails agree (null: not checked)

# Statuses the re-read stage sets when re-embedding a committed shard (pipeline/stages/reread.py):
# an ok row whose stored image cannot reach the model.
IMAGE_MISSING = "image_missing"
PREPROCESS_ERROR = "preprocess_error"
EMBED_STATUSES = frozenset({IMAGE_MISSING, PREPROCESS_ERROR})


def embedding_type(dim: int) -> pa.DataType:
    """``fixed_size_list<float16>[dim]``: how embeddings are stored."""
    return pa.list_(pa.float16(), dim)


def output_fields(dim: int) -> tuple[pa.Field, ...]:
    """The fixed columns of the output Parquet, in order (passthrough columns follow)."""
    return (
        pa.field(KEY, pa.string()),
        pa.field(SHARD, pa.string()),
        pa.field(URL, pa.string()),
        pa.field(CAPTION, pa.string()),
        pa.field(STATUS, pa.string()),
        pa.field(ERROR, pa.string()),
        pa.field(HTTP_STATUS, pa.int32()),
        pa.field(WIDTH, pa.int32()),
        pa.field(HEIGHT, pa.int32()),
        pa.field(ORIGINAL_WIDTH, pa.int32()),
        pa.field(ORIGINAL_HEIGHT, pa.int32()),
        pa.field(SHA256, pa.string()),
        pa.field(SOURCE_SHA256, pa.string()),
        pa.field(PDQ, pa.string()),
        pa.field(IMAGE_EMBEDDING, embedding_type(dim)),
        pa.field(TEXT_EMBEDDING, embedding_type(dim)),
        pa.field(CLIP_SCORE, pa.float32()),
        pa.field(UNSAFE_SCORE, pa.float32()),
        pa.field(UNSAFE_CONCEPT, pa.string()),
        pa.field(UNSAFE_SOURCE, pa.string()),
        pa.field(DUPLICATE_OF, pa.string()),
        pa.field(DUP_GROUP_SIZE, pa.int32()),
        pa.field(DUP_KIND, pa.string()),
        pa.field(KEEP, pa.bool_()),
        pa.field(DROP_REASON, pa.string()),
        pa.field(MODEL, pa.string()),
        pa.field(EMBEDDED_FROM, pa.string()),
        pa.field(IMAGE_THUMB, pa.binary()),
    )


def output_schema(dim: int, passthrough: pa.Schema | None = None) -> pa.Schema:
    """Schema of the output Parquet for embeddings of size ``dim``, plus passthrough columns."""
    fields = list(output_fields(dim))
    if passthrough is not None:
        names = {f.name for f in fields}
        fields.extend(f for f in passthrough if f.name not in names)
    return pa.schema(fields)


# ----------------------------------------------------------------------------- Arrow helpers


def set_column(
    table: pa.Table, name: str, values: pa.Array | pa.ChunkedArray, *, keep_type: bool = False
) -> pa.Table:
    """``table`` with column ``name`` replaced in place (keeping its position) or appended.
    ``keep_type``: a replaced column keeps its type (``values`` are cast to it), so rewriting
    a file someone else wrote does not change its schema."""
    i = table.schema.get_field_index(name)
    if i >= 0:
        if keep_type:
            values = values.cast(table.schema.field(i).type)
        return table.set_column(i, name, values)
    return table.append_column(name, values)


def column_list(table: pa.Table, name: str) -> list[Any]:
    """Column ``name`` as a Python list, or ``[None] * num_rows`` when the table lacks it."""
    if name in table.column_names:
        return table.column(name).to_pylist()
    return [None] * table.num_rows


def drop_if_present(table: pa.Table, names: Sequence[str]) -> pa.Table:
    """``table`` without whichever of ``names`` it has."""
    have = [n for n in names if n in table.column_names]
    return table.drop_columns(have) if have else table


_MAX_BINARY_CHUNK = 1 << 30


def binary_column(values: Sequence[bytes | None]) -> pa.ChunkedArray:
    """A ``binary`` column split into chunks below 1 GiB each: one ``binary`` array's 32-bit
    offsets cannot address more than 2 GiB, which a shard of large images can reach."""
    chunks: list[pa.Array] = []
    start, size = 0, 0
    for i, v in enumerate(values):
        if v is not None and size + len(v) > _MAX_BINARY_CHUNK and i > start:
            chunks.append(_binary_array(values[start:i]))
            start, size = i, 0
        size += 0 if v is None else len(v)
    chunks.append(_binary_array(values[start:]))
    return pa.chunked_array(chunks, pa.binary())


def _binary_array(values: Sequence[bytes | None]) -> pa.Array:
    """One ``binary`` array whose data buffer is ``b"".join(values)``, a Python bytes object
    Arrow holds without copying. ``pa.array`` copies the values into a fresh Arrow buffer
    instead: for a shard of downloaded photos (~30 MB) that buffer was new memory from the OS
    on most calls, and faulting it in cost 60-170 ms of system time per shard in the job's CPU
    workers (0.4 ms a row, where the copy itself is ~5 ms). The join costs ~20 ms a shard there
    (its pages are fresh too, but cheaper ones: the kernel counted 30-75 transparent huge
    page faults during each slow ``pa.array`` call, ~2-4 ms of system time each on this
    VM)."""
    n = len(values)
    lengths = np.fromiter((0 if v is None else len(v) for v in values), np.int64, n)
    offsets = np.zeros(n + 1, np.int32)
    np.cumsum(lengths, out=offsets[1:])
    valid = np.fromiter((v is not None for v in values), bool, n)
    nulls = n - int(valid.sum())
    bitmap = pa.array(valid).buffers()[1] if nulls else None
    data = b"".join(v for v in values if v is not None)
    return pa.Array.from_buffers(pa.binary(), n, [bitmap, pa.py_buffer(offsets), pa.py_buffer(data)], null_count=nulls)


def embedding_array(values: np.ndarray, valid: np.ndarray) -> pa.FixedSizeListArray:
    """``fixed_size_list<float16>[D]`` (:func:`embedding_type`) from float [N, D] values; rows
    where ``valid`` is False are null."""
    n, dim = values.shape
    flat = pa.array(values.astype(np.float16, copy=False).reshape(-1))
    mask = pa.array(~valid.astype(bool)) if n else None
    return pa.FixedSizeListArray.from_arrays(flat, dim, mask=mask)


def embedding_matrix(
    col: pa.ChunkedArray | pa.Array,
    dim: int | None = None,
    dtype: Any = np.float32,
    *,
    copy: bool = True,
    name: str = "embeddings",
) -> tuple[np.ndarray, np.ndarray]:
    """(values [N, D] in ``dtype``, valid bool [N]) from a nullable list-of-floats column: the
    stored ``fixed_size_list<float16>[D]``, or a ``list``/``large_list`` of floats as other
    tools write it (every non-null row of the same length). Null rows are zero.

    ``dim``: the expected D (ValueError when a non-null row differs), None to take the
    column's. ``copy=False`` may return a read-only view of the Arrow buffer (when every row
    is valid and the values already have ``dtype``), so a large column is not duplicated.
    ``name`` is what error messages call the column."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    t = arr.type
    fixed = pa.types.is_fixed_size_list(t)
    if not (fixed or pa.types.is_list(t) or pa.types.is_large_list(t)):
        raise ValueError(f"{name} must be a list of floats, got {t}")
    if not pa.types.is_floating(t.value_type):
        raise ValueError(f"{name} must hold floats, got {t}")
    n = len(arr)
    valid = pc.is_valid(arr).to_numpy(zero_copy_only=False) if n else np.zeros(0, bool)
    if fixed:
        d = t.list_size
    else:
        lengths = np.unique(pc.list_value_length(arr).to_numpy(zero_copy_only=False)[valid])
        if len(lengths) > 1:
            raise ValueError(f"{name} rows have different lengths {lengths[:5]}")
        d = int(lengths[0]) if len(lengths) else (dim or 0)
    if dim is not None and valid.any() and d != dim:
        raise ValueError(f"{name} have dimension {d}, expected {dim}")
    if not valid.any():
        return np.zeros((n, dim if dim is not None else d), dtype), valid
    if fixed:
        # Null rows still occupy their slots in a fixed-size list's values.
        flat = arr.values.to_numpy(zero_copy_only=False)[arr.offset * d : (arr.offset + n) * d]
    else:
        flat = arr.flatten().to_numpy(zero_copy_only=False)  # the non-null rows' values only
    if valid.all() and not copy:
        return flat.astype(dtype, copy=False).reshape(n, d), valid
    out = np.zeros((n, d), dtype)
    out[valid] = flat.reshape(n, d)[valid] if fixed else flat.reshape(-1, d)
    return out, valid
