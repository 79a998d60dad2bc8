"""Build and run the Ray Data graph of the download half; the only module that knows the order.

    shard descriptors -> read -> download -> decode -> shard

(The same stages without Ray, one shard per local worker process: pipeline/local_runner.py,
which shares :func:`plan_download` and :func:`finish_download` with this module.)

Each shard travels as one block end to end: the descriptor dataset has one block per shard,
read runs with ``batch_size=1`` (one descriptor in, one shard's rows out) and every later stage
with ``batch_size=None`` (a whole block per call). ``target_max_block_size`` is raised so Ray
does not cut a shard's block; if it ever does, :class:`~pipeline.stages.shard.ShardStage`
(a single actor) reassembles the parts before writing.

Resume: shards whose manifest exists and matches are skipped. After the stream, the runner
checks every planned shard is committed and writes ``_stats.json`` with the totals over all
shards of the input (including those committed by an earlier run).

Resources (per task/actor): read 0.1 CPU; download runs as actors with 0 CPU, since its
threads wait on the network; decode tasks take 1 CPU each (the work is there); the shard
writer is one 0-CPU actor. So on an N-CPU machine N decode tasks run at once. Each decode
worker process keeps one crash-guard child (pipeline/crashguard.py) that does the decoding, so
a row that crashes the decoder is quarantined (``worker_crash``) instead of killing the worker.

Losing a worker, an actor or a whole node: Ray reruns a lost task at most
``TASK_MAX_RETRIES`` times and restarts a lost actor at most ``ACTOR_MAX_RESTARTS`` times
(resending its calls while it restarts), so a poison batch fails the job instead of looping. Every stage's side effects are
idempotent (shards and Parquet files are committed whole under fixed names), so a rerun batch
leaves each row exactly once in the output.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa

from pipeline import schema as S
from pipeline.config import ConfigError, DownloadJobConfig, EmbedConfig, ModerateConfig, WriteConfig
from pipeline.kill_hook import maybe_kill_self
from pipeline.stages.base import Resources, Stage
from pipeline.stages.decode import DecodeStage
from pipeline.stages.download import DownloadStage
from pipeline.stages.read import ReadStage, ShardDescriptor, plan_shards
from pipeline.stages.shard import ShardStage
from pipeline.storage import Storage

log = logging.getLogger("clipcurate.runner")

# Large enough that a shard of full-size downloaded images stays one block.
_MIN_TARGET_MAX_BLOCK_SIZE = 4 * 1024**3
# Bounded retries: a poison input fails the job after a few attempts instead of looping.
TASK_MAX_RETRIES = 2
ACTOR_MAX_RESTARTS = 2
# Calls to an actor are resent without limit while it restarts: a restart (on another node,
# after a node is lost, with its model to load) takes longer than a few quick resends, each
# of which Ray counts as a retry. Still bounded: a batch that kills its actor uses up one of
# the actor's ACTOR_MAX_RESTARTS each time, and a dead actor fails the calls sent to it.
# Exceptions raised in a call are never retried.
ACTOR_TASK_MAX_RETRIES = -1


class _StageActor:
    """Ray Data callable class: one stage object per actor, ``setup()`` once."""

    def __init__(self, stage: Stage) -> None:
        self.stage = stage
        stage.setup()

    def __call__(self, batch: pa.Table) -> pa.Table:
        out = self.stage.process_batch(batch)
        maybe_kill_self(type(self.stage).__name__)
        return out


def _stage_task(stage: Stage) -> Any:
    def run(batch: pa.Table) -> pa.Table:
        out = stage.process_batch(batch)
        maybe_kill_self(type(stage).__name__)
        return out

    run.__name__ = type(stage).__name__
    return run


def apply_stage(
    ds: Any, stage: Stage, batch_size: int | None = None, start_at_max: bool = False
) -> Any:
    """``ds.map_batches`` for one stage: an actor pool when ``stage.needs_actor``, else tasks.

    ``start_at_max``: an actor pool with ``concurrency=(min, max)`` starts with ``max`` actors
    (see :func:`apply_pool_stage`).
    """
    import ray
    from ray.util.annotations import RayDeprecationWarning

    common: dict[str, Any] = {
        "batch_size": batch_size,
        "batch_format": "pyarrow",
        "zero_copy_batch": True,
        "num_cpus": stage.resources.num_cpus,
    }
    if stage.resources.num_gpus:
        common["num_gpus"] = stage.resources.num_gpus
    # Ray Data retries forever by default (max_restarts / max_task_retries / max_retries = -1)
    # and has no named parameter for these yet; passing them as remote args is the only way
    # to bound retries, so its deprecation notice for remote args is silenced here only.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RayDeprecationWarning)
        if stage.needs_actor:
            size = stage.concurrency or 1
            lo, hi = size if isinstance(size, tuple) else (size, size)
            extra: dict[str, Any] = {}
            if start_at_max:
                # Two calls per actor (one running, one queued) keep a GPU fed, and stop the
                # first actor that is ready from queueing the whole input while the others
                # are still loading their models.
                extra = {"initial_size": hi, "max_tasks_in_flight_per_actor": 2}
            compute = ray.data.ActorPoolStrategy(min_size=lo, max_size=hi, **extra)
            return ds.map_batches(
                _StageActor,
                fn_constructor_args=(stage,),
                compute=compute,
                max_restarts=ACTOR_MAX_RESTARTS,
                max_task_retries=ACTOR_TASK_MAX_RETRIES,
                **common,
            )
        if stage.concurrency is not None:
            common["compute"] = ray.data.TaskPoolStrategy(
                size=stage.concurrency if isinstance(stage.concurrency, int) else stage.concurrency[1]
            )
        return ds.map_batches(_stage_task(stage), max_retries=TASK_MAX_RETRIES, **common)


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

    @property
    def images_per_s(self) -> float:
        """Stored images per second of this run's wall time."""
        return self.successes_this_run / self.duration_s if self.duration_s > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "images_per_s": self.images_per_s}


