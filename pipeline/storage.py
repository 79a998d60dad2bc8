"""Where bytes live: local paths or ``s3://`` URIs, one interface for both.

* :func:`filesystem_for` maps a URI to a pyarrow filesystem plus the path inside it (S3
  endpoint, region and retries from :class:`~pipeline.config.StorageConfig`, falling back to the
  standard ``AWS_*`` variables), used to read URL lists.
* :class:`Storage` writes shard files with an atomic commit: locally to a temporary name in the
  same directory, then ``os.replace``; on S3 with one ``PutObject`` of the complete object, so
  a reader sees either nothing or the whole file, never a half-written shard under its final
  name.
* :meth:`Storage.committed_shards` lists the shards a previous run finished, for resume. A shard
  is committed when its manifest exists and the tar and parquet it names exist with the sizes
  it records (the manifest is written last, so it is the commit marker).
"""

from __future__ import annotations

import json
import os
import posixpath
import tempfile
import uuid
from dataclasses import dataclass, field
from typing import Any

import pyarrow.fs as pafs

from pipeline.config import StorageConfig

MANIFEST_SUFFIX = ".manifest.json"


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


def filesystem_for(uri: str, cfg: StorageConfig | None = None) -> tuple[pafs.FileSystem, str]:
    """Return ``(filesystem, path)`` for a local path or an ``s3://bucket/key`` URI.

    For S3 the path is ``bucket/key`` as pyarrow expects; credentials come from the standard
    AWS variables or the instance profile (pyarrow's default chain).
    """
    cfg = cfg or StorageConfig()
    if is_s3(uri):
        endpoint = _endpoint(cfg)
        kwargs: dict[str, Any] = {
            "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=max(1, cfg.s3_retries)),
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
        config=Config(retries={"max_attempts": max(1, cfg.s3_retries), "mode": "standard"}),
    )


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
            self._client.put_object(Bucket=bucket, Key=key, Body=data)
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

    def read_bytes(self, rel: str) -> bytes:
        if is_s3(self.root):
            bucket, key = self._bucket_key(rel)
            return self._client.get_object(Bucket=bucket, Key=key)["Body"].read()
        with open(self.uri(rel), "rb") as f:
            return f.read()

    def size(self, rel: str) -> int | None:
        """Size in bytes, or None when the file does not exist."""
        if is_s3(self.root):
            bucket, key = self._bucket_key(rel)
            try:
                return int(self._client.head_object(Bucket=bucket, Key=key)["ContentLength"])
            except self._client.exceptions.ClientError as e:
                if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                    return None
                raise
        try:
            return os.path.getsize(self.uri(rel))
        except FileNotFoundError:
            return None

    def list_names(self) -> list[str]:
        """Names of the files directly under the root (not recursive), sorted."""
        if is_s3(self.root):
            bucket, prefix = split_s3(self.root)
            pre = f"{prefix}/" if prefix else ""
            names: list[str] = []
            paginator = self._client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=bucket, Prefix=pre, Delimiter="/"):
                for obj in page.get("Contents", []):
                    names.append(obj["Key"][len(pre) :])
            return sorted(names)
        if not os.path.isdir(self.root):
            return []
        return sorted(e.name for e in os.scandir(self.root) if e.is_file())

    def read_manifest(self, shard: str) -> dict[str, Any] | None:
        try:
            return json.loads(self.read_bytes(f"{shard}{MANIFEST_SUFFIX}"))
        except (FileNotFoundError, ValueError):
            return None
        except Exception as e:  # boto3 NoSuchKey has no common base we can name without boto3
            if type(e).__name__ in ("NoSuchKey", "ClientError"):
                return None
            raise

    def manifest_matches(self, manifest: dict[str, Any]) -> bool:
        """True when every file a manifest names exists with the size it records."""
        files = manifest.get("files")
        if not isinstance(files, dict) or not files:
            return False
        return all(
            isinstance(info, dict) and self.size(name) == info.get("size")
            for name, info in files.items()
        )

    def committed_shards(self) -> set[str]:
        """Shard names (``"00012"``) whose manifest exists and matches the files on storage."""
        done: set[str] = set()
        for name in self.list_names():
            if not name.endswith(MANIFEST_SUFFIX) or name.startswith("."):
                continue
            shard = name[: -len(MANIFEST_SUFFIX)]
            manifest = self.read_manifest(shard)
            if manifest is not None and self.manifest_matches(manifest):
                done.add(shard)
        return done
