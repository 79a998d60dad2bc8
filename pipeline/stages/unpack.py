"""Unpack stage: the image bytes of an img2dataset output's rows, read from its tars instead of
downloaded (``read.input_format: img2dataset``). It takes the download stage's place in the
graph and sets the same columns, so decode, shard and everything after run unchanged: the
images are decoded (in the crash-guarded child, with the same bomb and format checks), stored
in this job's own shards and embedded, and a row keeps the one output row it had.

Columns in: the read stage's, with ``source_key``, ``_source_status``, ``_source_error``,
``_source_tar`` and, where the table has them, the original's recorded sha256 and size
(pipeline/stages/read.py; the decode stage uses the size to cut border padding off a stored
copy and to report the original's size). Columns added, as the download stage's:
``image_bytes`` (the tar member's bytes, for rows that end ``ok``), ``http_status`` and
``download_s`` (null: nothing was requested), ``embedded_from`` (``"stored"``: the model will
see that output's stored copy, not the original), ``source_sha256``: the sha256 of the original
download as the output recorded it (img2dataset's ``sha256`` column; a clipcurate shard's
``source_sha256``), else of the tar member's bytes.

Status of a row that was ``ok`` on input:

- the output says it stored the image (img2dataset: ``success``; a clipcurate shard: ``ok``)
  and ``<source_key>.<jpg|jpeg|png|webp>`` is in the tar: ``ok``, unless a blocklist names its
  URL or domain, the member's bytes, or the original's recorded sha256 (``blocked``), or the
  member is larger than ``download.max_bytes`` (``too_large``, not read). PDQ lists apply in
  the decode stage as for a download (PDQ survives the resize; exact hashes do not);
- it says so but the tar lacks the member, or is missing or unreadable from some point on:
  ``source_missing``, the error naming the tar (a tar cut between two members reads as one
  that ends there: its later rows say they have no image in it);
- a clipcurate shard's failure status (``http_404``, ``decode_error``, ...) is kept as it is;
- any other status (img2dataset's ``failed_to_download``, ``failed_to_resize``):
  ``source_failed``, the error ``"<its status>: <its error_message>"``.

One pass over each tar, streamed (never seeked, never extracted to disk; only regular files
are looked at), stopping once every wanted image was found. Storage errors other than a
missing tar raise, so the scheduler retries the shard as it does a failed input read.
"""

from __future__ import annotations

import hashlib
import posixpath
import tarfile
from dataclasses import dataclass, field
from typing import ClassVar

import pyarrow as pa

from pipeline import schema as S
from pipeline.blocklist import DOWNLOAD_KINDS, BlocklistSpec, get_blocklist
from pipeline.config import StorageConfig
from pipeline.stages.base import Resources, Stage
from pipeline.storage import filesystem_for, open_sequential

# Extensions img2dataset's encode_format writes (and WebDataset's usual image ones).
IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "webp"})
# What the source calls a stored image: img2dataset's status, and a clipcurate shard's.
_STORED = frozenset({"success", S.OK})


@dataclass
class _Member:
    data: bytes | None  # None: larger than the cap, not read
    size: int


def read_tar_images(uri: str, keys: set[str], max_bytes: int,
                    storage: StorageConfig | None = None) -> tuple[dict[str, _Member], str | None]:
    """One streamed pass over the tar at ``uri``: ``{key: member}`` for the image members
    named ``<key>.<ext>`` (``ext`` in :data:`IMAGE_EXTENSIONS`; the first one per key), and the
    reason the pass ended early (the tar is missing, truncated or not a tar), else None.
    A member over ``max_bytes`` (bytes) is skipped unread (``data`` None)."""
    found: dict[str, _Member] = {}
    fs, path = filesystem_for(uri, storage)
    try:
        with open_sequential(fs, path) as raw, tarfile.open(fileobj=raw, mode="r|") as tar:
            for m in tar:
                if not m.isfile():
                    continue
                # WebDataset's rule: the key is the path up to the first dot of the file name.
                folder, name = posixpath.split(m.name)
                stem, _, ext = name.partition(".")
                key = posixpath.join(folder, stem) if folder else stem
                if key not in keys or key in found or ext.lower() not in IMAGE_EXTENSIONS:
                    continue
                if m.size > max_bytes:
                    found[key] = _Member(None, m.size)
                else:
                    f = tar.extractfile(m)
                    assert f is not None  # a regular file
                    data = f.read()
                    if len(data) != m.size:  # the tar ends inside this member
                        raise tarfile.ReadError(f"{m.name}: {len(data)} of {m.size} bytes")
                    found[key] = _Member(data, m.size)
                if len(found) == len(keys):
                    break
    except FileNotFoundError:
        return found, f"{uri} does not exist"
    except (tarfile.TarError, EOFError) as e:
        return found, f"{uri} is not readable after {len(found)} image(s): {type(e).__name__}: {e}"
    return found, None


