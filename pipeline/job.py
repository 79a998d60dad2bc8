"""The whole job: plan, the streaming graph (pipeline/graph.py) on a scheduler, then the global
pass (pipeline/global_pass.py) and the report, with resume.

    plan shards ─┬─ not committed:   read -> download -> decode -> shard -> tokenize ─┐
                 └─ committed, not embedded: reread -> tokenize ──────────────────────┴─>
      embed (+ clip_score, moderation) -> write <output>/embeddings/<shard>.parquet
    then: dedup (+ an earlier run) -> decisions -> rewrite the files that changed
      -> _stats.json, report.html

The scheduler is local worker processes on one machine, or Ray Data when a Ray address is
given (``execution.scheduler``, pipeline/schedulers/).

Resume and idempotency follow from names and commit markers, never from a log:

* a shard whose manifest is committed is never downloaded or uploaded again; if its
  embeddings file is missing (the run died between the two), its rows are read back from the
  shard's parquet and its stored images from its tar (the reread path, which embeds the
  stored copy and says so in ``embedded_from``), and only the embed half runs for it;
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

import gc
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc

from pipeline import job_config as J
from pipeline import schema as S
from pipeline.config import ConfigError, JobConfig
from pipeline.global_pass import global_pass
from pipeline.model_defaults import notes as model_defaults_notes
from pipeline.report import HTML_NAME as REPORT_NAME
from pipeline.report import STATS_NAME
from pipeline.shard_format import committed_shards
from pipeline.storage import Storage, StorageError

if TYPE_CHECKING:
    from pipeline.graph import Graph, ModelSpec

log = logging.getLogger("clipcurate.job")

CONFIG_NAME = "config.yaml"
# Sections (or section.field) a later run on the same output must not change.
# dedup.pixel_check decides whether rows carry thumbnails: rows written without them cannot be
# pixel-checked later.
SHAPING = ("input", "read", "decode", "shard", "embed.model", "embed.pretrained", "embed.text_model", "moderate", "dedup.pixel_check")


# ------------------------------------------------------------------------------- summary


@dataclass
class JobSummary:
    """What a run found and did. Counts are rows unless named otherwise; times in seconds."""

    output: str
    input_rows: int = 0
    shards_planned: int = 0
    shards_downloaded: int = 0  # went through download (or unpack) -> shard in this run
    # how this run's fresh shards got their images: "downloaded", or read from an img2dataset
    # output's tars (read.input_format img2dataset)
    fetched: str = "downloaded"
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


def prepare_model(cfg: JobConfig, emit: Callable[[str], None]) -> ModelSpec:
    """Load the embedding model once in the driver (CPU, fp32) for what every worker needs to
    know of it (:class:`~pipeline.graph.ModelSpec`) and to embed the moderation prompts.
    ``ConfigError`` when the weights cannot be loaded or do not fit the moderation settings."""
    from pipeline.graph import model_spec
    from pipeline.stages.embed import load_model
    from pipeline.stages.moderate import Moderation

    try:
        model, _ = load_model(cfg.embed.model, cfg.embed.pretrained, text_model=cfg.embed.text_model)
    except (ValueError, OSError, KeyError) as e:
        raise ConfigError(f"embed.pretrained: cannot load {cfg.embed.model} ({cfg.embed.pretrained}): {e}") from e
    moderation = Moderation.prepare(cfg.moderate, cfg.storage, model) if cfg.moderate.enabled else None
    spec = model_spec(model, moderation)
    emit(f"model {spec.model_id}: {spec.dim}-d embeddings, {spec.preprocess.image_size}px input")
    return spec


def check_gpus(embed: Any, available: int) -> None:
    """Fail fast when embedding workers ask for GPUs the machine or cluster does not have (a
    pool waiting for resources that never come would otherwise hang the job)."""
    lo = embed.concurrency[0] if embed.concurrency else 1
    need = (embed.num_gpus or 0.0) * lo
    if need > available:
        raise ConfigError(
            f"embed.num_gpus={embed.num_gpus:g} x embed.concurrency min {lo} needs {need:g} GPU(s), "
            f"but there are {available}. Set embed.num_gpus=0 to embed on CPU, or run where there "
            "are GPUs."
        )


def stream(
    cfg: JobConfig,
    to_download: list[Any],
    to_embed: list[Any],
    expected: dict[str, int],
    emit: Callable[[str], None],
    wrap_graph: Callable[[Graph], Graph] | None = None,
) -> tuple[Counter[str], dict[str, dict[str, Any]]]:
    """Run the streaming graph over the given shards; returns (rows per status, per-segment
    rows and seconds).

    ``to_download`` / ``to_embed``: :class:`~pipeline.stages.read.ShardDescriptor` of shards
    to fetch / of committed shards that only need the embed half; ``expected``: rows per shard
    name (for progress). ``wrap_graph``: applied to the built graph before it runs (tests
    inject faults with it).
    """
    from dataclasses import replace

    from pipeline.graph import build_job_graph
    from pipeline.schedulers import scheduler_for

    scheduler = scheduler_for(cfg.execution)
    emit(f"scheduler: {scheduler.name}")
    embed = cfg.embed.with_gpus(scheduler.gpus())
    check_gpus(embed, scheduler.gpus())
    spec = prepare_model(cfg, emit)
    # The imports and the model left ~10^5 long-lived objects (torch's among them) that every
    # full collection would walk again while the stream runs: move them out of the collector's
    # view until run() ends the stream (perf: 2-3 % of the job's CPU was the driver's gc).
    gc.freeze()
    if to_embed:
        emit(f"  {len(to_embed)} committed shard(s) are embedded from their stored images: "
             + ", ".join(S.shard_name(d.shard_id) for d in to_embed[:10]) + (" ..." if len(to_embed) > 10 else ""))
    decode_cpus = cfg.execution.task_cpus if scheduler.name == "ray" else 1.0
    graph = build_job_graph(
        cfg.download_job(), spec, replace(cfg, embed=embed).embed, cfg.write, cfg.filter,
        thumbnails=cfg.dedup.pixel_check, decode_isolation=cfg.execution.decode_isolation,
        decode_cpus=decode_cpus,
    )
    if wrap_graph is not None:
        graph = wrap_graph(graph)
    progress = _Progress(expected, len(to_download) + len(to_embed), emit)
    parts = _UnwrittenParts(cfg, spec, expected)

    def on_batch(batch: pa.Table) -> None:
        if S.UNWRITTEN in batch.column_names:
            batch = parts.add(batch)
            if batch.num_rows == 0:
                return
        progress.update(batch)

    items = {"download": [d.as_row() for d in to_download], "reread": [d.as_row() for d in to_embed]}
    stages = scheduler.run(graph, items, on_batch)
    by_stage: Counter[str] = Counter()
    for status, n in progress.status.items():
        by_stage[S.stage_of(status)] += n
    emit("  rows by outcome: " + ", ".join(f"{k} {v}" for k, v in sorted(by_stage.items())))
    for name, st in stages.items():
        rate = st["rows"] / st["seconds"] if st["seconds"] > 0 else 0.0
        emit(f"  {name:<48} {st['rows']:>8} rows  {st['seconds']:8.1f} s  {rate:8.1f} rows/s")
    return progress.status, stages


class _UnwrittenParts:
    """The driver's fallback for a shard a scheduler delivered in parts (the write stage passes
    such rows on unwritten): holds the parts and writes the file once it has every row."""

    def __init__(self, cfg: JobConfig, spec: ModelSpec, expected: dict[str, int]) -> None:
        self.cfg, self.spec, self.expected = cfg, spec, expected
        self.parts: dict[str, list[pa.Table]] = {}

    def add(self, batch: pa.Table) -> pa.Table:
        """Hold ``batch``; returns the written shard's summary rows (empty until complete)."""
        from pipeline.stages.write import SUMMARY_COLUMNS, output_table, parquet_bytes

        out = []
        for shard in dict.fromkeys(batch.column(S.SHARD).to_pylist()):
            part = batch.filter(pc.equal(batch.column(S.SHARD), shard))
            have = self.parts.setdefault(shard, [])
            have.append(part)
            if sum(p.num_rows for p in have) < self.expected.get(shard, 0):
                continue
            whole = pa.concat_tables(self.parts.pop(shard), promote_options="permissive")
            rules = self.spec.moderation.rules if self.spec.moderation is not None else None
            table = output_table(whole, self.spec.dim, self.cfg.filter, rules)
            Storage(self.cfg.write.output_folder, self.cfg.storage).write_atomic(
                f"{shard}.parquet", parquet_bytes(table, self.cfg.write))
            out.append(table.select(list(SUMMARY_COLUMNS)))
        if not out:
            return batch.select([S.KEY]).slice(0, 0)
        return pa.concat_tables(out)


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


