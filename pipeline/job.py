"""The whole job: the streaming graph, then the global pass, with resume.

    plan shards ─┬─ not committed:   read -> download -> decode -> shard ─┐
                 └─ committed, not embedded: rows from <shard>.parquet ───┴─> preprocess
      -> embed (actor pool) -> moderate -> write <output>/embeddings/<shard>.parquet
    then: read back -> dedup (+ an earlier run) -> decisions -> rewrite changed files
      -> _stats.json, report.html

Resume and idempotency follow from names and commit markers, never from a log:

* a shard whose manifest is committed is never downloaded or uploaded again; if its
  embeddings file is missing (the run died between the two), its rows are read back from the
  shard's parquet and its images from its tar, and only the embed half runs for it;
* a shard whose ``embeddings/<shard>.parquet`` exists is done (the file appears atomically);
* the global pass recomputes every decision from the measured columns and rewrites only the
  files whose content changes, so re-running a finished job writes nothing at all (the
  report and stats are only rewritten when something else was).

``<output>/config.yaml`` records the resolved config. A later run on the same output must
agree with it on everything that shapes the stored rows (input, read, decode, shard, the model
and moderation); filters, dedup settings and execution may change, and then only the
decisions are recomputed.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import job_config as J
from pipeline import schema as S
from pipeline.config import ConfigError, JobConfig, ReadConfig, StorageConfig
from pipeline.decisions import DECISION_COLUMNS, decide, kept_rows
from pipeline.report import HTML_NAME as REPORT_NAME
from pipeline.report import STATS_NAME
from pipeline.stages.base import Resources, Stage
from pipeline.storage import Storage, StorageError, filesystem_for
from pipeline.takedown import TAKEDOWN

log = logging.getLogger("clipcurate.job")

CONFIG_NAME = "config.yaml"
# Sections (or section.field) a later run on the same output must not change.
# dedup.pixel_check decides whether rows carry thumbnails: rows written without them cannot be
# pixel-checked later.
SHAPING = ("input", "read", "decode", "shard", "embed.model", "embed.pretrained", "moderate", "dedup.pixel_check")


# ------------------------------------------------------------------------------- summary


@dataclass
class JobSummary:
    """What a run found and did. Counts are rows unless named otherwise; times in seconds."""

    output: str
    input_rows: int = 0
    shards_planned: int = 0
    shards_downloaded: int = 0  # went through download -> shard in this run
    shards_reembedded: int = 0  # committed earlier, embedded in this run
    shards_skipped: int = 0  # already complete
    rows: int = 0
    rows_this_run: int = 0
    kept: int = 0
    status_counts: dict[str, int] = field(default_factory=dict)
    drop_reasons: dict[str, int] = field(default_factory=dict)
    files_rewritten: int = 0  # embeddings files whose decisions changed in the global pass
    timings: dict[str, float] = field(default_factory=dict)
    wrote_report: bool = False

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------- stream


@dataclass
class CommittedShardRows(Stage):
    """Descriptors of committed shards (:class:`~pipeline.stages.read.ShardDescriptor` columns)
    -> those shards' rows, read back from ``<shard_folder>/<shard>.parquet``, for shards whose
    embeddings are missing. The images stay in the tar, where the preprocess stage reads them.

    Passthrough columns (``read.save_additional_columns``) the shard parquet does not hold (the
    shard stage leaves out names starting with ``_``) are read again from the input rows of the
    shard (no download) and joined by key.
    """

    read: ReadConfig = field(default_factory=ReadConfig)
    number_sample_per_shard: int = 1000
    shard_folder: str = ""
    storage: StorageConfig = field(default_factory=StorageConfig)

    def process_batch(self, batch: pa.Table) -> pa.Table:
        from pipeline.stages.read import ShardDescriptor, read_shard

        store = Storage(self.shard_folder, self.storage)
        parts = []
        for row in batch.to_pylist():
            d = ShardDescriptor(**row)
            table = pq.read_table(pa.BufferReader(store.read_bytes(f"{S.shard_name(d.shard_id)}.parquet")))
            missing = [c for c in self.read.save_additional_columns if c not in table.column_names]
            if missing:
                source = read_shard(d, self.read, self.number_sample_per_shard, self.storage)
                have = [c for c in missing if c in source.column_names]
                if have:
                    table = table.join(source.select([S.KEY, *have]), S.KEY, join_type="left outer")
            parts.append(table.sort_by(S.KEY))
        return pa.concat_tables(parts, promote_options="permissive") if len(parts) > 1 else parts[0]


class _Progress:
    """Prints one line per finished shard and counts rows per status and stage."""

    def __init__(self, expected: dict[str, int], total_shards: int, emit: Callable[[str], None]) -> None:
        self.expected = expected
        self.seen: Counter[str] = Counter()
        self.per_shard: dict[str, Counter[str]] = {}
        self.status: Counter[str] = Counter()
        self.done = 0
        self.total = total_shards
        self.started = time.time()
        self.emit = emit

    def update(self, batch: pa.Table) -> None:
        shards = batch.column(S.SHARD).to_pylist()
        statuses = batch.column(S.STATUS).to_pylist()
        for shard, status in zip(shards, statuses, strict=True):
            self.seen[shard] += 1
            self.per_shard.setdefault(shard, Counter())[status] += 1
            self.status[status] += 1
        for shard in dict.fromkeys(shards):
            if self.seen[shard] == self.expected.get(shard, -1):
                self.done += 1
                counts = self.per_shard.pop(shard)
                rows = sum(self.status.values())
                rate = rows / max(time.time() - self.started, 1e-9)
                detail = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
                self.emit(
                    f"  shard {shard} embedded: {self.seen[shard]} rows ({detail}); "
                    f"{self.done}/{self.total} shards, {rows} rows, {rate:.1f} rows/s"
                )


def stream(
    cfg: JobConfig,
    to_download: list[Any],
    to_embed: list[Any],
    expected: dict[str, int],
    emit: Callable[[str], None],
) -> tuple[Counter[str], dict[str, dict[str, Any]]]:
    """Run the streaming graph over the given shards; returns (rows per status, per-operator
    rows and seconds, see :func:`operator_stats`).

    ``to_download`` / ``to_embed``: :class:`~pipeline.stages.read.ShardDescriptor` of shards
    to fetch / of committed shards that only need the embed half; ``expected``: rows per shard
    name (for progress).
    """
    import ray

    from pipeline.runner import (
        _MIN_TARGET_MAX_BLOCK_SIZE,
        apply_embed_stages,
        apply_stage,
        build_embed_stages,
        build_stages,
        check_gpus,
    )
    from pipeline.stages.embed import load_model, model_id
    from pipeline.stages.read import ReadStage

    if not ray.is_initialized():
        # log_to_driver=False: worker logs stay in Ray's log files; the driver prints progress.
        ray.init(address=cfg.execution.ray_address, log_to_driver=False)
    try:
        check_gpus(cfg.embed)
    except RuntimeError as e:  # GPUs asked for that the cluster lacks: a configuration error
        raise ConfigError(str(e)) from e
    try:
        model, pp = load_model(cfg.embed.model, cfg.embed.pretrained)
    except (ValueError, OSError, KeyError) as e:
        raise ConfigError(f"embed.pretrained: cannot load {cfg.embed.model} ({cfg.embed.pretrained}): {e}") from e
    dim = int(model.embed_dim)
    emit(f"model {model_id(model)}: {dim}-d embeddings, {pp.image_size}px input")

    with warnings.catch_warnings():
        # Ray's first get_current() sets its own deprecated fields and warns about them.
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx = ray.data.DataContext.get_current()
    ctx.target_max_block_size = max(ctx.target_max_block_size or 0, _MIN_TARGET_MAX_BLOCK_SIZE)
    ctx.enable_progress_bars = False
    download = cfg.download_job()
    parts = []
    applied: list[str] = []  # stage names in the order their operators appear
    if to_download:
        ds = ray.data.from_items([d.as_row() for d in to_download], override_num_blocks=len(to_download))
        read = ReadStage(cfg=cfg.read, number_sample_per_shard=cfg.shard.number_sample_per_shard,
                         storage=cfg.storage, resources=Resources(num_cpus=0.1))
        ds = apply_stage(ds, read, batch_size=1)
        applied.append(type(read).__name__)
        for stage in build_stages(download, cfg.execution.download_concurrency, cfg.execution.decode_isolation):
            ds = apply_stage(ds, stage)
            applied.append(type(stage).__name__)
        parts.append(ds)
    if to_embed:
        ds = ray.data.from_items([d.as_row() for d in to_embed], override_num_blocks=len(to_embed))
        reread = CommittedShardRows(read=cfg.read, number_sample_per_shard=cfg.shard.number_sample_per_shard,
                                    shard_folder=cfg.shard.output_folder, storage=cfg.storage,
                                    resources=Resources(num_cpus=0.1))
        parts.append(apply_stage(ds, reread, batch_size=1))
        applied.append(type(reread).__name__)
    # One dataset, so both sources share one embedding actor pool and one writer.
    ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    # preprocess -> embed -> moderate -> write, wired as pipeline.runner does for run_curate.
    tail = build_embed_stages(
        download, cfg.embed, cfg.moderate, cfg.write, model=model, thumbnails=cfg.dedup.pixel_check
    )
    del model
    ds = apply_embed_stages(ds, tail)
    applied += [type(stage).__name__ for stage in tail]
    progress = _Progress(expected, len(to_download) + len(to_embed), emit)
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        progress.update(batch)
    by_stage: Counter[str] = Counter()
    for status, n in progress.status.items():
        by_stage[S.stage_of(status)] += n
    emit("  rows by outcome: " + ", ".join(f"{k} {v}" for k, v in sorted(by_stage.items())))
    stages = operator_stats(ds, applied)
    for name, st in stages.items():
        rate = st["rows"] / st["seconds"] if st["seconds"] > 0 else 0.0
        emit(f"  {name:<40} {st['rows']:>8} rows  {st['seconds']:8.1f} s  {rate:8.1f} rows/s")
    return progress.status, stages


def operator_stats(ds: Any, applied: list[str]) -> dict[str, dict[str, Any]]:
    """Per stage of a finished dataset: ``{"rows": rows out, "seconds": wall time from its
    first task's start to its last task's end}``.

    ``applied``: the stage class names in the order they were applied. Ray names an actor
    stage's operator after the runner's wrapper class, so ``MapBatches(...)`` operators are
    matched to ``applied`` in order (a fused ``A->B`` operator takes two names). Read from Ray
    Data's stats summary (``Dataset._get_stats_summary``, not a public API): when that is
    unavailable the job runs on and the report has no per-stage rows.
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