def build_stages(
    cfg: DownloadJobConfig, download_concurrency: int = 2, decode_isolation: bool = True
) -> list[Stage]:
    """The stages after read, in order, with the resources described in the module docstring.

    ``decode_isolation``: decode in a crash-guard child process (see
    :class:`~pipeline.stages.decode.DecodeStage`); off saves its small overhead but lets a row
    that crashes the decoder kill the worker, and after Ray's bounded retries, the job.
    """
    return [
        DownloadStage(
            config=cfg.download,
            resources=Resources(num_cpus=0),
            # Autoscaling from one actor, so a one-shard job does not start idle actors.
            concurrency=(1, download_concurrency),
        ),
        DecodeStage(cfg=cfg.decode, resources=Resources(num_cpus=1), isolate=decode_isolation),
        ShardStage(
            cfg=cfg.shard,
            storage=cfg.storage,
            passthrough=tuple(cfg.read.save_additional_columns),
            resources=Resources(num_cpus=0),
            concurrency=1,
        ),
    ]


@dataclass
class DownloadPlan:
    """The shards of a download run: all of them (``shards``, in input order), the ones not
    committed yet (``todo``), and the output folder (``storage``)."""

    shards: list[ShardDescriptor]
    todo: list[ShardDescriptor]
    storage: Storage
    started: float

    @property
    def skipped(self) -> int:
        return len(self.shards) - len(self.todo)

    def read_stage(self, cfg: DownloadJobConfig) -> ReadStage:
        """The read stage for these shards (descriptor rows in, the shard's rows out)."""
        return ReadStage(
            cfg=cfg.read,
            number_sample_per_shard=cfg.shard.number_sample_per_shard,
            storage=cfg.storage,
            resources=Resources(num_cpus=0.1),
        )


