"""Worker and actor loss on a two-node ``ray.cluster_utils.Cluster`` (issue 7, acceptance 1).

The whole job (pipeline.job.run on Ray Data: read -> download -> decode -> shard -> tokenize ->
embed -> write,
then the global pass) runs on a head node and a second node, both local, against the loopback
image server and the bundled tiny model. Faults are injected into the job's graph
(testkit/faults.py): one process of each named stage SIGKILLs itself right after finishing a
batch (its side effects are done, its result is lost), so Ray must restart the actor or rerun
the task; two rows carry the crashing decoder's marker: their decoder "segfaults" on every
attempt.

The run must end with every input row exactly once: the marked rows quarantined as
``worker_crash``, every other row stored with the image bytes an in-process decode of the same
file gives. Without isolation, a crashing row kills its worker on each of Ray's bounded
retries and the run fails instead of hanging. Last, a third node joins and is killed while the
run has work on it; the run still ends with every row once.
"""

from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import job
from pipeline import schema as S
from pipeline.config import (
    DecodeConfig,
    DownloadConfig,
    DownloadJobConfig,
    EmbedConfig,
    ExecutionConfig,
    JobConfig,
    ModerateConfig,
    ReadConfig,
    ShardConfig,
)
from pipeline.download_job import run_download
from pipeline.graph import Graph
from pipeline.stages.decode import DecodeStage
from testkit.faults import CRASH_MARKER, CRASHING_DECODER, inject, kill_after
from testkit.http_server import FaultServer
from testkit.loopback_ray import LOOPBACK, loopback_ray_env
from testkit.synthetic import generate_world

pytestmark = pytest.mark.machine_wide  # starts a Ray of its own (tests/conftest.py)

ROWS = 60
PER_SHARD = 20
MARKER = CRASH_MARKER
CRASH_ROWS = (7, 44)
DECODE = DecodeConfig(image_size=64, resize_mode="center_crop")
# One process of each: a shard task after its download, after its decode, after it committed
# it; the embed actor mid-stream; a write task after it wrote a file.
VICTIMS = {"DownloadStage": 1, "DecodeStage": 1, "ShardStage": 1, "EmbedStage": 2, "WriteStage": 1}


def _crashing(graph: Graph) -> Graph:
    from dataclasses import replace

    return inject(graph, {"DecodeStage": lambda s: replace(s, decoder=CRASHING_DECODER)})


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, FaultServer, pa.Table]]:
    root = tmp_path_factory.mktemp("loss-world")
    with FaultServer() as srv:
        table = generate_world(root, ROWS, 11, srv.base_url + "/", min_side=48, max_side=96)
        srv.root = root.resolve()
        yield root, srv, table


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    """A head node and a second node, 2 logical CPUs each, on 127.0.0.1 only, with a private
    Ray temp dir (see testkit.loopback_ray)."""
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():  # an earlier module's Ray
        ray.shutdown()
    with loopback_ray_env():
        node = {"num_cpus": 2, "node_ip_address": LOOPBACK}
        # A lost node is declared dead after 4 missed 1 s health checks (Ray's default: 5 x 3 s).
        health = {"health_check_period_ms": 1000, "health_check_failure_threshold": 4}
        c = Cluster(initialize_head=True,
                    head_node_args={**node, "include_dashboard": False, "_system_config": health})
        try:
            c.add_node(**node)
            c.wait_for_nodes()
            yield c
        finally:
            if ray.is_initialized():
                ray.shutdown()
            c.shutdown()


