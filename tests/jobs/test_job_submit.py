"""`ray job submit ... -- python jobs/embed_laion.py` against a local head, output on local S3.

The synthetic world is served by a FaultServer in this process (loopback), with a few rows
turned into failures, so the output must carry every input row once with its status.
"""

from __future__ import annotations

import io
import json
import subprocess
import tarfile
import urllib.request

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline import job_config as J
from testkit.http_server import FaultServer
from testkit.synthetic import generate_world

from .conftest import REPO, VENV, Stack

ROWS = 120
PER_SHARD = 40
# Rows whose URL gets a fault, and the status each must end with.
FAULTS = {5: ("404", "http_404"), 47: ("optout", "opt_out"), 90: ("bomb_png", "too_many_pixels")}


def _world(tmp_path, srv: FaultServer) -> pa.Table:
    root = tmp_path / "world"
    table = generate_world(root, ROWS, 11, srv.base_url + "/", min_side=64, max_side=200, unsafe_rate=0.2)
    srv.root = root.resolve()
    urls = table.column("url").to_pylist()
    for row, (fault, _) in FAULTS.items():
        path = table.column("_gt_path")[row].as_py()
        urls[row] = srv.url(path, optout="noai") if fault == "optout" else srv.url(path, fault)
    return table.set_column(table.column_names.index("url"), "url", pa.array(urls))


def _s3fs(stack: Stack) -> pafs.S3FileSystem:
    return pafs.S3FileSystem(
        endpoint_override=stack.s3_endpoint.split("://")[1], scheme="http",
        access_key="testing", secret_key="testing", region="us-east-1",
    )


@pytest.mark.slow
def test_ray_job_submit_writes_a_complete_output_on_s3(local_stack: Stack, tmp_path) -> None:
    stack = local_stack
    bucket = stack.new_bucket()
    with FaultServer() as srv:
        world = _world(tmp_path, srv)
        buf = io.BytesIO()
        pq.write_table(world, buf)
        stack.s3().put_object(Bucket=bucket, Key="lists/urls.parquet", Body=buf.getvalue())
        args = [
            "--input", f"s3://{bucket}/lists/urls.parquet",
            "--output", f"s3://{bucket}/run",
            "--s3-endpoint-url", stack.s3_endpoint,
            "--allowed-networks", "127.0.0.1/32",
            "--number-sample-per-shard", str(PER_SHARD),
            "--image-size", "64",
            "--clip-score-threshold", "0.0",
            "--set", "download.timeout=20",
            "--set", "read.save_additional_columns=_gt_row,_gt_sha256",
            "--set", "moderate.concepts={hazard: [a hazard sign]}",
        ]
        submit = subprocess.run(
            [str(VENV / "bin" / "ray"), "job", "submit", "--address", stack.state["RAY_ADDRESS"],
             "--submission-id", f"g-{bucket}", "--working-dir", str(REPO), "--",
             "python", "jobs/embed_laion.py", *args],
            capture_output=True, text=True, timeout=400, env=stack.client_env(), cwd=REPO,
        )
        requested = srv.count()
    assert submit.returncode == 0, submit.stdout[-4000:] + submit.stderr[-4000:]
    # Per-shard progress and the one-screen summary reach the submitting terminal.
    assert "shard 00002 embedded: 40 rows" in submit.stdout
    assert f"rows: {ROWS} total, {ROWS} this run" in submit.stdout
    assert f"report: s3://{bucket}/run/report.html" in submit.stdout
    # So does Ray Data's own report of each operator, under its stage's name (the log is not a
    # terminal, so it is logged: the first report as the stream starts).
    for name in ("Total Progress", "MapBatches(ReadStage+DownloadStage+DecodeStage+ShardStage+TokenizeStage)",
                 "MapBatches(EmbedStage)", "MapBatches(WriteStage)"):
        assert f"{name}: " in submit.stdout, name
    assert "Progress bars disabled" not in submit.stdout
    token = open(stack.state["RAY_AUTH_TOKEN_PATH"]).read().strip()
    request = urllib.request.Request(
        f"{stack.state['RAY_ADDRESS']}/api/jobs/g-{bucket}", headers={"Authorization": f"Bearer {token}"}
    )
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(request, timeout=30) as r:
        assert json.load(r)["status"] == "SUCCEEDED"
    # Every URL was fetched once (the 404 is not retried; no shard was done twice).
    assert requested == ROWS

    # --- the layout ------------------------------------------------------------------------
    keys = set(stack.objects(bucket, "run/"))
    shards = [f"{i:05d}" for i in range(ROWS // PER_SHARD)]
    expected = {"run/_stats.json", "run/report.html", "run/config.yaml"}
    for s in shards:
        expected |= {f"run/shards/{s}{ext}" for ext in (".tar", ".parquet", "_stats.json", ".manifest.json")}
        expected.add(f"run/embeddings/{s}.parquet")
    assert expected <= keys, expected - keys
    assert {k for k in keys if k.startswith("run/embeddings/")} == {f"run/embeddings/{s}.parquet" for s in shards}

    # --- every input row exactly once, with its status and decision ---------------------------
    fs = _s3fs(stack)
    out = pq.read_table(f"{bucket}/run/embeddings", filesystem=fs)
    assert out.num_rows == ROWS
    assert sorted(out.column("_gt_row").to_pylist()) == list(range(ROWS))
    assert len(set(out.column("key").to_pylist())) == ROWS
    by_row = {r["_gt_row"]: r for r in out.select(
        ["_gt_row", "status", "keep", "drop_reason", "image_embedding", "sha256", "_gt_sha256", "shard"]
    ).to_pylist()}
    for row, (_, status) in FAULTS.items():
        assert by_row[row]["status"] == status
        assert by_row[row]["keep"] is False and by_row[row]["drop_reason"] == f"status:{status}"
    ok = [r for r in by_row.values() if r["status"] == "ok"]
    assert len(ok) >= ROWS - len(FAULTS) - 3  # the world's format mix may refuse a few more
    emb = np.array([r["image_embedding"] for r in ok], np.float32)
    assert emb.shape[1] == 64
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-3)
    assert all(r["keep"] == (r["drop_reason"] is None) for r in by_row.values())

    # --- shards: the tars hold exactly the ok rows; the stats add up ---------------------------
    for s in shards:
        data = stack.s3().get_object(Bucket=bucket, Key=f"run/shards/{s}.tar")["Body"].read()
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            stems = {m.name.rsplit(".", 1)[0] for m in tar.getmembers()}
        assert stems == {r_key for r_key, r in zip(out.column("key").to_pylist(), out.to_pylist(), strict=True)
                         if r["shard"] == s and r["status"] == "ok"}
    stats = json.loads(stack.s3().get_object(Bucket=bucket, Key="run/_stats.json")["Body"].read())
    assert stats["rows"] == ROWS and sum(stats["status"].values()) == ROWS
    assert stats["kept"] + sum(stats["drop_reasons"].values()) == ROWS

    # --- the resolved config is next to the output and reproduces the run's config ------------
    written = stack.s3().get_object(Bucket=bucket, Key="run/config.yaml")["Body"].read().decode()
    assert J.validate(J.from_yaml_text(written)) == J.from_args(args)
    assert yaml.safe_load(written)["shard"]["output_folder"] == f"s3://{bucket}/run/shards"