# --------------------------------------------------------------------------- global pass


def _read_parquet(uri: str, storage: StorageConfig, columns: list[str] | None = None) -> pa.Table:
    fs, path = filesystem_for(uri, storage)
    return pq.read_table(path, filesystem=fs, columns=columns)


def read_previous(against: str, storage: StorageConfig) -> pa.Table:
    """The rows an earlier run kept, for ``dedup.against``: its ``embeddings/`` folder when
    ``against`` is a job output, else ``against`` itself as a folder of Parquet files."""
    import pyarrow.dataset as pads

    root = against.rstrip("/")
    folder = f"{root}/embeddings"
    if not any(n.endswith(".parquet") for n in Storage(folder, storage).list_names()):
        folder = root
    names = [n for n in Storage(folder, storage).list_names() if n.endswith(".parquet") and not n.startswith(".")]
    if not names:
        raise ConfigError(f"dedup.against: no Parquet files under {against!r} or {folder!r}")
    fs, path = filesystem_for(folder, storage)
    dataset = pads.dataset([f"{path}/{n}" for n in names], format="parquet", filesystem=fs)
    have = dataset.schema.names
    missing = [c for c in (S.KEY, S.IMAGE_EMBEDDING) if c not in have]
    if missing:
        raise ConfigError(f"dedup.against: {against!r} lacks column(s) {missing}")
    cols = [c for c in (S.KEY, S.SHA256, S.IMAGE_EMBEDDING, S.STATUS, S.DUPLICATE_OF, S.KEEP, S.IMAGE_THUMB) if c in have]
    return kept_rows(dataset.to_table(columns=cols))