@dataclass
class UnpackStage(Stage):
    """Image bytes from an img2dataset output's tars; see the module docstring."""

    io_bound: ClassVar[bool] = True  # a streamed read of a tar, often from S3

    resources: Resources = field(default_factory=lambda: Resources(num_cpus=0))
    max_bytes: int = 32 * 1024 * 1024
    storage: StorageConfig = field(default_factory=StorageConfig)
    blocklist: BlocklistSpec | None = None

    def process_batch(self, batch: pa.Table) -> pa.Table:
        """Fill the download columns of ``batch`` from the tars its rows name."""
        n = batch.num_rows
        statuses = S.column_list(batch, S.STATUS) if S.STATUS in batch.column_names else [S.OK] * n
        errors = S.column_list(batch, S.ERROR)
        keys = S.column_list(batch, S.SOURCE_KEY)
        source_status = S.column_list(batch, S.SOURCE_STATUS)
        source_error = S.column_list(batch, S.SOURCE_ERROR)
        tars = S.column_list(batch, S.SOURCE_TAR)
        originals = S.column_list(batch, S.SOURCE_ORIGINAL_SHA256)
        urls = S.column_list(batch, S.URL)
        lists = get_blocklist(self.blocklist, DOWNLOAD_KINDS)
        bodies: list[bytes | None] = [None] * n
        digests: list[str | None] = [None] * n
        wanted: dict[str, dict[str, int]] = {}
        for i in range(n):
            if statuses[i] != S.OK:
                continue
            status = source_status[i]
            if status not in _STORED:
                if S.is_failure_status(status):  # a clipcurate table's own word for it
                    statuses[i], errors[i] = status, source_error[i]
                else:
                    statuses[i] = S.SOURCE_FAILED
                    label = status if isinstance(status, str) and status else "no status"
                    errors[i] = f"{label}: {source_error[i]}" if source_error[i] else label
                continue
            hit = lists.check_url(urls[i]) if lists is not None else None
            if hit is not None:  # the list says never store it, wherever it came from
                statuses[i], errors[i] = S.BLOCKED, hit.reason()
            elif not keys[i] or not tars[i]:
                statuses[i], errors[i] = S.SOURCE_MISSING, "the source table gives no key for this row"
            else:
                wanted.setdefault(tars[i], {})[keys[i]] = i
        for tar, rows in wanted.items():
            found, broken = read_tar_images(tar, set(rows), self.max_bytes, self.storage)
            for key, i in rows.items():
                member = found.get(key)
                if member is None:
                    statuses[i] = S.SOURCE_MISSING
                    errors[i] = broken or f"{key} has no image in {tar}"
                elif member.data is None:
                    statuses[i] = S.TOO_LARGE
                    errors[i] = f"{key} in {tar} is {member.size} bytes, over max_bytes {self.max_bytes}"
                else:
                    digest = hashlib.sha256(member.data).digest()
                    original = _digest(originals[i])
                    hit = None
                    if lists is not None:
                        hit = lists.check_bytes(member.data, digest)
                        if hit is None and original is not None:
                            hit = lists.check_sha256(original)
                    if hit is not None:
                        statuses[i], errors[i] = S.BLOCKED, hit.reason()
                    else:
                        bodies[i], digests[i] = member.data, (original or digest).hex()
        out = S.set_column(batch, S.STATUS, pa.array(statuses, pa.string()))
        out = S.set_column(out, S.ERROR, pa.array(errors, pa.string()))
        out = S.set_column(out, S.IMAGE_BYTES, S.binary_column(bodies))
        out = S.set_column(out, S.HTTP_STATUS, pa.array([None] * n, pa.int32()))
        out = S.set_column(out, S.DOWNLOAD_S, pa.array([None] * n, pa.float32()))
        out = S.set_column(out, S.SOURCE_SHA256, pa.array(digests, pa.string()))
        # What the model will see is the copy that output stored, not the original (the decode
        # stage cuts img2dataset's border padding off it: DecodeOptions.unpad).
        return S.set_column(out, S.EMBEDDED_FROM, pa.array(["stored" if b is not None else None for b in bodies],
                                                           pa.string()))


def _digest(hex_text: str | None) -> bytes | None:
    """32 bytes from a recorded hex sha256; None when absent or not a sha256."""
    if not isinstance(hex_text, str) or len(hex_text) != 64:
        return None
    try:
        return bytes.fromhex(hex_text)
    except ValueError:
        return None
