"""Driver killed (SIGKILL) at five points of a run, each followed by a re-run, must end with the
exact input row set: every row once, one embeddings file per shard, no partial tar or temporary
object under a final name, no multipart upload left pending.

The kill points are S3 requests seen by a fault proxy, so each kill lands at a known step:
the proxy SIGKILLs the driver when the n-th matching request arrives and drops that request
(or passes it on first: the object lands, its writer never learns it). The choice of points
(which step, which n, before or after the object lands) is drawn from a seeded generator;
``CLIPCURATE_KILL_SEED=<int>`` explores other draws. Stream kills run on the local stack's Ray
head; once every shard is embedded a re-run needs no Ray, so the global-pass and report kills
are cheap. Then a run with a changed filter is killed between its decisions and its report,
and the re-run must still write the report. tests/jobs/test_job_resume.py covers "a committed
shard is never fetched again".
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
from dataclasses import dataclass

import pytest

from testkit.http_server import FaultServer
from testkit.s3_fault_proxy import S3FaultProxy

from .conftest import Stack
from .driver import (
    Driver,
    check_complete,
    check_whole,
    job_args,
    objects,
    pending_uploads,
    write_world,
)

ROWS = 60
PER_SHARD = 20
SHARDS = ROWS // PER_SHARD
KILLS = 5
SEED = int(os.environ.get("CLIPCURATE_KILL_SEED", "20261125"))


@dataclass(frozen=True)
class KillPoint:
    """Kill the driver at the ``nth`` request ``method`` whose ``bucket/key`` matches ``key``
    (a regex below the run's output); ``forward``: the request reaches S3 first."""

    name: str
    method: str
    key: str
    nth: int
    forward: bool

    def __str__(self) -> str:
        landed = "after it lands" if self.forward else "before it lands"
        return f"{self.name} ({self.method} #{self.nth} of {self.key}, {landed})"


def _plan(rng: random.Random) -> tuple[list[KillPoint | None], list[KillPoint]]:
    """Kill points for runs that still stream (None: "the last embeddings file of this run",
    whose n is known only then) and for runs after the stream."""
    k = rng.randint(1, SHARDS - 1)
    first = rng.choice([
        KillPoint(f"stream: after shard commit {k}", "PUT", r"shards/\d{5}\.manifest\.json$", k, True),
        KillPoint(f"stream: during tar upload {k}", "PUT", r"shards/\d{5}\.tar$", k, False),
    ])
    # The global pass reads every embeddings file three times (schema, decisions, rewrite), so
    # GET n <= 3 * SHARDS always comes; past the first pass over the files, earlier files are
    # already rewritten and later ones are not.
    n = rng.randint(1, 3 * SHARDS)
    tail = [
        KillPoint(f"global pass: embeddings read {n}", "GET", r"embeddings/\d{5}\.parquet$", n, False),
        KillPoint("report: writing _stats.json", "PUT", r"_stats\.json$", 1, rng.random() < 0.5),
        KillPoint("report: writing report.html", "PUT", r"report\.html$", 1, rng.random() < 0.5),
        # Spare, in case the stream finished earlier than planned: reading manifests to resume.
        KillPoint(f"resume plan: manifest read {k}", "GET", r"shards/\d{5}\.manifest\.json$", k, False),
    ]
    return [first, None], tail


def _embedded(files: dict[str, bytes]) -> set[str]:
    return {k for k in files if k.startswith("embeddings/")}


@pytest.mark.slow
def test_driver_killed_at_five_points_then_rerun_ends_with_the_exact_rows(local_stack: Stack, tmp_path) -> None:
    stack = local_stack
    bucket = stack.new_bucket()
    rng = random.Random(SEED)
    stream_points, tail_points = _plan(rng)
    with FaultServer() as srv, S3FaultProxy(stack.s3_endpoint) as proxy:
        urls = write_world(tmp_path / "world", srv, ROWS)
        args = job_args(urls, f"s3://{bucket}/run", proxy.endpoint_url, PER_SHARD)
        running: list[Driver] = []

        def kill_driver() -> None:
            os.kill(running[-1].proc.pid, signal.SIGKILL)

        killed: list[str] = []
        seconds: list[float] = []  # wall time of each run, printed for failures and timing
        while len(killed) < KILLS:
            files = objects(stack, bucket, "run/")
            remaining = SHARDS - len(_embedded(files))
            if remaining and stream_points:
                point = stream_points.pop(0) or KillPoint(
                    "stream: the run's last embeddings file", "PUT", r"embeddings/\d{5}\.parquet$", remaining, True)
            else:
                point = tail_points.pop(0)
            where = f"seed {SEED}, kill {len(killed) + 1}: {point}"
            hook = proxy.intercept(kill_driver, point.method, f"^{bucket}/run/{point.key}", point.nth, point.forward)
            started = time.monotonic()
            running.append(Driver.start(stack, args))
            rc = running[-1].wait(200)
            seconds.append(time.monotonic() - started)
            assert hook.fired.is_set(), f"{where}: the run ended (rc {rc}) before the kill point\n{running[-1].output()}"
            assert rc == -signal.SIGKILL, f"{where}: rc {rc}\n{running[-1].output()}"
            # The killed driver's workers may finish a request or two before Ray stops them;
            # past the stream the driver is the run's only process, so its last request is
            # the one the proxy dropped or passed on.
            proxy.wait_quiet(2.0 if point.name.startswith("stream") else 0.5)
            proxy.clear()
            # Whatever the kill left is whole: no cut tar, no parquet short of its shard's rows.
            check_whole(objects(stack, bucket, "run/"))
            assert pending_uploads(stack, bucket) == [], where
            killed.append(str(point))

        # A writer of a file larger than one part, killed mid-upload, leaves an incomplete
        # multipart upload; the next run aborts it.
        s3 = stack.s3()
        key = "run/embeddings/00001.parquet"
        upload = s3.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
        s3.upload_part(Bucket=bucket, Key=key, UploadId=upload, PartNumber=1, Body=b"x" * 1024)
        before = objects(stack, bucket, "run/")[key.removeprefix("run/")]

        started = time.monotonic()
        final = Driver.start(stack, args)
        rc = final.wait(200)
        seconds.append(time.monotonic() - started)
        print(f"seed {SEED}: " + "; ".join(f"{k} [{t:.1f} s]" for k, t in zip(killed, seconds, strict=False)))
        print(f"final run {seconds[-1]:.1f} s")
        assert rc == 0, f"seed {SEED}, after kills {killed}:\n{final.output()}"
        assert "removed 1 incomplete write(s) an earlier run left" in final.output()
        assert pending_uploads(stack, bucket) == []
        files = objects(stack, bucket, "run/")
        assert files[key.removeprefix("run/")] == before  # aborting never touched the object
        table = check_complete(files, ROWS, PER_SHARD)
        assert len(set(killed)) == KILLS, killed
        assert any(k.startswith("stream") for k in killed) and any(k.startswith("report") for k in killed), killed
        assert json.loads(files["_stats.json"])["kept"] == sum(table.column("keep").to_pylist()) > 0

        # A later run with a stricter filter, killed once the global pass has rewritten the
        # decisions but before its report: the next run must still write the report, or the
        # stats would describe the old filter forever.
        strict = [*args, "--set", "filter.clip_score_threshold=0.99"]
        hook = proxy.intercept(kill_driver, "PUT", rf"^{bucket}/run/_stats\.json$", 1, False)
        running.append(Driver.start(stack, strict))
        rc = running[-1].wait(120)
        assert hook.fired.is_set() and rc == -signal.SIGKILL, running[-1].output()
        proxy.wait_quiet(0.5)
        rerun = Driver.start(stack, strict)
        assert rerun.wait(120) == 0, rerun.output()
        files = objects(stack, bucket, "run/")
        table = check_complete(files, ROWS, PER_SHARD)
        assert sum(table.column("keep").to_pylist()) == 0  # no caption matches its image that well
        assert json.loads(files["_stats.json"])["kept"] == 0, rerun.output()
