"""Helpers for job tests that run ``python jobs/embed_laion.py`` as a driver process joined to
the local stack's Ray head, with its S3 traffic through an :class:`S3FaultProxy`, and check
the output it leaves: every input row exactly once, whole files only, nothing pending."""

from __future__ import annotations

import hashlib
import io
import json
import re
import subprocess
import sys
import tarfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from testkit.http_server import FaultServer
from testkit.synthetic import generate_world

from .conftest import REPO, Stack

SHARD_FILE = re.compile(r"^(\d{5})(\.tar|\.parquet|_stats\.json|\.manifest\.json)$")


def write_world(root: Path, srv: FaultServer, rows: int, seed: int = 3) -> Path:
    """A synthetic URL list of ``rows`` small images served by ``srv``; returns its path."""
    table = generate_world(root, rows, seed, srv.base_url + "/", min_side=48, max_side=96)
    srv.root = root.resolve()
    pq.write_table(table, root / "urls.parquet")
    return root / "urls.parquet"


def job_args(urls: Path, output: str, endpoint: str, per_shard: int, *extra: str) -> list[str]:
    return [
        "--input", str(urls), "--output", output, "--s3-endpoint-url", endpoint,
        "--allowed-networks", "127.0.0.1/32", "--number-sample-per-shard", str(per_shard),
        "--image-size", "48",
        "--set", "read.save_additional_columns=_gt_row", *extra,
    ]


@dataclass
class Driver:
    """A running driver; ``lines`` collects its stdout and stderr as they come."""

    proc: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)
    _reader: threading.Thread | None = None

    @classmethod
    def start(cls, stack: Stack, args: list[str]) -> Driver:
        env = stack.driver_env()
        proc = subprocess.Popen(
            [sys.executable, "jobs/embed_laion.py", *args], cwd=REPO, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        driver = cls(proc)
        driver._reader = threading.Thread(target=driver._read, daemon=True)
        driver._reader.start()
        return driver

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait(self, timeout: float) -> int:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"driver still running after {timeout} s:\n{self.output()}") from None
        if self._reader is not None:
            self._reader.join(10)
        return rc

    def output(self, last: int = 60) -> str:
        return "\n".join(self.lines[-last:])


def objects(stack: Stack, bucket: str, prefix: str) -> dict[str, bytes]:
    """key (relative to ``prefix``) -> bytes of every object under ``prefix``, read directly
    from the server (not through the proxy)."""
    s3 = stack.s3()
    out = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            try:
                out[obj["Key"][len(prefix):]] = s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
            except Exception as e:
                raise AssertionError(f"reading {obj['Key']} ({obj['Size']} bytes): {e}") from e
    return out


def pending_uploads(stack: Stack, bucket: str) -> list[str]:
    return [u["Key"] for u in stack.s3().list_multipart_uploads(Bucket=bucket).get("Uploads", [])]


def check_whole(files: dict[str, bytes]) -> set[str]:
    """Assert every object under the output root is whole and returns the committed shards.

    ``files``: key relative to the output root -> bytes. Every shard file has a final name
    (no temporary or stray names); every tar reads to its end; every Parquet file reads; a
    manifest's files exist with the size and sha256 it records and its tar holds exactly its
    keys; an embeddings file belongs to a committed shard and holds that shard's row count.
    """
    shards = {k.split("/", 1)[1]: v for k, v in files.items() if k.startswith("shards/")}
    embeddings = {k.split("/", 1)[1]: v for k, v in files.items() if k.startswith("embeddings/")}
    others = sorted(k for k in files if not k.startswith(("shards/", "embeddings/")))
    assert set(others) <= {"config.yaml", "_stats.json", "report.html"}, others
    for name, data in shards.items():
        m = SHARD_FILE.match(name)
        assert m, f"unexpected object shards/{name}"
        if m.group(2) == ".tar":
            with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
                for member in tar:  # reading every member's bytes proves the tar is not cut short
                    f = tar.extractfile(member)
                    assert f is not None and len(f.read()) == member.size, f"shards/{name}: {member.name}"
        elif m.group(2) == ".parquet":
            pq.read_table(pa.BufferReader(data))
        else:
            json.loads(data)
    committed = set()
    counts = {}
    for name, data in shards.items():
        if not name.endswith(".manifest.json"):
            continue
        manifest = json.loads(data)
        shard = name[: -len(".manifest.json")]
        for fname, info in manifest["files"].items():
            assert fname in shards, f"manifest {name} names missing {fname}"
            assert len(shards[fname]) == info["size"], f"{fname}: size differs from its manifest"
            assert hashlib.sha256(shards[fname]).hexdigest() == info["sha256"], f"{fname}: sha256 differs"
        with tarfile.open(fileobj=io.BytesIO(shards[f"{shard}.tar"]), mode="r:") as tar:
            keys = sorted({m.name.split(".", 1)[0] for m in tar})
        assert keys == sorted(manifest["keys"]), f"{shard}.tar does not hold its manifest's keys"
        committed.add(shard)
        counts[shard] = manifest["count"]
    for name, data in embeddings.items():
        assert re.fullmatch(r"\d{5}\.parquet", name), f"unexpected object embeddings/{name}"
        shard = name[: -len(".parquet")]
        assert shard in committed, f"embeddings/{name} exists but shard {shard} is not committed"
        table = pq.read_table(pa.BufferReader(data))
        assert table.num_rows == counts[shard], f"embeddings/{name}: {table.num_rows} rows, shard has {counts[shard]}"
    return committed


def check_complete(files: dict[str, bytes], rows: int, per_shard: int) -> pa.Table:
    """Assert a finished output: whole files, one embeddings file per planned shard, every
    input row exactly once (by ``_gt_row`` and by key), stats matching the rows. Returns the
    rows."""
    committed = check_whole(files)
    shards = {f"{i:05d}" for i in range((rows + per_shard - 1) // per_shard)}
    assert committed == shards
    names = sorted(k for k in files if k.startswith("embeddings/"))
    assert names == [f"embeddings/{s}.parquet" for s in sorted(shards)]
    table = pa.concat_tables([pq.read_table(pa.BufferReader(files[n])) for n in names], promote_options="permissive")
    assert sorted(table.column("_gt_row").to_pylist()) == list(range(rows))
    assert len(set(table.column("key").to_pylist())) == rows
    stats = json.loads(files["_stats.json"])
    assert "report.html" in files
    assert stats["rows"] == rows and sum(stats["status"].values()) == rows, stats["status"]
    return table