_DECISION_INPUTS = [
    S.KEY, S.SHARD, S.URL, S.CAPTION, S.STATUS, S.ERROR, S.SHA256, S.CLIP_SCORE, S.IMAGE_EMBEDDING,
    S.UNSAFE_SCORE, S.UNSAFE_CONCEPT, S.UNSAFE_SOURCE, S.MODEL, TAKEDOWN, S.IMAGE_THUMB,
]


def global_pass(cfg: JobConfig, shards: list[str], emit: Callable[[str], None]) -> tuple[pa.Table, int]:
    """Dedup and decisions over every shard's embeddings file; rewrites the files whose
    decisions changed (atomically, same names). Returns (the decided rows without embeddings,
    the number of files rewritten)."""
    from pipeline.stages.moderate import resolve_rules
    from pipeline.stages.write import write_parquet

    root = cfg.write.output_folder.rstrip("/")
    tables = []
    for shard in shards:
        uri = f"{root}/{shard}.parquet"
        fs, path = filesystem_for(uri, cfg.storage)
        have = pq.read_schema(path, filesystem=fs).names
        tables.append(_read_parquet(uri, cfg.storage, [c for c in _DECISION_INPUTS if c in have]))
    table = pa.concat_tables(tables, promote_options="permissive")
    previous = None
    if cfg.dedup.against and cfg.filter.duplicates:
        previous = read_previous(cfg.dedup.against, cfg.storage)
        emit(f"  dedup against {cfg.dedup.against}: {previous.num_rows} kept rows")
    rules = resolve_rules(cfg.moderate, cfg.storage) if cfg.moderate.enabled else None
    decided = decide(table, cfg.filter, cfg.dedup, rules, previous, progress=emit)
    decided = decided.drop_columns([c for c in (S.IMAGE_EMBEDDING, S.IMAGE_THUMB) if c in decided.column_names])

    rewritten = 0
    shard_col = decided.column(S.SHARD).to_pylist()
    by_shard: dict[str, list[int]] = {}
    for i, s in enumerate(shard_col):
        by_shard.setdefault(s, []).append(i)
    for shard in shards:
        uri = f"{root}/{shard}.parquet"
        old = _read_parquet(uri, cfg.storage)
        mine = decided.take(pa.array(by_shard.get(shard, []), pa.int64())).sort_by(S.KEY)
        new = old.sort_by(S.KEY)  # the write stage stores rows sorted by key already
        if new.column(S.KEY).to_pylist() != mine.column(S.KEY).to_pylist():
            raise RuntimeError(f"{uri}: its keys changed while the global pass ran")
        for name in DECISION_COLUMNS:
            arr = mine.column(name)
            if name in new.column_names:
                arr = arr.cast(new.schema.field(name).type)
                new = new.set_column(new.column_names.index(name), name, arr)
            else:
                new = new.append_column(name, arr)
        if not new.equals(old):
            write_parquet(new, uri, cfg.write, cfg.storage)
            rewritten += 1
    return decided, rewritten


