"""The whole job on the default scheduler of one machine (local worker processes, no Ray):
no Ray anywhere, the same rows as on Ray Data, and lost workers of every pool (download and
decode, the embedding model, the writer) retried until every row is in the output once."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import schema as S
from pipeline.config import (
    DecodeConfig,
    DownloadConfig,
    EmbedConfig,
    ExecutionConfig,
    JobConfig,
    ReadConfig,
    ShardConfig,
)
from pipeline.job import run
from testkit import REPO_ROOT, subprocess_env
from testkit.faults import CRASH_MARKER, CRASHING_DECODER, inject, kill_after
from testkit.http_server import FaultServer
from testkit.synthetic import generate_world

# The Ray Data comparison runs on the local Ray that tests/conftest.py shares between modules.
pytestmark = pytest.mark.shared_ray

ROWS = 48
PER_SHARD = 12
CRASH_ROWS = (5, 30)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, FaultServer, pa.Table]]:
    root = tmp_path_factory.mktemp("local-job-world")
    with FaultServer() as srv:
        table = generate_world(root, ROWS, 21, srv.base_url + "/", min_side=64, max_side=200)
        srv.root = root.resolve()
        urls = [srv.url(p, tag=CRASH_MARKER) if i in CRASH_ROWS else srv.url(p)
                for i, p in enumerate(table.column("_gt_path").to_pylist())]
        table = table.set_column(table.column_names.index("url"), "url", pa.array(urls))
        pq.write_table(table, root / "urls.parquet")
        yield root, srv, table


def _cfg(world: tuple[Path, FaultServer, pa.Table], out: Path, **execution: object) -> JobConfig:
    root, _, _ = world
    return JobConfig(
        input=str(root / "urls.parquet"),
        output=str(out),
        read=ReadConfig(save_additional_columns=("_gt_row",)),
        download=DownloadConfig(timeout=10, retries=0, allowed_networks=("127.0.0.1/32",)),
        decode=DecodeConfig(image_size=64, resize_mode="center_crop"),
        shard=ShardConfig(number_sample_per_shard=PER_SHARD),
        embed=EmbedConfig(inference_batch=8),
        execution=ExecutionConfig(scheduler="local", processes=2, **execution),  # type: ignore[arg-type]
    )


def _crashing(graph):  # noqa: ANN001, ANN202
    return inject(graph, {"DecodeStage": lambda s: replace(s, decoder=CRASHING_DECODER)})


def _rows(out: Path) -> pa.Table:
    return pq.read_table(out / "embeddings").sort_by("_gt_row")


def test_killed_workers_of_every_pool_leave_every_row_once(world, tmp_path: Path) -> None:
    flags = tmp_path / "flags"
    flags.mkdir()
    victims = {"DecodeStage": 1, "ShardStage": 2, "EmbedStage": 2, "WriteStage": 1}
    summary = run(_cfg(world, tmp_path / "out", attempts=4), lambda line: None,
                  wrap_graph=lambda g: inject(_crashing(g), kill_after(victims, str(flags))))
    assert sorted(p.name for p in flags.iterdir()) == sorted(f"{v}.killed" for v in victims)
    out = _rows(tmp_path / "out")
    assert out.column("_gt_row").to_pylist() == list(range(ROWS))  # every row, exactly once
    assert summary.status_counts == {S.OK: ROWS - len(CRASH_ROWS), S.WORKER_CRASH: len(CRASH_ROWS)}
    for i, row in enumerate(out.to_pylist()):
        if i in CRASH_ROWS:
            assert row[S.STATUS] == S.WORKER_CRASH and row[S.IMAGE_EMBEDDING] is None
        else:
            assert row[S.EMBEDDED_FROM] == "original"
            norm = np.linalg.norm(np.asarray(row[S.IMAGE_EMBEDDING], np.float64))
            assert abs(norm - 1.0) < 2e-3
    names = [f"{i:05d}" for i in range(ROWS // PER_SHARD)]
    assert sorted(p.name for p in (tmp_path / "out" / "embeddings").iterdir()) == [f"{n}.parquet" for n in names]


def test_a_shard_that_keeps_killing_the_model_worker_fails_the_run_by_name(world, tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match=r"shard 0000\d: its model\d+ worker process was killed by SIGKILL in EmbedStage"):
        run(_cfg(world, tmp_path / "out", attempts=1), lambda line: None,
            wrap_graph=lambda g: inject(g, kill_after({"EmbedStage": 1}, str(tmp_path))))
    # Committed shards are kept; the rerun (no faults) finishes the job.
    again = run(_cfg(world, tmp_path / "out"), lambda line: None)
    assert again.rows == ROWS and again.shards_downloaded + again.shards_reembedded >= 1


def test_local_and_ray_data_write_the_same_rows(world, tmp_path: Path, shared_ray: None) -> None:
    local = run(_cfg(world, tmp_path / "local"), lambda line: None)
    cfg = _cfg(world, tmp_path / "ray")
    on_ray = run(replace(cfg, execution=ExecutionConfig(scheduler="ray")), lambda line: None)
    assert local.status_counts == on_ray.status_counts and local.kept == on_ray.kept
    a, b = _rows(tmp_path / "local"), _rows(tmp_path / "ray")
    for col in (S.KEY, S.STATUS, S.SHA256, S.KEEP, S.DROP_REASON, S.DUPLICATE_OF):
        assert a.column(col).to_pylist() == b.column(col).to_pylist(), col
    ea = np.asarray([v for v in a.column(S.IMAGE_EMBEDDING).to_pylist() if v is not None], np.float32)
    eb = np.asarray([v for v in b.column(S.IMAGE_EMBEDDING).to_pylist() if v is not None], np.float32)
    assert np.abs(ea - eb).max() <= 1e-3


def test_the_job_run_directly_uses_local_processes_and_never_imports_ray(world, tmp_path: Path) -> None:
    root, _, _ = world
    script = (
        "import sys; sys.path.insert(0, 'jobs'); import embed_laion; code = embed_laion.main(sys.argv[1:]); "
        "assert 'ray' not in sys.modules, 'ray was imported'; sys.exit(code)"
    )
    env = subprocess_env()
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run(
        [sys.executable, "-c", script, "--input", str(root / "urls.parquet"), "--output", str(tmp_path / "o"),
         "--allowed-networks", "127.0.0.1/32", "--number-sample-per-shard", str(PER_SHARD), "--image-size", "64"],
        capture_output=True, text=True, timeout=300, cwd=REPO_ROOT, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "scheduler: local" in done.stdout
    assert pq.read_metadata(tmp_path / "o" / "embeddings" / "00000.parquet").num_rows == PER_SHARD
