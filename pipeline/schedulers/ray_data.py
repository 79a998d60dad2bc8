"""Run a :class:`~pipeline.graph.Graph` on Ray Data: the path ``ray job submit`` takes.

Each source becomes a dataset of shard descriptors with one block per shard; each segment of
the graph (pipeline.graph.segments) becomes one ``map_batches``:

- non-stateful segments (read + download + decode + shard + tokenize; write) run as tasks,
  one shard per task, with the largest resources their stages declare, so a shard is fetched,
  decoded and committed in one process and Ray never moves its image bytes;
- a stateful segment (embed) runs in an actor pool: ``(min, max)`` from the stage, or sized
  from the cluster (one actor per GPU; on CPUs, from 1 up to half the CPUs), started at its
  maximum when it holds GPUs or was sized by the user, so every model loads once up front.

An actor pool grows with the load and does not shrink until its inputs are done
(:data:`NO_DOWNSCALE`): Ray Data's default shrinks a pool whenever half its call slots are
empty, which a stream paced by downloads hits every few seconds, and it then starts a new actor
(the model loaded again) a second later. Every later segment takes whole blocks
(``batch_size=None``), and ``target_max_block_size`` is raised so Ray does not cut a shard's
block. Retries are bounded: a lost task is tried at most
``attempts`` times and a lost actor restarted at most ``attempts - 1`` times, so a poison shard
fails the job instead of looping; every side effect (a shard, a
Parquet file) is committed whole under a fixed name, so a rerun leaves each row once.

Operators are named for their stages (``MapBatches(EmbedStage)``), and Ray Data's progress is
on: bars in a terminal, a report every ``execution.progress_interval_s`` seconds in a log.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import warnings
from collections.abc import Callable
from typing import Any

import pyarrow as pa

from pipeline.graph import Graph, Segment, segments
from pipeline.stages.base import Stage, run_stages

log = logging.getLogger("clipcurate.ray")

# Large enough that a shard of full-size downloaded images stays one block.
MIN_TARGET_MAX_BLOCK_SIZE = 4 * 1024**3
# Default attempts per task (1 + retries) and per actor (1 + restarts).
ATTEMPTS = 3
# Ray Data's pool utilisation threshold for shrinking (calls in flight per actor slot; its
# default 0.5). Below any reachable value: a pool shrinks only once its inputs are done. With
# the default, a 50,000-row run on 4 CPUs started 16 actors for pools of at most 2 + 2, each
# embedding actor loading the model again; 4 with this (bench/RESULTS.md, 2026-12-06).
NO_DOWNSCALE = -1.0
# Ray Data's seconds between progress reports where stdout is not a terminal: read from the
# environment when its logging progress module is first imported (at a dataset's first run).
PROGRESS_ENV = "RAY_DATA_NON_TTY_PROGRESS_LOG_INTERVAL"
_PROGRESS_MODULE = "ray.data._internal.progress.logging_progress"
# Calls to an actor are resent without limit while it restarts (a restart on another node,
# with its model to load, outlasts a few quick resends, each counted as a retry). Still
# bounded: a batch that kills its actor uses up one of the actor's restarts each time.
ACTOR_TASK_MAX_RETRIES = -1


class _SegmentActor:
    """Ray Data callable class: one long-lived segment per actor, set up once."""

    def __init__(self, stages: tuple[Stage, ...]) -> None:
        self.stages = list(stages)
        for s in self.stages:
            s.setup()

    def __call__(self, batch: pa.Table) -> pa.Table:
        return run_stages(self.stages, batch)


def _actor_class(seg: Segment) -> type[_SegmentActor]:
    """:class:`_SegmentActor` under the segment's name: Ray Data names the operator, its
    progress lines, the dashboard's rows and the worker's process title after the class
    (``MapBatches(EmbedStage)``, ``ray::MapWorker(MapBatches(WriteStage))``), where every
    actor pool was ``_SegmentActor`` before. Ray's cloudpickle ships the class by value."""
    return type(seg.name, (_SegmentActor,), {"__module__": __name__, "__doc__": _SegmentActor.__doc__})


def _segment_task(seg: Segment) -> Callable[[pa.Table], pa.Table]:
    stages = list(seg.stages)

    def run(batch: pa.Table) -> pa.Table:
        return run_stages(stages, batch)

    run.__name__ = seg.name
    return run