# ----------------------------------------------------------------------------- the job


def _check_same_output(cfg: JobConfig, out: Storage) -> bool:
    """Compare with the config.yaml an earlier run left; True when one exists and matches
    exactly. Raises ConfigError when it differs in a shaping field."""
    try:
        text = out.read_bytes(CONFIG_NAME).decode("utf-8")
    except FileNotFoundError:  # Storage maps S3's NoSuchKey to it; other failures propagate
        return False
    before = J.to_dict(J.from_yaml_text(text))
    now = J.to_dict(cfg)
    for path in SHAPING:
        a, b = before, now
        for part in path.split("."):
            a, b = a.get(part), b.get(part)
        for name, old, new in _differences(path, a, b):
            raise ConfigError(
                f"{name}: {cfg.output_root} was written with {old!r}, this run has {new!r}; "
                "write to a new output (or restore the setting)"
            )
    return before == now


def _differences(path: str, a: Any, b: Any) -> list[tuple[str, Any, Any]]:
    """(dotted field, value in a, value in b) for every leaf where two config dicts differ."""
    if isinstance(a, dict) and isinstance(b, dict) and path.count(".") < 1:
        out = []
        for k in dict.fromkeys([*a, *b]):
            out += _differences(f"{path}.{k}", a.get(k), b.get(k))
        return out
    return [] if a == b else [(path, a, b)]


