"""Resume: a driver killed (SIGKILL) after some shards were committed, started again, must not
fetch or upload those shards again and must end with every input row exactly once; a re-run
of the finished job must change nothing at all."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from testkit.http_server import FaultServer
from testkit.synthetic import generate_world

from .conftest import REPO, VENV, Stack

ROWS = 160
PER_SHARD = 20
SHARDS = ROWS // PER_SHARD


def _submit(stack: Stack, job_id: str, args: list[str], wait: bool = True) -> subprocess.CompletedProcess:
    cmd = [str(VENV / "bin" / "ray"), "job", "submit", "--address", stack.state["RAY_ADDRESS"],
           "--submission-id", job_id, "--working-dir", str(REPO)]
    cmd += [] if wait else ["--no-wait"]
    return subprocess.run([*cmd, "--", "python", "jobs/embed_laion.py", *args], capture_output=True,
                          text=True, timeout=400, env=stack.client_env(), cwd=REPO)


def _driver_pid(marker: str) -> int | None:
    """Pid of the job's driver: the process whose command line is our entry point with this
    test's unique bucket name (so no other process can match)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(a.endswith(b"jobs/embed_laion.py") for a in argv) and any(marker.encode() in a for a in argv):
            return int(entry.name)
    return None


def _manifests(stack: Stack, bucket: str) -> set[str]:
    return {k.rsplit("/", 1)[1].split(".")[0] for k in stack.objects(bucket, "run/shards/")
            if k.endswith(".manifest.json")}


def _settled(stack: Stack, bucket: str, quiet_s: float = 3.0, limit_s: float = 60.0) -> dict:
    """The object listing once it stopped changing for ``quiet_s`` (work of the killed driver's
    workers may still land for a moment after the kill)."""
    last, since, deadline = stack.objects(bucket), time.monotonic(), time.monotonic() + limit_s
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = stack.objects(bucket)
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return now
    raise AssertionError("objects kept changing after the driver was killed")


@pytest.mark.slow
def test_killed_run_resumes_without_refetching_and_rerun_changes_nothing(local_stack: Stack, tmp_path) -> None:
    stack = local_stack
    bucket = stack.new_bucket()
    root = tmp_path / "world"
    with FaultServer() as srv:
        world = generate_world(root, ROWS, 5, srv.base_url + "/", min_side=64, max_side=160)
        srv.root = root.resolve()
        paths = world.column("_gt_path").to_pylist()
        # Later shards answer slowly, so the kill lands while they are in flight.
        urls = [srv.url(p) if i < 2 * PER_SHARD else srv.url(p, delay=0.5) for i, p in enumerate(paths)]
        world = world.set_column(world.column_names.index("url"), "url", pa.array(urls))
        pq.write_table(world, root / "urls.parquet")
        args = [
            "--input", str(root / "urls.parquet"), "--output", f"s3://{bucket}/run",
            "--s3-endpoint-url", stack.s3_endpoint, "--allowed-networks", "127.0.0.1/32",
            "--number-sample-per-shard", str(PER_SHARD), "--image-size", "64",
            "--set", "read.save_additional_columns=_gt_row",
        ]

        # --- 1. SIGKILL the driver once two shards are committed ------------------------------
        started = _submit(stack, f"{bucket}-1", args, wait=False)
        assert started.returncode == 0, started.stdout + started.stderr
        deadline = time.monotonic() + 240
        pid = None
        while len(_manifests(stack, bucket)) < 2:
            assert time.monotonic() < deadline, "no shard was committed in time"
            pid = pid or _driver_pid(bucket)
            time.sleep(0.2)
        pid = pid or _driver_pid(bucket)
        assert pid is not None, "the driver ended before it could be killed"
        os.kill(pid, signal.SIGKILL)
        _settled(stack, bucket)
        committed = _manifests(stack, bucket)
        assert 1 <= len(committed) < SHARDS, committed
        # As if the driver had also died between a shard's commit and its embeddings file: the
        # rerun must embed that shard from its tar, without fetching or uploading it again.
        stack.s3().delete_object(Bucket=bucket, Key=f"run/embeddings/{min(committed)}.parquet")
        before = stack.objects(bucket)
        fetched_before = {p: srv.count("/" + p) for p in paths}
        assert all(fetched_before[paths[i]] == 1 for i in range(ROWS) if f"{i // PER_SHARD:05d}" in committed)

        # --- 2. run again to the end ----------------------------------------------------------
        second = _submit(stack, f"{bucket}-2", args)
        assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-4000:]
        assert f"{SHARDS - len(committed)} to download" in second.stdout
        reembedded = re.search(r"(\d+) committed but not embedded", second.stdout)
        assert reembedded and int(reembedded.group(1)) >= 1, second.stdout[-3000:]
        after = stack.objects(bucket)
        for shard in committed:
            for ext in (".tar", ".parquet", "_stats.json", ".manifest.json"):
                key = f"run/shards/{shard}{ext}"
                assert after[key] == before[key], f"{key} was uploaded again"
        for i, p in enumerate(paths):
            if f"{i // PER_SHARD:05d}" in committed:
                assert srv.count("/" + p) == fetched_before[p], f"row {i} of a committed shard was fetched again"
        assert _manifests(stack, bucket) == {f"{s:05d}" for s in range(SHARDS)}

        fs = pafs.S3FileSystem(endpoint_override=stack.s3_endpoint.split("://")[1], scheme="http",
                               access_key="testing", secret_key="testing", region="us-east-1")
        out = pq.read_table(f"{bucket}/run/embeddings", filesystem=fs)
        assert out.num_rows == ROWS
        assert sorted(out.column("_gt_row").to_pylist()) == list(range(ROWS))
        assert len(set(out.column("key").to_pylist())) == ROWS

        # --- 3. the finished job again: nothing fetched, nothing written -----------------------
        # Run directly (no job API): with nothing to stream the driver never needs Ray.
        requests = srv.count()
        third = subprocess.run([sys.executable, "jobs/embed_laion.py", *args], capture_output=True, text=True,
                               timeout=300, env=stack.driver_env(), cwd=REPO)
        assert third.returncode == 0, third.stdout[-4000:] + third.stderr[-4000:]
        assert "nothing changed" in third.stdout
        assert srv.count() == requests
        assert stack.objects(bucket) == after