def _connect(cluster: Any, env: dict[str, str], nodes: int = 2) -> None:
    """A fresh driver connection to the cluster whose workers see ``env`` (the test hooks)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address=cluster.address, runtime_env={"env_vars": env}, log_to_driver=False)
    assert [n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]] == [LOOPBACK] * nodes
    with warnings.catch_warnings():
        # Ray's first get_current() in a driver sets its own deprecated fields and warns.
        warnings.simplefilter("ignore", DeprecationWarning)
        ray.data.DataContext.get_current()


def _url_list(world: tuple[Path, FaultServer, pa.Table], path: Path, rows: int = ROWS) -> str:
    root, srv, table = world
    urls = [srv.url(p, tag=MARKER) if i in CRASH_ROWS else srv.url(p)
            for i, p in enumerate(table.column("_gt_path").to_pylist())]
    pq.write_table(table.set_column(table.column_names.index("url"), "url", pa.array(urls)).slice(0, rows), path)
    return str(path)


def _expected_sha256(world: tuple[Path, FaultServer, pa.Table]) -> list[str]:
    """sha256 of each world image decoded in this process (no Ray, no HTTP, no crash guard)."""
    root, _, table = world
    import clip_model

    n = table.num_rows
    _, pp = clip_model.create_model("tiny-synthetic", "synthetic")
    rows = pa.table({
        S.KEY: [str(i) for i in range(n)], S.STATUS: [S.OK] * n, S.ERROR: pa.nulls(n, pa.string()),
        S.IMAGE_BYTES: pa.array([(root / p).read_bytes() for p in table.column("_gt_path").to_pylist()], pa.binary()),
    })
    out = DecodeStage(cfg=DECODE, model_input=pp, isolate=False).process_batch(rows)
    assert out.column(S.STATUS).to_pylist() == [S.OK] * n
    return out.column(S.SHA256).to_pylist()


def test_killed_workers_and_actors_and_crashing_rows_leave_every_row_once(
    cluster: Any, world: tuple[Path, FaultServer, pa.Table], tmp_path: Path
) -> None:
    flags = tmp_path / "flags"
    flags.mkdir()
    _connect(cluster, {})
    cfg = JobConfig(
        input=_url_list(world, tmp_path / "urls.parquet"),
        output=str(tmp_path / "out"),
        read=ReadConfig(save_additional_columns=("_gt_row",)),
        download=DownloadConfig(timeout=10, retries=0, allowed_networks=("127.0.0.1/32",)),
        decode=DECODE,
        shard=ShardConfig(number_sample_per_shard=PER_SHARD),
        embed=EmbedConfig(model="tiny-synthetic", pretrained="synthetic", inference_batch=8),
        moderate=ModerateConfig(enabled=False),
        # Download, decode and shard of a shard run in one task: one shard may meet all three
        # of their kills, so it gets one attempt more than that.
        execution=ExecutionConfig(scheduler="ray", attempts=4),
    )
    summary = job.run(cfg, emit=lambda line: None,
                      wrap_graph=lambda g: inject(_crashing(g), kill_after(VICTIMS, str(flags))))

    # Every hook fired, once: each named stage lost one process mid-run.
    assert sorted(p.name for p in flags.iterdir()) == sorted(f"{v}.killed" for v in VICTIMS)
    out = pq.read_table(tmp_path / "out" / "embeddings").sort_by("_gt_row")
    assert out.column("_gt_row").to_pylist() == list(range(ROWS))  # every row, exactly once
    assert len(set(out.column(S.KEY).to_pylist())) == ROWS
    assert summary.rows == ROWS and summary.status_counts == {S.OK: ROWS - len(CRASH_ROWS), S.WORKER_CRASH: 2}
    expected = _expected_sha256(world)
    for i, row in enumerate(out.to_pylist()):
        if i in CRASH_ROWS:
            assert row[S.STATUS] == S.WORKER_CRASH
            assert "killed by SIGSEGV" in row[S.ERROR] and "2 attempts" in row[S.ERROR], row[S.ERROR]
            assert row[S.SHA256] is None and row[S.IMAGE_EMBEDDING] is None
            assert row[S.KEEP] is False
        else:
            assert row[S.STATUS] == S.OK, (i, row[S.ERROR])
            assert row[S.SHA256] == expected[i], i
            norm = np.linalg.norm(np.asarray(row[S.IMAGE_EMBEDDING], np.float64))
            assert abs(norm - 1.0) < 2e-3, (i, norm)
    # Nothing but whole files under their final names: no duplicate parts, no temp leftovers.
    names = [f"{i:05d}" for i in range(ROWS // PER_SHARD)]
    assert sorted(p.name for p in (tmp_path / "out" / "embeddings").iterdir()) == [f"{n}.parquet" for n in names]
    assert sorted(p.name for p in (tmp_path / "out" / "shards").iterdir() if not p.name.startswith("_")) == sorted(
        f"{n}{ext}" for n in names for ext in (".tar", ".parquet", "_stats.json", ".manifest.json"))
    # The shard tables agree: every row once, with the same status.
    shards = pa.concat_tables(pq.read_table(p, columns=[S.KEY, S.STATUS])
                              for p in sorted((tmp_path / "out" / "shards").glob("*.parquet")))
    assert sorted(shards.to_pylist(), key=lambda r: r[S.KEY]) == sorted(
        out.select([S.KEY, S.STATUS]).to_pylist(), key=lambda r: r[S.KEY])


def test_without_isolation_a_crashing_row_fails_the_run_after_bounded_retries(
    cluster: Any, world: tuple[Path, FaultServer, pa.Table], tmp_path: Path
) -> None:
    _connect(cluster, {})
    cfg = DownloadJobConfig(
        read=ReadConfig(url_list=_url_list(world, tmp_path / "urls.parquet", rows=CRASH_ROWS[0] + 1)),
        download=DownloadConfig(timeout=10, retries=0, allowed_networks=("127.0.0.1/32",)),
        decode=DECODE,
        shard=ShardConfig(output_folder=str(tmp_path / "shards"), number_sample_per_shard=PER_SHARD),
    )
    import ray

    started = time.monotonic()
    # Ray reruns the shard task (attempts - 1) times, each run dies on the row, then gives up.
    with pytest.raises(ray.exceptions.WorkerCrashedError):
        run_download(cfg, ExecutionConfig(scheduler="ray", decode_isolation=False), _crashing)
    assert time.monotonic() - started < 120
    assert not (tmp_path / "shards" / "00000.manifest.json").exists()


def _workers_of(node: Any) -> list[str]:
    """Process titles (``ray::MapWorker(...)`` for an actor) of the busy Ray workers a node's
    raylet started."""
    raylet = node.all_processes["raylet"][0].process.pid
    titles = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == raylet:
                title = (entry / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
                if title.startswith("ray::") and not title.startswith("ray::IDLE"):
                    titles.append(title)
        except (OSError, IndexError, ValueError):
            continue
    return titles


def test_a_node_lost_mid_run_leaves_every_row_once(
    cluster: Any, world: tuple[Path, FaultServer, pa.Table], tmp_path: Path
) -> None:
    """A third node joins and dies (raylet and workers SIGKILLed) as soon as a task or actor
    of the run works on it: lost actors restart on another node, lost tasks and the blocks the
    node held are redone, and the run ends with every row once."""
    node = cluster.add_node(num_cpus=2, node_ip_address=LOOPBACK)
    cluster.wait_for_nodes()
    try:
        _connect(cluster, {}, nodes=3)
        root, srv, table = world
        # Slow answers keep the stream going while the node is found and killed.
        urls = [srv.url(p, delay=0.3) for p in table.column("_gt_path").to_pylist()]
        path = tmp_path / "urls.parquet"
        pq.write_table(table.set_column(table.column_names.index("url"), "url", pa.array(urls)), path)
        cfg = JobConfig(
            input=str(path), output=str(tmp_path / "out"),
            read=ReadConfig(save_additional_columns=("_gt_row",)),
            download=DownloadConfig(timeout=10, retries=0, allowed_networks=("127.0.0.1/32",), thread_count=4),
            decode=DECODE, shard=ShardConfig(number_sample_per_shard=PER_SHARD // 2),
            embed=EmbedConfig(model="tiny-synthetic", pretrained="synthetic", inference_batch=8),
            moderate=ModerateConfig(enabled=False),
            execution=ExecutionConfig(scheduler="ray"),
        )
        result: dict[str, Any] = {}

        def run() -> None:
            try:
                result["summary"] = job.run(cfg, emit=lambda line: None)
            except BaseException as e:  # re-raised below, in the test's thread
                result["error"] = e

        thread = threading.Thread(target=run)
        thread.start()
        deadline = time.monotonic() + 120
        lost: list[str] = []
        while thread.is_alive() and not lost:
            assert time.monotonic() < deadline, "no work of the run was placed on the third node"
            time.sleep(0.02)
            lost = _workers_of(node)
        embeddings = tmp_path / "out" / "embeddings"
        done_before = len(list(embeddings.glob("*.parquet"))) if embeddings.is_dir() else 0
        cluster.remove_node(node, allow_graceful=False)
        node = None
        thread.join(240)
        assert not thread.is_alive(), "the run did not finish after the node was lost"
        if "error" in result:
            raise result["error"]
        assert lost, "the run ended before any of its work was placed on the third node"
        assert done_before < ROWS // (PER_SHARD // 2), "the node was lost after the run's work was done"
        out = pq.read_table(embeddings).sort_by("_gt_row")
        assert out.column("_gt_row").to_pylist() == list(range(ROWS))
        assert result["summary"].status_counts == {S.OK: ROWS}
        assert out.column(S.SHA256).to_pylist() == _expected_sha256(world)
    finally:
        if node is not None:
            cluster.remove_node(node)
