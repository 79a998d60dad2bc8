"""The stage graph (pipeline/graph.py) and how the schedulers cut and size it: declared once,
fused into one task per shard, no single process on the row path."""

from __future__ import annotations

import logging
from itertools import pairwise
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

import clip_model
from pipeline import schema as S
from pipeline.config import (
    DownloadJobConfig,
    EmbedConfig,
    FilterConfig,
    ReadConfig,
    ShardConfig,
    WriteConfig,
)
from pipeline.graph import Segment, build_download_graph, build_job_graph, model_spec, segments
from pipeline.schedulers.local import LocalScheduler
from pipeline.schedulers.ray_data import RayDataScheduler

# The plan tests build datasets on the local Ray that tests/conftest.py shares between modules.
pytestmark = pytest.mark.shared_ray


def _job_graph(embed: EmbedConfig | None = None) -> Any:
    model, _ = clip_model.create_model("tiny-synthetic", "synthetic")
    cfg = DownloadJobConfig(read=ReadConfig(url_list="unused"), shard=ShardConfig(output_folder="/tmp/none"))
    return build_job_graph(cfg, model_spec(model), embed or EmbedConfig(num_gpus=0.0), WriteConfig(output_folder="/tmp/o"),
                           FilterConfig())


def test_the_job_is_one_fused_task_per_shard_then_the_model_then_the_writer() -> None:
    g = _job_graph()
    fresh = segments(g.sources["download"])
    assert [s.name for s in fresh] == ["ReadStage+DownloadStage+DecodeStage+ShardStage+TokenizeStage"]
    assert [s.name for s in segments(g.sources["reread"])] == ["RereadStage+TokenizeStage"]
    tail = segments(g.tail)
    assert [(s.name, s.stateful) for s in tail] == [("EmbedStage", True), ("WriteStage", False)]
    # The fused task asks for what its hungriest stage declares, and runs the network-bound
    # head (read + download) ahead of the rest on a local worker.
    assert fresh[0].resources.num_cpus == 1.0 and fresh[0].io_bound_prefix == 2
    # ... and the decode (its crash-guard child's work) on a thread of its own between them.
    assert fresh[0].offloaded_end == 3
    # Decode makes the model's input (decode once) with the model's own preprocessing.
    decode = next(s for s in g.sources["download"] if s.name == "DecodeStage")
    assert decode.model_input == clip_model.create_model("tiny-synthetic", "synthetic")[1]


def test_download_graph_has_no_model() -> None:
    cfg = DownloadJobConfig(read=ReadConfig(url_list="x"), shard=ShardConfig(output_folder="/tmp/none"))
    g = build_download_graph(cfg)
    assert list(g.sources) == ["download"] and g.tail == []
    decode = next(s for s in g.sources["download"] if s.name == "DecodeStage")
    assert decode.model_input is None
    assert [s.name for s in g.sources["download"]] == ["ReadStage", "DownloadStage", "DecodeStage", "ShardStage"]


def test_segments_fuse_runs_between_stateful_stages() -> None:
    g = _job_graph()
    stages = [*g.sources["download"], *g.tail]
    cut = segments(stages)
    assert [len(s.stages) for s in cut] == [5, 1, 1]
    assert all(isinstance(s, Segment) for s in cut)


def test_local_pool_sizes_come_from_the_stage_or_the_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    embed = segments(_job_graph().tail)[0]
    local = LocalScheduler(processes=2)
    assert local.pool_size(embed) == 1  # on CPUs: one model worker, the other cores decode
    gpu = segments(_job_graph(EmbedConfig(num_gpus=1.0)).tail)[0]
    monkeypatch.setattr(LocalScheduler, "gpus", lambda self: 4)
    assert local.pool_size(gpu) == 4  # one per GPU
    declared = segments(_job_graph(EmbedConfig(num_gpus=0.0, concurrency=(1, 3))).tail)[0]
    assert local.pool_size(declared) == 3