def plan_download(cfg: DownloadJobConfig) -> DownloadPlan:
    """Validate ``cfg`` (``ConfigError`` names the field), plan the shards and find the ones an
    earlier run committed; shared by every distributor of the download half."""
    cfg.validate()
    started = time.time()
    shards = plan_shards(cfg.read, cfg.shard.number_sample_per_shard, cfg.storage)
    storage = Storage(cfg.shard.output_folder, cfg.storage)
    committed = storage.committed_shards()
    todo = [d for d in shards if S.shard_name(d.shard_id) not in committed]
    log.info(
        "%d shards planned, %d already committed, %d to do", len(shards), len(shards) - len(todo), len(todo)
    )
    return DownloadPlan(shards, todo, storage, started)


def finish_download(plan: DownloadPlan, status_this_run: Counter[str]) -> DownloadSummary:
    """Check that every planned shard is committed (``RuntimeError`` naming the missing ones
    otherwise), write ``_stats.json`` with the totals over all shards, and return them.

    ``status_this_run``: rows per status that this run's stream returned."""
    committed = plan.storage.committed_shards()
    missing = [S.shard_name(d.shard_id) for d in plan.todo if S.shard_name(d.shard_id) not in committed]
    if missing:
        raise RuntimeError(f"shards not committed after the run: {missing[:20]}")
    summary = _write_totals(plan.storage, plan.shards, plan.skipped, len(plan.todo), plan.started)
    summary.rows_this_run = sum(status_this_run.values())
    summary.successes_this_run = status_this_run.get(S.OK, 0)
    return summary


def run_download(
    cfg: DownloadJobConfig, download_concurrency: int = 2, decode_isolation: bool = True
) -> DownloadSummary:
    """Run the download half on the current Ray cluster (``ray.init`` first, or one starts).

    Validates ``cfg`` (``ConfigError`` names the field), plans the shards, skips committed
    ones, streams the rest through the stages, then writes ``_stats.json`` in the output
    folder. Raises ``RuntimeError`` if a planned shard is not committed at the end.
    Without Ray: :func:`pipeline.local_runner.run_download_local`.
    """
    import ray

    plan = plan_download(cfg)
    per_stage: Counter[str] = Counter()
    status_this_run: Counter[str] = Counter()
    if plan.todo:
        if not ray.is_initialized():
            ray.init()
        ctx = ray.data.DataContext.get_current()
        ctx.target_max_block_size = max(ctx.target_max_block_size or 0, _MIN_TARGET_MAX_BLOCK_SIZE)
        ctx.enable_progress_bars = False
        ds = ray.data.from_items([d.as_row() for d in plan.todo], override_num_blocks=len(plan.todo))
        ds = apply_stage(ds, plan.read_stage(cfg), batch_size=1)
        for stage in build_stages(cfg, download_concurrency, decode_isolation):
            ds = apply_stage(ds, stage)
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            for status in batch.column(S.STATUS).to_pylist():
                status_this_run[status] += 1
                per_stage[S.stage_of(status)] += 1
        log.info("rows this run by stage outcome: %s", dict(per_stage))
    return finish_download(plan, status_this_run)


def _write_totals(
    storage: Storage, shards: list[ShardDescriptor], skipped: int, written: int, started: float
) -> DownloadSummary:
    summary = DownloadSummary(storage.root, len(shards), skipped, written)
    statuses: Counter[str] = Counter()
    for d in shards:
        stats = json.loads(storage.read_bytes(f"{S.shard_name(d.shard_id)}_stats.json"))
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


__all__ = [
    "DownloadPlan",
    "DownloadSummary",
    "apply_stage",
    "build_stages",
    "finish_download",
    "plan_download",
    "run_download",
]


# ==============================================================================================
# The full graph (helper E): download -> decode -> shard -> preprocess -> embed -> moderate -> write
# ==============================================================================================


@dataclass
class CurateSummary:
    """Totals of a full run. Counts are rows; times in seconds."""

    shards_planned: int
    shards_downloaded: int
    shards_reembedded: int
    files: list[str] = field(default_factory=list)
    status_dict: dict[str, int] = field(default_factory=dict)
    rows_this_run: int = 0
    flagged_unsafe: int = 0
    duration_s: float = 0.0


