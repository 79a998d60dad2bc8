"""The whole job against a misbehaving S3 (a fault proxy in front of the local server): the
first PUT of objects on every write path answered 503 SlowDown, plus an outage of a few seconds
mid-run, still give a complete output; with ``storage.s3_retries=0`` the same faults fail the
run with a message naming the object. The client-level retry counts are pinned in
tests/pipeline/test_s3_faults.py.
"""

from __future__ import annotations

import re
import time

import pytest

from testkit.http_server import FaultServer
from testkit.s3_fault_proxy import S3FaultProxy

from .conftest import Stack
from .driver import Driver, check_complete, job_args, objects, pending_uploads, write_world

ROWS = 40
PER_SHARD = 20
OUTAGE_S = 3.0
# One object per write path gets a SlowDown on its first PUT (each retry costs a backoff of up
# to a second, so not every object): boto3 in the driver (config, report), boto3 in the shard
# actor (shard 00000's files), pyarrow in the writer actor and in the global pass (embeddings).
SLOWED = r"run/(config\.yaml|_stats\.json|report\.html|shards/00000(\.tar|\.parquet|_stats\.json|\.manifest\.json)|embeddings/\d{5}\.parquet)$"


@pytest.mark.slow
def test_job_completes_through_slowdowns_and_an_outage(local_stack: Stack, tmp_path) -> None:
    stack = local_stack
    bucket = stack.new_bucket()
    with FaultServer() as srv, S3FaultProxy(stack.s3_endpoint) as proxy:
        urls = write_world(tmp_path / "world", srv, ROWS)
        slowdowns = proxy.fail(method="PUT", key_pattern=f"^{bucket}/{SLOWED}", per_key=True)
        # Once the first shard is committed, the endpoint goes away for a few seconds: new
        # connections are refused and open ones reset, while decode, shard and write go on.
        went_down: list[float] = []

        def outage() -> None:
            went_down.append(time.monotonic())
            proxy.outage(OUTAGE_S, mode="down")

        hook = proxy.intercept(outage, method="PUT", key_pattern=r"/run/shards/\d{5}\.manifest\.json$", forward=True)
        driver = Driver.start(stack, job_args(urls, f"s3://{bucket}/run", proxy.endpoint_url, PER_SHARD))
        rc = driver.wait(200)
        assert rc == 0, driver.output()
        assert hook.fired.is_set()

        files = objects(stack, bucket, "run/")
        check_complete(files, ROWS, PER_SHARD)
        assert pending_uploads(stack, bucket) == []
        # Each slowed object was refused once, then landed whole.
        slowed = sorted(k for k in files if re.search(SLOWED, f"run/{k}"))
        assert len(slowed) == 3 + 4 + ROWS // PER_SHARD, slowed
        for key in slowed:
            first = proxy.requests("PUT", f"^{bucket}/run/{re.escape(key)}$")[0]
            assert first.faulted, f"{key}: first PUT was not faulted"
        assert slowdowns.hits >= len(slowed)
        # The outage happened mid-run: work was still being written well after it ended.
        back = went_down[0] + OUTAGE_S
        later = [r for r in proxy.requests("PUT") if r.at > back and not r.faulted and r.status == 200]
        assert any("/run/shards/" in r.path for r in later), "no shard was committed after the outage"
        assert any("/run/embeddings/" in r.path for r in later)


@pytest.mark.slow
def test_with_retries_disabled_the_run_fails_naming_the_object(local_stack: Stack, tmp_path) -> None:
    stack = local_stack
    bucket = stack.new_bucket()
    with FaultServer() as srv, S3FaultProxy(stack.s3_endpoint) as proxy:
        urls = write_world(tmp_path / "world", srv, ROWS)
        proxy.fail(method="PUT", key_pattern=f"^{bucket}/{SLOWED}", per_key=True)
        args = job_args(urls, f"s3://{bucket}/run", proxy.endpoint_url, PER_SHARD, "--set", "storage.s3_retries=0")
        driver = Driver.start(stack, args)
        rc = driver.wait(120)
        out = driver.output()
        assert rc != 0, out
        # The first object of the run is its config; one attempt, then a message naming it.
        assert f"S3 PUT s3://{bucket}/run/config.yaml failed after 1 attempt(s) (storage.s3_retries=0)" in out, out
        assert "SlowDown" in out
        assert len(proxy.requests("PUT", f"^{bucket}/run/config.yaml$")) == 1
        assert objects(stack, bucket, "run/") == {}

        # Again: the config has had its one SlowDown, so the run gets as far as the shard
        # actor, whose first tar upload fails inside Ray; the driver still names the object.
        driver = Driver.start(stack, args)
        rc = driver.wait(200)
        out = driver.output(200)
        assert rc != 0, out
        assert f"S3 PUT s3://{bucket}/run/shards/00000.tar failed after 1 attempt(s) (storage.s3_retries=0)" in out, out
        assert len(proxy.requests("PUT", f"^{bucket}/run/shards/00000.tar$")) == 1
        assert "shards/00000.manifest.json" not in objects(stack, bucket, "run/")