def test_local_cpu_workers_leave_the_cores_model_workers_on_cpus_take(monkeypatch: pytest.MonkeyPatch) -> None:
    """As Ray Data reserves an actor's declared CPUs: a model worker on CPUs takes its
    num_cpus from the CPU pool; on GPUs it takes none; --processes overrides; at least one."""
    import pipeline.schedulers.local as L

    monkeypatch.setattr(L, "cpu_count", lambda: 8)
    monkeypatch.setattr(LocalScheduler, "gpus", lambda self: 0)
    auto = LocalScheduler()
    job = segments(_job_graph().tail)
    assert auto.cpu_workers(job) == 7  # one model worker on CPUs, one CPU each
    two_threads = segments(_job_graph(EmbedConfig(num_gpus=0.0, num_cpus=2.0, concurrency=(1, 3))).tail)
    assert auto.cpu_workers(two_threads) == 2  # three model workers, two CPUs each
    download = segments(build_download_graph(DownloadJobConfig(
        read=ReadConfig(url_list="unused"), shard=ShardConfig(output_folder="/tmp/none"))).sources["download"])
    assert auto.cpu_workers(download) == 8  # no model: every CPU
    assert LocalScheduler(processes=3).cpu_workers(job) == 3
    monkeypatch.setattr(L, "cpu_count", lambda: 1)
    assert auto.cpu_workers(job) == 1
    monkeypatch.setattr(L, "cpu_count", lambda: 8)
    monkeypatch.setattr(LocalScheduler, "gpus", lambda self: 2)
    assert auto.cpu_workers(segments(_job_graph(EmbedConfig(num_gpus=1.0)).tail)) == 8  # on GPUs


def test_local_idle_workers_fill_the_cpus_model_workers_on_cpus_take(monkeypatch: pytest.MonkeyPatch) -> None:
    """One lowest-priority CPU worker per CPU a model worker on CPUs takes; none on GPUs, none
    for a download, none when --processes is given (unless asked for), and as many as asked."""
    import pipeline.schedulers.local as L

    monkeypatch.setattr(L, "cpu_count", lambda: 2)
    monkeypatch.setattr(LocalScheduler, "gpus", lambda self: 0)
    job = segments(_job_graph().tail)
    assert (LocalScheduler().cpu_workers(job), LocalScheduler().idle_cpu_workers(job)) == (1, 1)
    two_threads = segments(_job_graph(EmbedConfig(num_gpus=0.0, num_cpus=2.0, concurrency=(1, 3))).tail)
    assert LocalScheduler().idle_cpu_workers(two_threads) == 6
    download = segments(build_download_graph(DownloadJobConfig(
        read=ReadConfig(url_list="unused"), shard=ShardConfig(output_folder="/tmp/none"))).sources["download"])
    assert LocalScheduler().idle_cpu_workers(download) == 0
    assert LocalScheduler(processes=2).idle_cpu_workers(job) == 0
    assert LocalScheduler(processes=2, idle_workers=1).idle_cpu_workers(job) == 1
    assert LocalScheduler(idle_workers=0).idle_cpu_workers(job) == 0
    monkeypatch.setattr(LocalScheduler, "gpus", lambda self: 2)
    assert LocalScheduler().idle_cpu_workers(segments(_job_graph(EmbedConfig(num_gpus=1.0)).tail)) == 0
    with pytest.raises(ValueError, match="idle_workers must be >= 0"):
        LocalScheduler(idle_workers=-1)
    from pipeline.config import ExecutionConfig
    from pipeline.schedulers import scheduler_for

    assert scheduler_for(ExecutionConfig(scheduler="local", idle_workers=0)).idle_workers == 0


def test_a_local_idle_worker_runs_at_the_lowest_priority_and_shards_go_to_the_others_first() -> None:
    """With one normal and one idle worker, every row arrives once; the idle worker (nice 19,
    its threads too) does shards only while the normal one has no room; the normal worker
    keeps the niceness it started with."""
    from pipeline.graph import Graph
    from testkit.toy_stages import NetworkRows, Niceness, Probe, Stamp

    graph = Graph({"src": [NetworkRows(batch_size=1), Niceness(), Stamp(busy_s=0.2)]}, [Probe()])
    got: list[Any] = []
    LocalScheduler(processes=1, idle_workers=1).run(graph, {"src": _shards([2] * 8)}, got.append)
    rows = pa.concat_tables(got).to_pylist()
    assert len(rows) == 16 and len({r[S.KEY] for r in rows}) == 16
    import os

    base = os.nice(0)
    by_nice: dict[int, set[int]] = {}
    for r in rows:
        by_nice.setdefault(r["nice"], set()).add(r["nice_pid"])
    assert set(by_nice) == {base, min(base + 19, 19)} and all(len(p) == 1 for p in by_nice.values())
    # The normal worker is offered every shard first: it does at least half of them.
    assert sum(1 for r in rows if r["nice"] == base) >= 8