def check_gpus(embed: EmbedConfig) -> None:
    """Fail fast when the embed actors ask for GPUs the cluster does not have (an actor pool
    waiting for resources that never come would otherwise hang the job)."""
    import ray

    need = embed.num_gpus * embed.concurrency[0]
    if need <= 0:
        return
    have = float(ray.cluster_resources().get("GPU", 0.0))
    if have < need:
        raise RuntimeError(
            f"embed.num_gpus={embed.num_gpus} x embed.concurrency min {embed.concurrency[0]} needs "
            f"{need:g} GPU(s), but the Ray cluster has {have:g}. Set embed.num_gpus=0 to embed on "
            "CPU, or connect to a cluster with GPUs."
        )


def apply_pool_stage(ds: Any, stage: Stage) -> Any:
    """:func:`apply_stage` for an actor-pool stage with ``concurrency=(min, max)``, except that
    the pool starts at ``max`` actors instead of ``min``.

    Ray Data grows a pool only when its actors have ~2 calls queued each; embedding actors
    behind a download-bound stream rarely do, so the pool would stay at ``min`` and GPUs
    reserved for the job would idle. Starting at ``max`` loads every model once up front; Ray
    still shrinks the pool to ``min`` when actors sit idle and at the end of the input.
    """
    return apply_stage(ds, stage, stage.batch_size, start_at_max=True)


def build_embed_stages(
    download: DownloadJobConfig,
    embed: EmbedConfig,
    moderate: ModerateConfig,
    write: WriteConfig,
    model: Any = None,
    thumbnails: bool = False,
) -> list[Stage]:
    """preprocess, embed, moderate (when enabled) and write, configured and ready to apply.

    ``model``: a clip_model CLIP for ``embed`` already loaded in the driver (it embeds the
    moderation prompts); loaded on CPU when None. ``thumbnails``: store each row's
    ``image_thumb`` (on when ``dedup.pixel_check`` is).
    """
    from pipeline.stages.embed import EmbedStage, PreprocessStage, load_model
    from pipeline.stages.moderate import ModerateStage
    from pipeline.stages.write import WriteStage

    if model is None:
        model, _ = load_model(embed.model, embed.pretrained)
    pp = model.preprocess_cfg
    dim = int(model.embed_dim)
    stages: list[Stage] = [
        PreprocessStage(
            preprocess=pp,
            shard_folder=download.shard.output_folder,
            storage=download.storage,
            context_length=model.context_length,
            tokenizer=model.tokenizer,
            thumbnails=thumbnails,
            resources=Resources(num_cpus=embed.preprocess_num_cpus),
        ),
        EmbedStage(
            cfg=embed,
            preprocess=pp,
            resources=Resources(num_cpus=embed.num_cpus, num_gpus=embed.num_gpus),
            batch_size=embed.rows_per_call,
            concurrency=tuple(embed.concurrency),
        ),
    ]
    if moderate.enabled:
        mod = ModerateStage(
            cfg=moderate, embed=embed, storage=download.storage, resources=Resources(num_cpus=0), concurrency=1
        )
        mod.prepare(model)  # prompts embedded once, here; actors receive small arrays
        stages.append(mod)
    stages.append(
        WriteStage(
            cfg=write,
            storage=download.storage,
            shard_folder=download.shard.output_folder,
            dim=dim,
            resources=Resources(num_cpus=0),
            concurrency=1,
        )
    )
    return stages


def apply_embed_stages(ds: Any, stages: list[Stage]) -> Any:
    """Apply :func:`build_embed_stages`' stages to a dataset of shard rows, each with its own
    rows-per-call; the embed actor pool starts at its maximum (:func:`apply_pool_stage`)."""
    from pipeline.stages.embed import EmbedStage

    for stage in stages:
        if isinstance(stage, EmbedStage):
            ds = apply_pool_stage(ds, stage)
        else:
            ds = apply_stage(ds, stage, batch_size=stage.batch_size)
    return ds