def run(cfg: JobConfig, emit: Callable[[str], None] | None = None) -> JobSummary:
    """Run the job. Validates ``cfg`` first (``ConfigError`` names the bad field). Ray is
    only needed when shards must be streamed: then the current Ray connection is used, or
    ``ray.init(execution.ray_address)`` joins ``$RAY_ADDRESS`` or starts a local Ray."""
    emit = emit or (lambda line: print(line, flush=True))
    cfg = J.validate(cfg)
    started = time.time()
    out = Storage(cfg.output_root, cfg.storage)
    summary = JobSummary(output=cfg.output_root)
    # A run killed mid-upload leaves incomplete multipart uploads (S3 bills their parts until
    # they are aborted) or temporary files; this run owns the output now, so clear them.
    try:
        leftovers = out.abort_incomplete_writes()
    except StorageError as e:  # e.g. no s3:ListBucketMultipartUploads: hygiene, not correctness
        log.warning("could not clear incomplete uploads under %s: %s", cfg.output_root, e)
        leftovers = []
    if leftovers:
        emit(f"removed {len(leftovers)} incomplete write(s) an earlier run left: "
             + ", ".join(leftovers[:5]) + (" ..." if len(leftovers) > 5 else ""))
    same_config = _check_same_output(cfg, out)
    record_config = not same_config
    if record_config and out.size(CONFIG_NAME) is None:
        # A new output records what shapes its rows before the first row is stored; a changed
        # config of an existing output is recorded after the report (_record_config).
        out.write_atomic(CONFIG_NAME, J.to_yaml(cfg).encode("utf-8"))
        record_config = False

    from pipeline.stages.read import plan_shards

    plan = plan_shards(cfg.read, cfg.shard.number_sample_per_shard, cfg.storage)
    names = [S.shard_name(d.shard_id) for d in plan]
    expected = {S.shard_name(d.shard_id): d.length for d in plan}
    committed = Storage(cfg.shard.output_folder, cfg.storage).committed_shards()
    embedded = set(_embedded_shards(cfg))
    to_download = [d for d, n in zip(plan, names, strict=True) if n not in committed]
    to_embed = [d for d, n in zip(plan, names, strict=True) if n in committed and n not in embedded]
    summary.shards_planned = len(plan)
    summary.input_rows = sum(expected.values())
    summary.shards_downloaded, summary.shards_reembedded = len(to_download), len(to_embed)
    summary.shards_skipped = len(plan) - len(to_download) - len(to_embed)
    emit(f"{len(plan)} shards planned ({sum(expected.values())} rows): {len(to_download)} to download, "
         f"{len(to_embed)} committed but not embedded, {summary.shards_skipped} done")
    summary.timings["plan"] = time.time() - started

    statuses: Counter[str] = Counter()
    stages: dict[str, dict[str, Any]] = {}
    if to_download or to_embed:
        t0 = time.time()
        emit("stream: download -> decode -> shard -> preprocess -> embed -> moderate -> write")
        statuses, stages = stream(cfg, to_download, to_embed, expected, emit)
        summary.timings["stream"] = time.time() - t0
    summary.rows_this_run = sum(statuses.values())
    missing = sorted(set(names) - set(_embedded_shards(cfg)))
    if missing:
        raise RuntimeError(f"shards without an embeddings file after the stream: {missing[:20]}")

    changed = bool(to_download or to_embed or not same_config)
    summary = _finish(cfg, names, summary, stages, changed, started, emit)
    if record_config:
        _record_config(cfg, out)
    return summary


def _record_config(cfg: JobConfig, out: Storage) -> None:
    """Write a changed config.yaml, only once the report is written: a run killed between
    rewriting decisions and writing the report leaves the old config behind, so the next run
    still sees a change and rewrites the report instead of keeping a stale one."""
    out.write_atomic(CONFIG_NAME, J.to_yaml(cfg).encode("utf-8"))


def _embedded_shards(cfg: JobConfig) -> list[str]:
    return sorted(n[: -len(".parquet")] for n in Storage(cfg.write.output_folder, cfg.storage).list_names()
                  if n.endswith(".parquet") and not n.startswith("."))


