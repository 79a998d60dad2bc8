"""Where bytes live: local paths or ``s3://`` URIs, one interface for both.

* :class:`Storage` is the one writer of outputs. :meth:`Storage.write_atomic` commits a file
  whole or not at all: locally to a temporary name in the same directory, fsync, then
  ``os.replace``; on S3 with one ``PutObject`` of the complete object, so a reader sees either
  nothing or the whole file, never a half-written one under its final name. Shard files,
  embeddings Parquet, the report, config.yaml, takedown audits and blocklists, and single-file
  outputs (:func:`write_file`: thresholds YAML, a trained head, a review page, a summary) all
  go through it. It also reads whole small files (:meth:`Storage.read_bytes`), lists a folder
  and checks sizes. What a committed shard is, is :mod:`pipeline.shard_format`'s business.
* :func:`filesystem_for` maps a URI to a pyarrow filesystem plus the path inside it (S3
  endpoint, region and retries from :class:`~pipeline.config.StorageConfig`, falling back to the
  standard ``AWS_*`` variables). It is used for reading only: URL lists, Parquet with column
  projection and datasets over many files, blocklists and shard tars streamed in blocks.
* :meth:`Storage.abort_incomplete_writes` removes what a killed writer leaves behind: incomplete
  multipart uploads on S3 (invisible, but billed until aborted) and temporary files locally.

Why two S3 clients: pyarrow's S3 filesystem is what Arrow's readers (``pq.read_table``,
``pyarrow.dataset``, CSV/JSON readers) take, with ranged reads, so a reader fetches only the
columns and row groups it needs; boto3 gives the writes their one-request atomic commit and
errors that carry the S3 error code, which is how :class:`Storage` tells a missing object
(``FileNotFoundError``) from an unreachable store (:class:`StorageError`).

One retry policy: ``StorageConfig.s3_retries`` is the number of retries after the first
attempt, for both. boto3: ``total_max_attempts = s3_retries + 1``, standard mode (throttling,
5xx and connection errors, jittered exponential backoff), plus the same number of re-reads of a
body that breaks off mid-stream (``_get_body``). pyarrow: ``AwsStandardS3RetryStrategy`` with
``max_attempts = s3_retries + 1`` (its ``max_attempts`` counts the first attempt too, as
measured against a fault proxy in tests/pipeline/test_s3_faults.py). When the retries are
spent, Storage raises :class:`StorageError` naming the operation and ``s3://bucket/key``; a
pyarrow read raises pyarrow's ``OSError``, which names the S3 operation. A missing object is
``FileNotFoundError``, never ``StorageError``, so callers can tell "absent" from
"unreachable". (Model weights given as ``s3://`` are fetched by clip_model/pretrained.py with
its own client: clip_model imports nothing from pipeline.)
"""

from __future__ import annotations

import os
import posixpath
import re
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pyarrow.fs as pafs

from pipeline.config import StorageConfig

# Names of temporary files write_atomic writes before its rename: ``.<name>.<anything>.tmp-<8 hex>``.
_TEMP_NAME = re.compile(r"^\..+\.tmp-[0-9a-f]{8}$")
_NOT_FOUND = ("404", "NoSuchKey", "NotFound")