def run_curate(
    download: DownloadJobConfig,
    embed: EmbedConfig,
    moderate: ModerateConfig,
    write: WriteConfig,
    download_concurrency: int = 2,
) -> CurateSummary:
    """Run the whole streaming graph on the current Ray cluster (``ray.init`` first, or one
    starts); returns the totals.

    Validates every config, checks the cluster has the GPUs the embed actors ask for, then
    streams the shards that are not committed yet through every stage. Shards committed by an
    earlier run but without their output Parquet are re-embedded from their tars. Raises
    ``RuntimeError`` when a planned shard has no output file at the end.
    """
    import io

    import pyarrow.parquet as pq
    import ray

    download.validate()
    embed.validate()
    moderate.validate()
    write.validate()
    if write.output_folder.rstrip("/") == download.shard.output_folder.rstrip("/"):
        raise ConfigError("write.output_folder: must differ from shard.output_folder (both hold <shard>.parquet)")
    started = time.time()
    if not ray.is_initialized():
        ray.init()
    check_gpus(embed)
    n = download.shard.number_sample_per_shard
    shards = plan_shards(download.read, n, download.storage)
    storage = Storage(download.shard.output_folder, download.storage)
    committed = storage.committed_shards()
    todo = [d for d in shards if S.shard_name(d.shard_id) not in committed]
    out = Storage(write.output_folder, download.storage)
    redo = [
        S.shard_name(d.shard_id)
        for d in shards
        if S.shard_name(d.shard_id) in committed and out.size(f"{S.shard_name(d.shard_id)}.parquet") is None
    ]
    log.info("%d shards planned: %d to download, %d to re-embed", len(shards), len(todo), len(redo))
    with warnings.catch_warnings():
        # Ray's first get_current() sets its own deprecated fields and warns about them.
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx = ray.data.DataContext.get_current()
    ctx.target_max_block_size = max(ctx.target_max_block_size or 0, _MIN_TARGET_MAX_BLOCK_SIZE)
    ctx.enable_progress_bars = False
    summary = CurateSummary(len(shards), len(todo), len(redo))
    statuses: Counter[str] = Counter()
    datasets = []
    if redo:
        tables = [pq.read_table(io.BytesIO(storage.read_bytes(f"{s}.parquet"))) for s in redo]
        datasets.append(ray.data.from_arrow(tables))
    if todo:
        ds = ray.data.from_items([d.as_row() for d in todo], override_num_blocks=len(todo))
        read = ReadStage(
            cfg=download.read, number_sample_per_shard=n, storage=download.storage,
            resources=Resources(num_cpus=0.1),
        )
        ds = apply_stage(ds, read, batch_size=1)
        for stage in build_stages(download, download_concurrency):
            ds = apply_stage(ds, stage)
        datasets.append(ds)
    if datasets:
        tail = build_embed_stages(download, embed, moderate, write)
        for ds in datasets:
            ds = apply_embed_stages(ds, tail)
            for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
                statuses.update(batch.column(S.STATUS).to_pylist())
                if S.UNSAFE_CONCEPT in batch.column_names:
                    summary.flagged_unsafe += batch.num_rows - batch.column(S.UNSAFE_CONCEPT).null_count
    missing = [S.shard_name(d.shard_id) for d in shards if out.size(f"{S.shard_name(d.shard_id)}.parquet") is None]
    if missing:
        raise RuntimeError(f"shards without an output Parquet after the run: {missing[:20]}")
    if todo:
        _write_totals(storage, shards, len(shards) - len(todo), len(todo), started)
    summary.files = [out.uri(f"{S.shard_name(d.shard_id)}.parquet") for d in shards]
    summary.status_dict = dict(sorted(statuses.items()))
    summary.rows_this_run = sum(statuses.values())
    summary.duration_s = time.time() - started
    return summary


__all__ += ["CurateSummary", "apply_embed_stages", "apply_pool_stage", "build_embed_stages", "check_gpus", "run_curate"]