def run(
    cfg: JobConfig,
    emit: Callable[[str], None] | None = None,
    wrap_graph: Callable[[Graph], Graph] | None = None,
) -> JobSummary:
    """Run the job. Validates ``cfg`` first (``ConfigError`` names the bad field). Workers start
    only when shards must be streamed: local worker processes, or Ray Data when a Ray address
    is given (``execution.scheduler``). ``wrap_graph``: see :func:`stream`."""
    emit = emit or (lambda line: print(line, flush=True))
    cfg = J.validate(cfg)
    from pipeline.safety import preflight

    preflight(cfg, emit)  # blocklists, head: one-line ConfigError before Ray starts
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
    committed = committed_shards(Storage(cfg.shard.output_folder, cfg.storage))
    embedded = set(_embedded_shards(cfg))
    to_download = [d for d, n in zip(plan, names, strict=True) if n not in committed]
    to_embed = [d for d, n in zip(plan, names, strict=True) if n in committed and n not in embedded]
    summary.shards_planned = len(plan)
    summary.input_rows = sum(expected.values())
    summary.shards_downloaded, summary.shards_reembedded = len(to_download), len(to_embed)
    summary.shards_skipped = len(plan) - len(to_download) - len(to_embed)
    unpack = cfg.read.input_format == "img2dataset"
    summary.fetched = "read from img2dataset tars" if unpack else "downloaded"
    emit(f"{len(plan)} shards planned ({sum(expected.values())} rows): {len(to_download)} "
         f"{'to read from img2dataset tars' if unpack else 'to download'}, "
         f"{len(to_embed)} committed but not embedded, {summary.shards_skipped} done")
    summary.timings["plan"] = time.time() - started

    statuses: Counter[str] = Counter()
    stages: dict[str, dict[str, Any]] = {}
    if to_download or to_embed:
        t0 = time.time()
        emit("stream: read -> download -> decode -> shard -> tokenize -> embed -> write")
        try:
            statuses, stages = stream(cfg, to_download, to_embed, expected, emit, wrap_graph)
        finally:
            # stream() froze the collector's view; a process that runs many jobs (a service,
            # the tests) must still collect what each one leaves.
            gc.unfreeze()
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
    """``_stats.json`` and ``report.html`` in the output root (pipeline/report/), with
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
            "notes": model_defaults_notes(cfg),
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
        f"shards: {s.shards_planned} planned, {s.shards_downloaded} {s.fetched}, "
        f"{s.shards_reembedded} re-embedded, {s.shards_skipped} already done",
        f"rows: {s.rows} total, {s.rows_this_run} this run, {s.kept} kept, {s.rows - s.kept} dropped",
        "status:",
        *(f"  {k:<28} {v}" for k, v in s.status_counts.items()),
        "drop reasons:",
        *(f"  {k:<60} {v}" for k, v in list(s.drop_reasons.items())[:12]),
    ]
    if len(s.drop_reasons) > 12:
        lines.append(f"  ... {len(s.drop_reasons) - 12} more in _stats.json")
    refused = s.status_counts.get(S.BLOCKED_ADDRESS, 0)
    if refused:
        # Loopback and private hosts are refused by default (SSRF guard); a user serving their
        # own images from such a host needs to know the one setting that allows it.
        lines.append(
            f"note: {refused} rows were refused by the address guard (loopback, private or "
            "link-local hosts; the row's error names the address). If those hosts are yours, "
            "allow them with --allowed-networks CIDR [CIDR ...] (download.allowed_networks)."
        )
    lines.append("timings: " + ", ".join(f"{k} {v:.1f} s" for k, v in s.timings.items()))
    if s.wrote_report:
        lines.append(f"report: {s.output}/{REPORT_NAME}   stats: {s.output}/{STATS_NAME}")
    else:
        lines.append(f"nothing changed; report unchanged at {s.output}/{REPORT_NAME}")
    return "\n".join(lines)


__all__ = [
    "JobSummary",
    "check_gpus",
    "format_summary",
    "prepare_model",
    "redecide",
    "run",
    "stream",
]