@pytest.fixture
def ray_plan(s3_server: Any) -> Any:
    """The shared loopback-only local Ray (tests/conftest.py) to build (not run) datasets on,
    started again if a test that needs a Ray of its own shut it down."""
    import ray

    from testkit.loopback_ray import shared_local_ray

    shared_local_ray()
    return ray


def _map_operators(ds: Any) -> list[Any]:
    ops, node = [], ds._logical_plan.dag
    while True:
        if type(node).__name__ == "MapBatches":
            ops.append(node)
        if not node.input_dependencies:
            break
        node = node.input_dependencies[0]
    return list(reversed(ops))


@pytest.mark.parametrize("gpus", [0, 4])
def test_no_row_path_operator_is_a_single_process(ray_plan: Any, monkeypatch: pytest.MonkeyPatch, gpus: int) -> None:
    """Acceptance (issue 14.3): from the built Ray Data plan, every operator on the row path is
    a task pool without a size limit or an actor pool that can grow past one."""
    import ray

    cluster = {"CPU": 16.0, **({"GPU": float(gpus)} if gpus else {})}
    monkeypatch.setattr(RayDataScheduler, "resources", lambda self: cluster)
    embed = EmbedConfig().with_gpus(gpus)
    sched = RayDataScheduler()
    rows = [{"shard_id": i, "path": "x", "start": 0, "length": 1} for i in range(3)]
    ds, names = sched.build(_job_graph(embed), {"download": rows, "reread": rows[:1]})
    ops = _map_operators(ds)
    assert names[-2:] == ["EmbedStage", "WriteStage"]
    # Each operator is named for its stages: Ray Data's progress lines, the dashboard and the
    # workers' process titles say which stage is which.
    assert [op.name for op in ops] == [
        "MapBatches(ReadStage+DownloadStage+DecodeStage+ShardStage+TokenizeStage)",
        "MapBatches(EmbedStage)",
        "MapBatches(WriteStage)",
    ]
    for op in ops:
        compute = op.compute
        if isinstance(compute, ray.data.ActorPoolStrategy):
            assert compute.max_size > 1, (op.name, compute.min_size, compute.max_size)
            if gpus and "EmbedStage" in op.name:
                assert compute.max_size == gpus and compute.initial_size == gpus  # every GPU, from the start
        else:
            assert isinstance(compute, ray.data.TaskPoolStrategy) and compute.size is None, (op.name, compute)
    # The writer is called once per shard, briefly: as tasks Ray would restart its idle worker
    # for most calls, so it runs in actors, from one up to half the CPUs.
    write = ops[-1].compute
    assert isinstance(write, ray.data.ActorPoolStrategy) and (write.min_size, write.max_size) == (1, 8)


def _toy_graph(num_gpus: float) -> Any:
    from pipeline.graph import Graph
    from pipeline.stages.base import Resources
    from testkit.toy_stages import MakeRows, Probe

    return Graph({"src": [MakeRows(batch_size=1)]}, [Probe(resources=Resources(num_cpus=0.5, num_gpus=num_gpus))])


def _shards(lengths: list[int]) -> list[dict[str, Any]]:
    return [{"shard_id": i, "length": n} for i, n in enumerate(lengths)]


