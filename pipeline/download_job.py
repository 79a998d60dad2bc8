"""The download half alone (``clipcurate download``): URL lists -> WebDataset shards in
img2dataset's layout, with manifests and ``_stats.json``.

    plan shards -> skip committed ones -> read -> download -> decode -> shard (pipeline/graph.py)
      on local worker processes (default) or Ray Data -> check every shard -> _stats.json

The stages and the shards they write are the job's; only the model half is missing. Resume:
shards whose manifest exists and matches are skipped; after the stream every planned shard
must be committed, and ``_stats.json`` holds the totals over all shards of the input
(including those an earlier run committed).
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from pipeline import schema as S
from pipeline.config import DownloadJobConfig, ExecutionConfig
from pipeline.shard_format import committed_shards, read_stats
from pipeline.stages.read import ShardDescriptor, plan_shards
from pipeline.storage import Storage

if TYPE_CHECKING:
    from pipeline.graph import Graph

log = logging.getLogger("clipcurate.download")


@dataclass
class DownloadSummary:
    """Totals of a download run. Counts are rows; times in seconds."""

    output_folder: str
    shards_planned: int
    shards_skipped: int
    shards_written: int
    count: int = 0
    successes: int = 0
    failed_to_download: int = 0
    failed_to_resize: int = 0
    status_dict: dict[str, int] = field(default_factory=dict)
    rows_this_run: int = 0
    successes_this_run: int = 0
    duration_s: float = 0.0
    scheduler: str = ""

    @property
    def images_per_s(self) -> float:
        """Stored images per second of this run's wall time."""
        return self.successes_this_run / self.duration_s if self.duration_s > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "images_per_s": self.images_per_s}


def run_download(
    cfg: DownloadJobConfig,
    execution: ExecutionConfig | None = None,
    wrap_graph: Callable[[Graph], Graph] | None = None,
) -> DownloadSummary:
    """Run the download half on the scheduler ``execution`` picks (default: ``cfg.execution``,
    local worker processes unless a Ray address is given or ``scheduler: ray``).

    Validates ``cfg`` (``ConfigError`` names the field), plans the shards, skips committed
    ones, streams the rest, then writes ``_stats.json`` in the output folder. Raises
    ``RuntimeError`` naming the shards that are not committed at the end. ``wrap_graph``:
    applied to the graph before it runs (tests inject faults with it).
    """
    from pipeline.graph import build_download_graph
    from pipeline.schedulers import scheduler_for

    execution = execution or cfg.execution
    cfg.validate()
    execution.validate()
    started = time.time()
    shards = plan_shards(cfg.read, cfg.shard.number_sample_per_shard, cfg.storage)
    storage = Storage(cfg.shard.output_folder, cfg.storage)
    committed = committed_shards(storage)
    todo = [d for d in shards if S.shard_name(d.shard_id) not in committed]
    log.info("%d shards planned, %d already committed, %d to do", len(shards), len(shards) - len(todo), len(todo))
    status: Counter[str] = Counter()
    scheduler = scheduler_for(execution)
    if todo:
        decode_cpus = execution.task_cpus if scheduler.name == "ray" else 1.0
        graph = build_download_graph(cfg, decode_isolation=execution.decode_isolation, decode_cpus=decode_cpus)
        if wrap_graph is not None:
            graph = wrap_graph(graph)

        def on_batch(batch: pa.Table) -> None:
            counts = Counter(batch.column(S.STATUS).to_pylist())
            status.update(counts)
            shard = batch.column(S.SHARD)[0].as_py() if batch.num_rows else "?"
            detail = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
            log.info("shard %s written (%s)", shard, detail)

        scheduler.run(graph, {"download": [d.as_row() for d in todo]}, on_batch)
        per_stage: Counter[str] = Counter()
        for k, v in status.items():
            per_stage[S.stage_of(k)] += v
        log.info("rows this run by stage outcome: %s", dict(per_stage))
    committed = committed_shards(storage)
    missing = [S.shard_name(d.shard_id) for d in todo if S.shard_name(d.shard_id) not in committed]
    if missing:
        raise RuntimeError(f"shards not committed after the run: {missing[:20]}")
    summary = write_totals(storage, shards, len(shards) - len(todo), len(todo), started)
    summary.rows_this_run = sum(status.values())
    summary.successes_this_run = status.get(S.OK, 0)
    summary.scheduler = scheduler.name
    return summary


def write_totals(
    storage: Storage, shards: list[ShardDescriptor], skipped: int, written: int, started: float
) -> DownloadSummary:
    """Sum every shard's ``_stats.json`` into the folder's ``_stats.json`` (img2dataset's
    counters plus shard counts); returns the totals."""
    summary = DownloadSummary(storage.root, len(shards), skipped, written)
    statuses: Counter[str] = Counter()
    for d in shards:
        stats = read_stats(storage, S.shard_name(d.shard_id))
        summary.count += stats["count"]
        summary.successes += stats["successes"]
        summary.failed_to_download += stats["failed_to_download"]
        summary.failed_to_resize += stats["failed_to_resize"]
        statuses.update(stats["status_dict"])
    summary.status_dict = dict(sorted(statuses.items()))
    summary.duration_s = time.time() - started
    totals = {
        "count": summary.count,
        "successes": summary.successes,
        "failed_to_download": summary.failed_to_download,
        "failed_to_resize": summary.failed_to_resize,
        "status_dict": summary.status_dict,
        "shards": summary.shards_planned,
        "shards_skipped": skipped,
        "shards_written": written,
        "duration": summary.duration_s,
    }
    storage.write_atomic("_stats.json", json.dumps(totals, indent=4).encode("utf-8"))
    return summary


__all__ = ["DownloadSummary", "run_download", "write_totals"]