class StorageError(RuntimeError):
    """An S3 request failed after its retries; the message names the operation and the object.

    Deliberately not an ``OSError``: stages record an unreadable *input* row as a per-row
    failure by catching ``OSError``, and an unreachable object store must not turn into rows
    marked failed; it fails the task instead, so the shard is redone on the next run.
    """


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b -> ("bucket", "a/b")``."""
    rest = uri[len("s3://") :]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise ValueError(f"{uri!r} has no bucket")
    return bucket, key.strip("/")


def _endpoint(cfg: StorageConfig) -> str | None:
    return (
        cfg.s3_endpoint_url
        or os.environ.get("AWS_ENDPOINT_URL_S3")
        or os.environ.get("AWS_ENDPOINT_URL")
        or None
    )


def _region(cfg: StorageConfig) -> str | None:
    return cfg.s3_region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")


# Read-ahead of a sequential stream, bytes. Without it an object store answers every read with a
# ranged GET of its own, and tarfile reads 10 KB at a time: an 8.5 MB tar on the local S3 server
# took 826 requests and 6.9 s, against 3 requests and 0.1 s with this buffer
# (bench/s3_tar_reads.py). On S3 each request is a round trip and a request charge.
STREAM_READ_AHEAD = 4 << 20


def open_sequential(fs: pafs.FileSystem, path: str) -> Any:
    """An input stream over ``path`` on ``fs`` that fetches ``STREAM_READ_AHEAD`` bytes per
    request, for readers that take small pieces in order (tarfile)."""
    return fs.open_input_stream(path, buffer_size=STREAM_READ_AHEAD)


def filesystem_for(uri: str, cfg: StorageConfig | None = None) -> tuple[pafs.FileSystem, str]:
    """Return ``(filesystem, path)`` for a local path or an ``s3://bucket/key`` URI.

    For S3 the path is ``bucket/key`` as pyarrow expects; credentials come from the standard
    AWS variables or the instance profile (pyarrow's default chain).
    """
    cfg = cfg or StorageConfig()
    if is_s3(uri):
        endpoint = _endpoint(cfg)
        kwargs: dict[str, Any] = {
            # max_attempts counts the first attempt (max_attempts=1: no retry).
            "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=cfg.s3_retries + 1),
            # A file smaller than one part (our Parquet files) then goes up as one PutObject when
            # closed, instead of CreateMultipartUpload at open: a writer killed or failing
            # mid-write leaves no incomplete multipart upload behind.
            "allow_delayed_open": True,
        }
        region = _region(cfg)
        if region:
            kwargs["region"] = region
        if endpoint:
            scheme, _, host = endpoint.partition("://")
            kwargs["endpoint_override"] = host or endpoint
            kwargs["scheme"] = scheme if host else "https"
        bucket, key = split_s3(uri)
        return pafs.S3FileSystem(**kwargs), f"{bucket}/{key}" if key else bucket
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


def _boto3_client(cfg: StorageConfig) -> Any:
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=_endpoint(cfg),
        region_name=_region(cfg) or "us-east-1",
        # botocore's "max_attempts" means retries in some modes and attempts in others;
        # "total_max_attempts" always counts the first attempt.
        config=Config(retries={"total_max_attempts": cfg.s3_retries + 1, "mode": "standard"}),
    )


def _s3_failure(op: str, bucket: str, key: str, cfg: StorageConfig, e: Exception) -> StorageError:
    retries = None
    response = getattr(e, "response", None)
    if isinstance(response, dict):
        retries = response.get("ResponseMetadata", {}).get("RetryAttempts")
    done = f"{retries + 1} attempt(s)" if isinstance(retries, int) else "its retries"
    return StorageError(
        f"S3 {op} s3://{bucket}/{key} failed after {done} "
        f"(storage.s3_retries={cfg.s3_retries}): {type(e).__name__}: {e}"
    )


def _get_body(client: Any, bucket: str, key: str, retries: int) -> bytes:
    """GetObject and read its body. botocore retries the request but not a connection that
    drops while the body streams; that is retried here, ``retries`` times, with the same
    jittered backoff idea. The last failure propagates (``_s3_call`` names the object)."""
    import random
    import time

    from botocore.exceptions import IncompleteReadError, ReadTimeoutError, ResponseStreamingError

    for attempt in range(retries + 1):
        body = client.get_object(Bucket=bucket, Key=key)["Body"]
        try:
            return body.read()
        except (IncompleteReadError, ResponseStreamingError, ReadTimeoutError):
            body.close()
            if attempt == retries:
                raise
            time.sleep(random.uniform(0, min(2.0, 0.05 * 2**attempt)))
    raise AssertionError("unreachable")


def _is_not_found(e: Exception) -> bool:
    response = getattr(e, "response", None)
    if not isinstance(response, dict):
        return False
    err = response.get("Error", {})
    return err.get("Code") in _NOT_FOUND or str(
        response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    ) == "404"


def write_file(uri: str, data: bytes, cfg: StorageConfig | None = None) -> None:
    """Write ``data`` as the file ``uri`` (local path or ``s3://bucket/key``) with
    :meth:`Storage.write_atomic` of its folder: what every single-file output (a thresholds
    YAML, a head, a review page, a summary) is written with."""
    folder, _, name = uri.rstrip("/").rpartition("/")
    Storage(folder, cfg or StorageConfig()).write_atomic(name, data)


@dataclass
class Storage:
    """A folder (local or ``s3://``) holding shard files.

    Paths given to the methods are relative to ``root`` and use ``/``.
    """

    root: str
    cfg: StorageConfig = field(default_factory=StorageConfig)

    def __post_init__(self) -> None:
        self.root = self.root.rstrip("/") if is_s3(self.root) else os.path.abspath(
            os.path.expanduser(self.root.removeprefix("file://"))
        )
        self._s3: Any = None

    # The boto3 client is made lazily: Storage objects travel to Ray workers by pickle.
    def __getstate__(self) -> dict[str, Any]:
        return {"root": self.root, "cfg": self.cfg}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.root = state["root"]
        self.cfg = state["cfg"]
        self._s3 = None

    @property
    def _client(self) -> Any:
        if self._s3 is None:
            self._s3 = _boto3_client(self.cfg)
        return self._s3

    def uri(self, rel: str) -> str:
        """Full URI (or absolute local path) of a file under the root."""
        if is_s3(self.root):
            return f"{self.root}/{rel}"
        return os.path.join(self.root, *rel.split("/"))

    def _bucket_key(self, rel: str) -> tuple[str, str]:
        bucket, prefix = split_s3(self.root)
        return bucket, posixpath.join(prefix, rel) if prefix else rel

    def write_atomic(self, rel: str, data: bytes) -> None:
        """Write ``data`` under ``rel`` so that no reader ever sees a partial file."""
        if is_s3(self.root):
            bucket, key = self._bucket_key(rel)
            # One PutObject: S3 makes the object visible only once it is complete.
            self._s3_call("PUT", bucket, key, lambda c: c.put_object(Bucket=bucket, Key=key, Body=data))
            return
        final = self.uri(rel)
        directory = os.path.dirname(final)
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(
            prefix=f".{os.path.basename(final)}.", suffix=f".tmp-{uuid.uuid4().hex[:8]}", dir=directory
        )
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    def _s3_call(self, op: str, bucket: str, key: str, call: Callable[[Any], Any]) -> Any:
        """``call(client)``; a failure after the client's retries becomes StorageError (or
        FileNotFoundError for a missing object)."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return call(self._client)
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") == "NoSuchBucket":
                raise StorageError(f"S3 {op} s3://{bucket}/{key}: bucket {bucket!r} does not exist") from e
            if _is_not_found(e) and op != "PUT":
                raise FileNotFoundError(f"s3://{bucket}/{key} does not exist") from e
            raise _s3_failure(op, bucket, key, self.cfg, e) from e
        except BotoCoreError as e:  # connection refused or reset, timeouts, truncated bodies
            raise _s3_failure(op, bucket, key, self.cfg, e) from e

    def read_bytes(self, rel: str) -> bytes:
        """The whole file. Raises FileNotFoundError when it does not exist, StorageError when
        S3 cannot be read after the retries."""
        if is_s3(self.root):
            bucket, key = self._bucket_key(rel)
            return self._s3_call("GET", bucket, key, lambda c: _get_body(c, bucket, key, self.cfg.s3_retries))
        with open(self.uri(rel), "rb") as f:
            return f.read()

    def size(self, rel: str) -> int | None:
        """Size in bytes, or None when the file does not exist."""
        if is_s3(self.root):
            bucket, key = self._bucket_key(rel)
            try:
                head = self._s3_call("HEAD", bucket, key, lambda c: c.head_object(Bucket=bucket, Key=key))
            except FileNotFoundError:
                return None
            return int(head["ContentLength"])
        try:
            return os.path.getsize(self.uri(rel))
        except FileNotFoundError:
            return None

    def list_names(self) -> list[str]:
        """Names of the files directly under the root (not recursive), sorted."""
        if is_s3(self.root):
            bucket, prefix = split_s3(self.root)
            pre = f"{prefix}/" if prefix else ""
            def listing(c: Any) -> list[str]:
                names: list[str] = []
                for page in c.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=pre, Delimiter="/"):
                    names.extend(obj["Key"][len(pre) :] for obj in page.get("Contents", []))
                return names

            return sorted(self._s3_call("LIST", bucket, pre, listing))
        if not os.path.isdir(self.root):
            return []
        return sorted(e.name for e in os.scandir(self.root) if e.is_file())

    def abort_incomplete_writes(self) -> list[str]:
        """Remove what killed or failed writers left under the root; returns what was removed.

        On S3: abort every incomplete multipart upload whose key is under the root (S3 keeps
        their parts, billed and invisible, until aborted). Locally: delete temporary files of
        an atomic write that never got renamed (``.<name>...tmp-<hex>``), in any subfolder.
        Call it only while no other writer works on this root (one run per output)."""
        removed: list[str] = []
        if not is_s3(self.root):
            if not os.path.isdir(self.root):
                return removed
            for folder, _, files in os.walk(self.root):
                for name in files:
                    if _TEMP_NAME.match(name):
                        path = os.path.join(folder, name)
                        try:
                            os.unlink(path)
                        except FileNotFoundError:
                            continue
                        removed.append(path)
            return sorted(removed)
        bucket, prefix = split_s3(self.root)
        pre = f"{prefix}/" if prefix else ""

        def pending(c: Any) -> list[tuple[str, str]]:
            out = []
            for page in c.get_paginator("list_multipart_uploads").paginate(Bucket=bucket, Prefix=pre):
                out.extend((u["Key"], u["UploadId"]) for u in page.get("Uploads", []))
            return out

        for key, upload_id in self._s3_call("LIST-UPLOADS", bucket, pre, pending):
            try:
                self._s3_call(
                    "ABORT-UPLOAD", bucket, key,
                    lambda c, k=key, u=upload_id: c.abort_multipart_upload(Bucket=bucket, Key=k, UploadId=u),
                )
            except FileNotFoundError:  # NoSuchUpload: completed or aborted meanwhile
                continue
            removed.append(f"s3://{bucket}/{key} (upload {upload_id})")
        return removed