def pool_size(seg: Segment, cluster: dict[str, float]) -> tuple[int, int]:
    """(min, max) actors of a long-lived segment: its declared concurrency, else one per GPU
    (GPU stages) or 1 to half the cluster's CPUs (CPU stages, at least 2)."""
    c = seg.concurrency
    if c is not None:
        return c if isinstance(c, tuple) else (c, c)
    res = seg.resources
    if res.num_gpus > 0:
        n = max(1, int(cluster.get("GPU", 0.0) // res.num_gpus))
        return 1, n
    return 1, max(2, int(cluster.get("CPU", 1.0)) // 2)


class RayDataScheduler:
    """Ray Data on the current connection, or one it makes (``address``; None: ``$RAY_ADDRESS``
    or a new local Ray)."""

    name = "ray"

    def __init__(self, address: str | None = None, attempts: int = ATTEMPTS, progress_interval_s: int = 30) -> None:
        self.address = address
        self.attempts = attempts
        self.progress_interval_s = progress_interval_s

    def connect(self) -> None:
        """Join ``address`` (or ``$RAY_ADDRESS``), or start a loopback-only local Ray
        (pipeline/ray_start.py); nothing when this process is connected already."""
        from pipeline.ray_start import init_ray

        # log_to_driver=False: worker logs stay in Ray's log files; the driver prints progress.
        init_ray(self.address, log_to_driver=False)

    def resources(self) -> dict[str, float]:
        """The cluster's total resources (``CPU``, ``GPU``, ...)."""
        import ray

        self.connect()
        return dict(ray.cluster_resources())

    def gpus(self) -> int:
        return int(self.resources().get("GPU", 0.0))

    def _apply(self, ds: Any, seg: Segment, batch_size: int | None, cluster: dict[str, float]) -> Any:
        import ray
        from ray.util.annotations import RayDeprecationWarning

        res = seg.resources
        common: dict[str, Any] = {
            "batch_size": batch_size,
            "batch_format": "pyarrow",
            "zero_copy_batch": True,
            "num_cpus": res.num_cpus,
        }
        if res.num_gpus:
            # Through ray_remote_args_fn: map_batches refuses num_gpus with batch_size=None
            # (it wants a GPU batch size), but a call here is one whole shard by design, and
            # the stage cuts it into inference batches itself.
            gpus = res.num_gpus
            common["ray_remote_args_fn"] = lambda: {"num_gpus": gpus}
        # Ray Data retries forever by default and has no named parameter to bound it yet;
        # remote args are the only way, so its deprecation notice is silenced here only.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RayDeprecationWarning)
            if seg.long_lived:
                lo, hi = pool_size(seg, cluster)
                extra: dict[str, Any] = {"max_tasks_in_flight_per_actor": 2}
                if res.num_gpus > 0 or seg.concurrency is not None:
                    # An actor pool grows only when its actors have calls queued; behind a
                    # download-bound stream that rarely happens, and GPUs (or the pool the
                    # user sized) would idle. A CPU pool sized here from the cluster starts
                    # at one, so it does not take the cores the downloads decode on.
                    extra["initial_size"] = hi
                return ds.map_batches(
                    _actor_class(seg),
                    fn_constructor_args=(seg.stages,),
                    compute=ray.data.ActorPoolStrategy(min_size=lo, max_size=hi, **extra),
                    max_restarts=self.attempts - 1,
                    max_task_retries=ACTOR_TASK_MAX_RETRIES,
                    **common,
                )
            limit = seg.concurrency
            if limit is not None:
                common["compute"] = ray.data.TaskPoolStrategy(size=int(limit))
            return ds.map_batches(_segment_task(seg), max_retries=self.attempts - 1, **common)

    def _progress(self, ctx: Any) -> None:
        """Ray Data's progress on (reports every ``progress_interval_s`` in a log, bars in a
        terminal) or, at 0, off."""
        interval = self.progress_interval_s
        ctx.enable_progress_bars = interval > 0
        if interval <= 0:
            return
        os.environ[PROGRESS_ENV] = str(interval)
        # A dataset that already ran in this process imported the module and fixed the
        # interval from the environment then; the class attribute is what it reads.
        manager = getattr(sys.modules.get(_PROGRESS_MODULE), "LoggingExecutionProgressManager", None)
        if manager is not None and hasattr(manager, "LOG_REPORT_INTERVAL_SEC"):
            manager.LOG_REPORT_INTERVAL_SEC = interval

    def build(self, graph: Graph, items: dict[str, list[dict[str, Any]]]) -> tuple[Any, list[str]]:
        """The dataset for ``items`` (descriptor rows per source) and the segment names in the
        order their operators appear. Nothing runs until it is iterated."""
        import ray

        self.connect()
        with warnings.catch_warnings():
            # Ray's first get_current() sets its own deprecated fields and warns about them.
            warnings.simplefilter("ignore", DeprecationWarning)
            ctx = ray.data.DataContext.get_current()
        ctx.target_max_block_size = max(ctx.target_max_block_size or 0, MIN_TARGET_MAX_BLOCK_SIZE)
        self._progress(ctx)
        auto = getattr(ctx, "autoscaling_config", None)
        if auto is not None and hasattr(auto, "actor_pool_util_downscaling_threshold"):
            ctx.autoscaling_config = dataclasses.replace(auto, actor_pool_util_downscaling_threshold=NO_DOWNSCALE)
        else:  # a Ray release without the setting: its pools shrink and restart as before
            log.warning("Ray Data has no actor_pool_util_downscaling_threshold: actor pools may churn")
        cluster = self.resources()
        parts, names = [], []
        for source, stages in graph.sources.items():
            rows = items.get(source) or []
            if not rows:
                continue
            ds = ray.data.from_items(rows, override_num_blocks=len(rows))
            for k, seg in enumerate(segments(stages)):
                ds = self._apply(ds, seg, 1 if k == 0 else None, cluster)
                names.append(seg.name)
            parts.append(ds)
        if not parts:
            raise ValueError("nothing to run: no source has items")
        ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
        for seg in segments(graph.tail):
            ds = self._apply(ds, seg, None, cluster)
            names.append(seg.name)
        return ds, names

    def run(self, graph: Graph, items: dict[str, list[dict[str, Any]]],
            on_batch: Callable[[pa.Table], None]) -> dict[str, dict[str, Any]]:
        """Stream every item through the graph; ``on_batch`` gets each output block (the
        write stage's per-shard summary rows). Returns per-segment rows and seconds
        (:func:`operator_stats`)."""
        ds, names = self.build(graph, items)
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            on_batch(batch)
        return operator_stats(ds, names)


def operator_stats(ds: Any, applied: list[str]) -> dict[str, dict[str, Any]]:
    """Per segment of a finished dataset: ``{"rows": rows out, "seconds": wall time from its
    first task's start to its last task's end}``.

    ``applied``: segment names in the order they were applied; ``MapBatches(...)`` operators
    are matched to them in order (Ray may fuse two into ``A->B``). Read from Ray Data's stats
    summary (``Dataset._get_stats_summary``, not a public API): when that is unavailable the
    job runs on and the report has no per-stage rows.
    """
    try:
        summary = ds._get_stats_summary()
        ops: list[Any] = []

        def walk(node: Any) -> None:
            for parent in node.parents:
                walk(parent)
            ops.extend(op for op in node.operators_stats if not op.is_sub_operator)

        walk(summary)
    except Exception as e:  # a Ray upgrade that changed the private summary must not fail runs
        log.warning("per-stage statistics unavailable: %s", e)
        return {}
    names = iter(applied)
    out: dict[str, dict[str, Any]] = {}
    for op in ops:
        parts = op.operator_name.split("->")
        if not all(p.startswith("MapBatches(") for p in parts):
            continue  # FromItems, Union: bookkeeping, not stages
        name = "+".join(next(names, p) for p in parts)
        rows = int(op.output_num_rows.sum) if op.output_num_rows else 0
        if op.earliest_start_time is not None and op.latest_end_time is not None:
            seconds = max(0.0, op.latest_end_time - op.earliest_start_time)
        else:
            seconds = float(op.time_total_s or 0.0)
        out[name if name not in out else f"{name}#{len(out)}"] = {"rows": rows, "seconds": seconds}
    return out