def _finish(
    cfg: JobConfig,
    names: list[str],
    summary: JobSummary,
    stages: dict[str, dict[str, Any]],
    changed: bool,
    started: float,
    emit: Callable[[str], None],
) -> JobSummary:
    """Global pass over the shards ``names``, then the report when anything changed (or it
    is missing)."""
    t0 = time.time()
    emit("global pass: dedup and decisions")
    decided, summary.files_rewritten = global_pass(cfg, names, emit)
    summary.timings["global_pass"] = time.time() - t0
    summary.rows = decided.num_rows
    summary.kept = int(sum(1 for k in decided.column(S.KEEP).to_pylist() if k))
    summary.status_counts = dict(Counter(decided.column(S.STATUS).to_pylist()).most_common())
    summary.drop_reasons = dict(Counter(r for r in decided.column(S.DROP_REASON).to_pylist() if r).most_common())
    have = set(Storage(cfg.output_root, cfg.storage).list_names())
    if changed or summary.files_rewritten or STATS_NAME not in have or REPORT_NAME not in have:
        t0 = time.time()
        emit("report: _stats.json and report.html")
        summary.timings["total"] = t0 - started  # up to the report, which cannot time itself
        write_report(cfg, decided, summary, stages)
        summary.timings["report"] = time.time() - t0
        summary.wrote_report = True
    summary.timings["total"] = time.time() - started
    return summary


def redecide(cfg: JobConfig, emit: Callable[[str], None] | None = None) -> JobSummary:
    """Dedup, decisions and report again over the embeddings an output already holds, with
    ``cfg``'s filter and dedup settings (jobs/dedup.py). No Ray, nothing downloaded or
    embedded; files whose decisions do not change are not rewritten. ``cfg`` usually comes
    from the output's config.yaml; fields that shape the stored rows must not differ from it.
    """
    emit = emit or (lambda line: print(line, flush=True))
    cfg = J.validate(cfg)
    started = time.time()
    out = Storage(cfg.output_root, cfg.storage)
    same_config = _check_same_output(cfg, out)
    names = _embedded_shards(cfg)
    if not names:
        raise ConfigError(f"output: {cfg.output_root} has no embeddings files to deduplicate")
    summary = JobSummary(output=cfg.output_root, shards_planned=len(names), shards_skipped=len(names))
    emit(f"{len(names)} embeddings files under {cfg.write.output_folder}")
    summary = _finish(cfg, names, summary, {}, not same_config, started, emit)
    if not same_config:
        _record_config(cfg, out)
    summary.input_rows = summary.rows
    return summary


def write_report(
    cfg: JobConfig, decided: pa.Table, summary: JobSummary, stages: dict[str, dict[str, Any]]
) -> None:
    """``_stats.json`` and ``report.html`` in the output root (pipeline/report.py), with
    thumbnails of sample rows read from the shard tars."""
    from pipeline import report

    keys = report.sample_keys(decided)
    thumbs = report.read_thumbnails_from_shards(cfg.shard.output_folder, decided, keys, cfg.storage)
    report.write_report(
        decided,
        cfg.output_root,
        stages=stages,
        timings=summary.timings,
        input_rows=summary.input_rows or None,
        clip_threshold=cfg.filter.clip_score_threshold,
        thumbnails=thumbs,
        storage=cfg.storage,
        extra={
            "shards_downloaded": summary.shards_downloaded,
            "shards_reembedded": summary.shards_reembedded,
            "shards_skipped": summary.shards_skipped,
            "rows_this_run": summary.rows_this_run,
            "files_rewritten": summary.files_rewritten,
        },
    )


def format_summary(s: JobSummary) -> str:
    """The one-screen summary printed at the end of a run."""
    lines = [
        f"output: {s.output}",
        f"shards: {s.shards_planned} planned, {s.shards_downloaded} downloaded, "
        f"{s.shards_reembedded} re-embedded, {s.shards_skipped} already done",
        f"rows: {s.rows} total, {s.rows_this_run} this run, {s.kept} kept, {s.rows - s.kept} dropped",
        "status:",
        *(f"  {k:<28} {v}" for k, v in s.status_counts.items()),
        "drop reasons:",
        *(f"  {k:<60} {v}" for k, v in list(s.drop_reasons.items())[:12]),
    ]
    if len(s.drop_reasons) > 12:
        lines.append(f"  ... {len(s.drop_reasons) - 12} more in _stats.json")
    lines.append("timings: " + ", ".join(f"{k} {v:.1f} s" for k, v in s.timings.items()))
    if s.wrote_report:
        lines.append(f"report: {s.output}/{REPORT_NAME}   stats: {s.output}/{STATS_NAME}")
    else:
        lines.append(f"nothing changed; report unchanged at {s.output}/{REPORT_NAME}")
    return "\n".join(lines)


__all__ = [
    "CommittedShardRows",
    "JobSummary",
    "format_summary",
    "global_pass",
    "operator_stats",
    "read_previous",
    "redecide",
    "run",
    "stream",
]