@pytest.mark.machine_wide  # starts a Ray of its own
def test_a_gpu_stage_gets_a_gpu_and_whole_shards_on_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray Data wants a batch size for GPU operators; the scheduler still hands the stage one
    whole shard per call (shards of different lengths included), on a GPU Ray assigned."""
    import ray

    from pipeline.ray_start import init_ray

    if ray.is_initialized():
        ray.shutdown()
    init_ray(num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False)  # logical GPUs
    try:
        got: list[Any] = []
        lengths = [7, 3, 7, 1, 5]
        RayDataScheduler().run(_toy_graph(1.0), {"src": _shards(lengths)}, got.append)
    finally:
        ray.shutdown()
    rows = pa.concat_tables(got).to_pylist()
    assert sorted(r[S.KEY] for r in rows) == sorted(f"{S.shard_name(i)}{j:04d}" for i, n in enumerate(lengths) for j in range(n))
    for r in rows:
        assert r["probe_rows"] == r[S.SHARD_ROWS], r  # one whole shard per call
        assert r["probe_gpus"] in ("0", "1"), r


@pytest.mark.machine_wide  # starts a Ray of its own
def test_ray_actor_pool_does_not_shrink_and_restart_while_the_stream_runs() -> None:
    """A pool of (1, 2) actors behind a source that trickles, then bursts. Ray Data's default
    shrinks the pool when half its call slots sit empty and starts a new actor (for the job:
    the model loaded again) as soon as calls queue up; a 50,000-row run started 30+ actors
    for pools of 2 + 2. Here the pool keeps the actors it has until the stream ends: at most
    two processes ever serve it."""
    import time

    import ray

    from pipeline.graph import Graph
    from pipeline.ray_start import init_ray
    from pipeline.stages.base import Resources
    from testkit.toy_stages import MakeRows, Probe

    if ray.is_initialized():
        ray.shutdown()
    init_ray(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        graph = Graph({"src": [MakeRows(batch_size=1, resources=Resources(num_cpus=0.25))]},
                      [Probe(resources=Resources(num_cpus=0.5), concurrency=(1, 2), busy_s=1.0)])
        t0 = time.time() + 3.0  # after the actors have started
        # 8 shards, one every 1.5 s (the pool idles past Ray's 10 s debounce), then 8 at once.
        release = [t0 + 1.5 * i for i in range(8)] + [t0 + 13.0] * 8
        items = [{"shard_id": i, "length": 2, "release_at": r} for i, r in enumerate(release)]
        got: list[Any] = []
        RayDataScheduler().run(graph, {"src": items}, got.append)
    finally:
        ray.shutdown()
    rows = pa.concat_tables(got).to_pylist()
    assert len(rows) == 32
    assert len({r["probe_pid"] for r in rows}) <= 2, sorted({r["probe_pid"] for r in rows})


def test_local_model_workers_each_get_their_own_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(LocalScheduler, "gpus", lambda self: 2)
    got: list[Any] = []
    lengths = [4, 4, 2, 4, 4, 4]
    LocalScheduler(processes=2).run(_toy_graph(1.0), {"src": _shards(lengths)}, got.append)
    rows = pa.concat_tables(got).to_pylist()
    assert len(rows) == sum(lengths) and all(r["probe_rows"] == r[S.SHARD_ROWS] for r in rows)
    by_pid: dict[int, set[str]] = {}
    for r in rows:
        by_pid.setdefault(r["probe_pid"], set()).add(r["probe_gpus"])
    assert all(len(g) == 1 for g in by_pid.values())  # a worker keeps its device
    assert set().union(*by_pid.values()) <= {"0", "1"}
    assert len({next(iter(g)) for g in by_pid.values()}) == len(by_pid)  # no two share one


def test_a_local_cpu_worker_fetches_the_next_shard_while_it_works_even_with_a_write_queued(tmp_path: Path) -> None:
    """One CPU worker, prefetch 1: each shard's network-bound head starts before the shard
    ahead of it has finished its CPU work, for every shard. Before, a queued write task took
    the prefetch's place for every second shard, whose download then started only after the
    worker had finished the one before (on a real network, a whole download's wait). Each
    shard's work holds until the next shard's fetch has started (30 s at most): the order is
    forced, not timed, so it holds on a loaded machine and a worker that fetches late makes
    that wait time out."""
    from pipeline.graph import Graph
    from testkit.toy_stages import NetworkRows, NetworkStamp, Probe, Stamp

    m = str(tmp_path)
    graph = Graph(
        {"src": [NetworkRows(batch_size=1), NetworkStamp(column="fetch_start", at="start", busy_s=0.05, marker_dir=m),
                 Stamp(column="work_end", busy_s=0.05, marker_dir=m, await_column="fetch_start", await_offset=1, last_shard=7)]},
        [Probe(), Stamp(column="written")],
    )
    got: list[Any] = []
    LocalScheduler(processes=1, prefetch=1).run(graph, {"src": _shards([2] * 8)}, got.append)
    rows = pa.concat_tables(got).to_pylist()
    assert len(rows) == 16 and all(r["written"] >= r["work_end"] for r in rows)
    by_shard = {r[S.SHARD]: r for r in rows}
    shards = sorted(by_shard)
    late = [k for prev, k in pairwise(shards) if not by_shard[prev]["work_end_awaited"]]
    assert late == [], f"fetched only after the shard before had finished its work: {late}"
    assert all(by_shard[k]["fetch_start"] < by_shard[prev]["work_end"] for prev, k in pairwise(shards))


def test_a_local_cpu_worker_runs_the_offloaded_stage_of_the_next_shard_beside_its_own_work(tmp_path: Path) -> None:
    """One CPU worker: the isolated decode's process never waits for the worker's bookkeeping
    of the shard before (tar, tokenize, spool). Each shard's offloaded stage starts before the
    shard ahead has finished its own work, and the offloaded stage runs one shard at a time,
    in order. Before, the offloaded stage ran on the main thread after the previous shard's
    work. Each shard's work holds until the next shard's offloaded stage has started (30 s at
    most), so the order is forced, not timed."""
    from pipeline.graph import Graph
    from testkit.toy_stages import NetworkRows, NetworkStamp, OffloadedStamp, Probe, Stamp

    m = str(tmp_path)
    graph = Graph(
        {"src": [NetworkRows(batch_size=1), NetworkStamp(column="fetch_start", at="start", busy_s=0.05),
                 OffloadedStamp(column="off_start", at="start", busy_s=0.2, marker_dir=m), OffloadedStamp(column="off_end"),
                 Stamp(column="work_start", at="start", busy_s=0.1),
                 Stamp(column="work_end", marker_dir=m, await_column="off_start", await_offset=1, last_shard=7)]},
        [Probe(), Stamp(column="written")],
    )
    got: list[Any] = []
    LocalScheduler(processes=1, prefetch=1).run(graph, {"src": _shards([2] * 8)}, got.append)
    rows = pa.concat_tables(got).to_pylist()
    assert len(rows) == 16 and len({r[S.KEY] for r in rows}) == 16
    by_shard = {r[S.SHARD]: r for r in rows}
    shards = sorted(by_shard)
    late = [k for prev, k in pairwise(shards) if not by_shard[prev]["work_end_awaited"]]
    assert late == [], f"offloaded only after the shard before had finished its work: {late}"
    assert all(by_shard[k]["off_start"] < by_shard[prev]["work_end"] for prev, k in pairwise(shards))
    crossed = [k for prev, k in pairwise(shards) if by_shard[k]["off_start"] < by_shard[prev]["off_end"]]
    assert crossed == [], f"two shards in the offloaded stage at once: {crossed}"
    for r in rows:
        assert r["fetch_start"] <= r["off_start"] <= r["off_end"] <= r["work_start"] <= r["work_end"] <= r["written"]


def test_a_local_cpu_worker_writes_a_shard_while_the_next_one_is_offloaded(tmp_path: Path) -> None:
    """A write that reaches the CPU worker while its next shard is in the offloaded stage runs
    at once: the shard is finished (and reported) without waiting for that stage. Before, the
    worker took its tasks in arrival order, so each write waited behind the next shard's
    decode. Here each shard's offloaded stage holds until the shard before has been written
    (30 s at most), so the order is forced, not timed: a worker that queues the write behind
    that stage makes it time out, however loaded the machine is."""
    from pipeline.graph import Graph
    from testkit.toy_stages import NetworkRows, OffloadedStamp, Probe, Stamp

    m = str(tmp_path)
    graph = Graph(
        {"src": [NetworkRows(batch_size=1),
                 OffloadedStamp(column="off_end", marker_dir=m, await_column="written", await_offset=-1),
                 Stamp(column="work_end", busy_s=0.05)]},
        [Probe(), Stamp(column="written", marker_dir=m)],
    )
    got: list[Any] = []
    LocalScheduler(processes=1, prefetch=1).run(graph, {"src": _shards([2] * 6)}, got.append)
    rows = pa.concat_tables(got).to_pylist()
    assert len(rows) == 12 and len({r[S.KEY] for r in rows}) == 12
    by_shard = {r[S.SHARD]: r for r in rows}
    shards = sorted(by_shard)
    waited = [prev for prev, k in pairwise(shards) if not by_shard[k]["off_end_awaited"]]
    assert waited == [], f"written only after the next shard's offloaded stage gave up waiting: {waited}"
    assert all(by_shard[prev]["written"] <= by_shard[k]["off_end"] for prev, k in pairwise(shards))


def test_a_local_segments_time_counts_its_fetched_and_offloaded_stages() -> None:
    """The job log's per-segment seconds and rows/s (from ``run``'s return) cover each shard
    from its download to its spool: a segment whose fetch and offloaded stages take 0.8 s a
    shard is reported as such. Before, it counted from when the main thread took the shard,
    so the job's download+decode segment read as the fastest of the stream when it was the
    slowest."""
    from pipeline.graph import Graph
    from testkit.toy_stages import NetworkRows, NetworkStamp, OffloadedStamp, Probe, Stamp

    graph = Graph(
        {"src": [NetworkRows(batch_size=1), NetworkStamp(busy_s=0.4), OffloadedStamp(busy_s=0.4),
                 Stamp(column="work", busy_s=0.05)]},
        [Probe(), Stamp(column="written")],
    )
    got: list[Any] = []
    stats = LocalScheduler(processes=1, prefetch=1).run(graph, {"src": _shards([3])}, got.append)
    assert pa.concat_tables(got).num_rows == 3
    [(name, src)] = [(k, v) for k, v in stats.items() if "OffloadedStamp" in k]
    assert src["rows"] == 3
    assert 0.8 <= src["seconds"] < 5, (name, src)


def test_a_local_model_worker_sets_up_before_its_first_shard_arrives() -> None:
    """A model worker loads its model as it starts, while the first shard is still on its way
    (here: held back 2 s at the source), not after that shard reaches it."""
    import time

    from pipeline.graph import Graph
    from testkit.toy_stages import MakeRows, Probe

    release = time.time() + 2.0
    graph = Graph({"src": [MakeRows(batch_size=1)]}, [Probe(setup_s=0.5)])
    got: list[Any] = []
    items = [{"shard_id": i, "length": 2, "release_at": release} for i in range(3)]
    LocalScheduler(processes=1).run(graph, {"src": items}, got.append)
    rows = pa.concat_tables(got).to_pylist()
    assert len(rows) == 6
    assert all(r["probe_set_up_at"] < release for r in rows)


def test_a_stage_setup_that_fails_in_a_local_worker_fails_the_run_naming_shard_and_error() -> None:
    from pipeline.graph import Graph
    from testkit.toy_stages import MakeRows, Probe

    graph = Graph({"src": [MakeRows(batch_size=1)]}, [Probe(setup_error="no weights at s3://models/x")])
    with pytest.raises(RuntimeError, match=r"(?s)shard 0000\d failed in Probe .*ValueError: no weights at s3://models/x"):
        LocalScheduler(processes=1, item_attempts=1).run(graph, {"src": _shards([2, 2])}, lambda t: None)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.mark.machine_wide  # starts a Ray of its own
@pytest.mark.parametrize("interval", [0, 1])
def test_ray_data_reports_each_operator_every_interval_in_a_log(interval: int) -> None:
    """Where stdout is not a terminal (a `ray job submit` log; here pytest's capture), Ray Data
    logs a progress report every ``execution.progress_interval_s`` seconds, each operator under
    its stage's name; 0 turns it off (the job's per-shard lines remain)."""
    import ray

    from pipeline.graph import Graph
    from pipeline.ray_start import init_ray
    from pipeline.stages.base import Resources
    from testkit.toy_stages import MakeRows, Probe

    if ray.is_initialized():
        ray.shutdown()
    init_ray(num_cpus=2, include_dashboard=False, log_to_driver=False)
    records = _Records()
    logger = logging.getLogger("ray.data")
    logger.addHandler(records)
    try:
        graph = Graph({"src": [MakeRows(batch_size=1, resources=Resources(num_cpus=0.25))]},
                      [Probe(resources=Resources(num_cpus=0.5), concurrency=(1, 1), busy_s=0.5)])
        got: list[Any] = []
        items = [{"shard_id": i, "length": 2} for i in range(8)]  # >= 4 s through the one actor
        RayDataScheduler(progress_interval_s=interval).run(graph, {"src": items}, got.append)
    finally:
        logger.removeHandler(records)
        ray.shutdown()
    assert sum(t.num_rows for t in got) == 16
    reports = [m for m in records.messages if m.startswith("Total Progress:")]
    # An operator's line in a report ("MapBatches(Probe): 6/16"); the plan logged as the stream
    # starts names the operators too, whatever the interval.
    operator_lines = [m for m in records.messages if m.startswith("MapBatches(Probe): ")]
    if interval == 0:
        assert reports == [] and operator_lines == [], records.messages
    else:
        assert len(reports) >= 3, records.messages  # one as it starts, then one a second
        assert len(operator_lines) == len(reports), records.messages
