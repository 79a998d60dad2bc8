"""The takedown procedure (:func:`takedown`): find the rows, add them to the output's own
blocklist, rewrite shards (tar and parquet, manifest last) and embeddings files, regenerate the
report, and append the audit line; see :mod:`pipeline.takedown` for what changes and why a rerun
after a crash completes the work.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from pipeline import schema as S
from pipeline.config import EMBEDDINGS_DIR, SHARDS_DIR, StorageConfig
from pipeline.shard_format import parquet_name, shards_with_rows
from pipeline.storage import Storage
from pipeline.takedown.files import (
    EMBEDDING_COLUMNS,
    REASON_PREFIX,
    TAKEDOWN,
    mark_embeddings,
    plan_shard,
    read_light,
    read_table,
    reason_text,
    table_bytes,
)
from pipeline.takedown.match import Matchers, TakedownError
from pipeline.takedown.summary import TakedownSummary

AUDIT_NAME = "_takedowns.jsonl"


def takedown(
    output: str,
    matchers: Matchers,
    reason: str = "request",
    *,
    storage: StorageConfig | None = None,
    dry_run: bool = False,
    emit: Callable[[str], None] | None = None,
) -> TakedownSummary:
    """Take the rows ``matchers`` names down from the finished output ``output`` (folder or
    ``s3://`` URI with ``shards/`` and ``embeddings/``); see :mod:`pipeline.takedown`. With
    ``dry_run`` nothing is written. Raises :class:`TakedownError` for an output without shards
    or a shard whose files disagree with its manifest."""
    emit = emit or (lambda line: None)
    storage = storage or StorageConfig()
    reason = " ".join(reason.split()) or "request"
    output = output.rstrip("/")
    root = Storage(output, storage)
    shards_store = Storage(f"{output}/{SHARDS_DIR}", storage)
    emb_store = Storage(f"{output}/{EMBEDDINGS_DIR}", storage)
    summary = TakedownSummary(output=output, reason=reason, dry_run=dry_run)

    shard_names = set(shards_store.list_names())
    shards = shards_with_rows(shard_names)
    if not shards:
        raise TakedownError(f"{output}/{SHARDS_DIR} holds no shard parquet files: not a job output")
    emb_names = sorted(n for n in emb_store.list_names() if n.endswith(".parquet") and not n.startswith("."))

    # 1. Match: url and sha256 never change, so a rerun after a crash finds the same rows.
    found = _find(matchers, shards_store, shards, emb_store, emb_names, storage)
    hits, rows, light = found.hits, found.rows, found.light
    summary.copies = found.copies

    all_keys = set().union(*hits.values()) if hits else set()
    summary.keys = sorted(all_keys)
    summary.rows_matched = len(all_keys)
    summary.urls_not_found = sorted(matchers.urls - found.urls)
    summary.sha256_not_found = sorted(matchers.sha256 - found.sha256)
    emit(f"{len(all_keys)} row(s) matched in {len(hits)} shard(s)")

    # 2. The output's own blocklist first: from now on no run that writes, deduplicates against
    # or names this output stores these URLs or pictures again, even if this takedown crashes
    # below (a rerun completes it; entries already listed are not added twice).
    taken = [rows[k] for k in sorted(all_keys) if k in rows]
    # Keyed by blocklist kind (pipeline.blocklist.KINDS), not by column.
    entries = {
        "url": sorted(matchers.urls | {v[S.URL].strip() for v in taken if isinstance(v.get(S.URL), str)}),
        "sha256": sorted(matchers.sha256 | {v[S.SOURCE_SHA256] for v in taken if v.get(S.SOURCE_SHA256)}),
        "pdq": sorted({v[S.PDQ] for v in taken if v.get(S.PDQ)}),
    }
    entries["url"] = [u for u in entries["url"] if "://" in u]
    if not dry_run and any(entries.values()):
        from pipeline.blocklist import append_to_output

        summary.blocklist_added = append_to_output(output, entries, storage, note=reason_text(reason))
        if any(summary.blocklist_added.values()):
            emit("added to the output's blocklist: " + ", ".join(f"{n} {k}" for k, n in summary.blocklist_added.items()))

    # 3. Shards: tar and parquet, manifest last.
    plans = []
    for shard in sorted(hits):
        if parquet_name(shard) not in shard_names:
            continue  # rows known only from an embeddings file; handled there
        plans.append(plan_shard(shards_store, shard, hits[shard], reason, shard_names))
    newly: set[str] = set()
    for plan in plans:
        summary.samples_removed += plan.samples_removed
        newly |= plan.newly_marked
        if plan.writes:
            summary.shards_rewritten.append(plan.shard)
            if not dry_run:
                for rel, data in plan.writes:
                    shards_store.write_atomic(rel, data)
                emit(f"  shard {plan.shard}: {plan.samples_removed} sample(s) removed, "
                     f"{', '.join(rel for rel, _ in plan.writes)} written")

    # 4. Embeddings files.
    for name, table in light.items():
        if all_keys.isdisjoint(S.column_list(table, S.KEY)):
            continue
        full, data = read_table(emb_store, name)
        new, newly_here = mark_embeddings(full, all_keys, reason)
        newly |= newly_here
        light[name] = new.drop_columns([c for c in EMBEDDING_COLUMNS if c in new.column_names])
        if not new.equals(full):
            summary.embeddings_rewritten.append(name[: -len(".parquet")])
            if not dry_run:
                emb_store.write_atomic(name, table_bytes(new, data))
    marked_tables = list(light.values())
    orphans: list[str] = []
    taken: set[str] = set()
    for t in marked_tables:
        taken.update(k for k, m in zip(S.column_list(t, S.KEY), S.column_list(t, TAKEDOWN), strict=True) if m is not None)
    for t in marked_tables:
        dup = S.column_list(t, S.DUPLICATE_OF)
        keys = S.column_list(t, S.KEY)
        keep = S.column_list(t, S.KEEP)
        orphans.extend(k for k, d, kp in zip(keys, dup, keep, strict=True) if d in taken and k not in taken and not kp)
    summary.orphaned_duplicates = sorted(orphans)
    summary.rows_newly_marked = len(newly)

    # 5. Report, when the output has one that predates (part of) the takedown.
    root_names = set(root.list_names())
    from pipeline.report import HTML_NAME, STATS_NAME

    if marked_tables and (STATS_NAME in root_names or HTML_NAME in root_names):
        marked_rows = sum(
            1
            for t in marked_tables
            for r in S.column_list(t, S.DROP_REASON)
            if isinstance(r, str) and r.startswith(REASON_PREFIX)
        )
        if summary.changed or _report_is_stale(root, marked_rows):
            summary.report_rewritten = True
            if not dry_run:
                _regenerate_report(root, output, marked_tables, storage)

    # 6. Audit, last: a crash before it leaves work a rerun completes and then records.
    if summary.changed and not dry_run:
        # The audit line's own fields (not column names).
        record = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "reason": reason,
            "urls": sorted(matchers.urls),
            "sha256": sorted(matchers.sha256),
            "rows_named": sorted(matchers.keys),
            "copies": summary.copies,
            "blocklist_added": summary.blocklist_added,
            "keys": summary.keys,
            "shards_rewritten": summary.shards_rewritten,
            "embeddings_rewritten": summary.embeddings_rewritten,
            "samples_removed": summary.samples_removed,
            "urls_not_found": summary.urls_not_found,
            "sha256_not_found": summary.sha256_not_found,
        }
        _append_audit(root, record, AUDIT_NAME in root_names)
    return summary


@dataclass
class _Found:
    """What :func:`_find` found: ``hits`` (shard -> keys to take down: the named rows and
    their exact copies), ``light`` (embeddings file -> its rows without embedding columns),
    ``rows`` (key -> its shards, url, sha256, source_sha256 and pdq), ``copies`` (keys matched
    only as exact copies), and which of the matchers' URLs and digests were found."""

    hits: dict[str, set[str]]
    light: dict[str, pa.Table]
    rows: dict[str, dict[str, Any]]
    copies: list[str]
    urls: set[str]
    sha256: set[str]


def _find(
    matchers: Matchers,
    shards_store: Storage,
    shards: list[str],
    emb_store: Storage,
    emb_names: list[str],
    storage: StorageConfig,
) -> _Found:
    """Every row ``matchers`` names, in the shard tables and the embeddings files, and every
    exact copy of their pictures (same stored or downloaded bytes under another URL)."""
    hits: dict[str, set[str]] = {}
    found_urls: set[str] = set()
    found_sha: set[str] = set()
    # Every embeddings file without its embedding columns (small: for matching, the report and
    # the duplicate check); a file is read whole only when it holds a matched row.
    light: dict[str, pa.Table] = {}

    # What identifies each row's picture: every taken-down row's exact copies (same stored or
    # downloaded bytes under another URL) go too, and its URL, source hash and PDQ hash join the
    # output's own blocklist.
    rows: dict[str, dict[str, Any]] = {}

    def scan(table: pa.Table, shard_of: Callable[[int], str]) -> None:
        urls, hashes, keys = S.column_list(table, S.URL), S.column_list(table, S.SHA256), S.column_list(table, S.KEY)
        sources, pdqs = S.column_list(table, S.SOURCE_SHA256), S.column_list(table, S.PDQ)
        for i, h in enumerate(matchers.match(urls, hashes, keys, sources)):
            info = rows.setdefault(keys[i], {"shards": set()})
            info["shards"].add(shard_of(i))
            for name, col in ((S.URL, urls), (S.SHA256, hashes), (S.SOURCE_SHA256, sources), (S.PDQ, pdqs)):
                if col[i] is not None:
                    info[name] = col[i]
            if not h:
                continue
            info["named"] = True
            hits.setdefault(shard_of(i), set()).add(keys[i])
            if isinstance(urls[i], str) and urls[i].strip() in matchers.urls:
                found_urls.add(urls[i].strip())
            for digest in (hashes[i], sources[i]):
                if isinstance(digest, str) and digest.lower() in matchers.sha256:
                    found_sha.add(digest.lower())

    for shard in shards:
        table, _ = read_table(shards_store, parquet_name(shard))
        scan(table, lambda i, shard=shard: shard)
    for name in emb_names:
        table = read_light(emb_store.uri(name), storage)
        light[name] = table
        stem = name[: -len(".parquet")]
        shard_col = S.column_list(table, S.SHARD)
        scan(table, lambda i, shard_col=shard_col, stem=stem: shard_col[i] or stem)

    named = {k for k, v in rows.items() if v.get("named")}
    picture = {v[c] for k in named for c in (S.SHA256, S.SOURCE_SHA256) if (v := rows[k]).get(c)}
    copies = sorted(k for k, v in rows.items() if k not in named
                    and (v.get(S.SHA256) in picture or v.get(S.SOURCE_SHA256) in picture))
    for k in copies:
        for shard in rows[k]["shards"]:
            hits.setdefault(shard, set()).add(k)
    return _Found(hits, light, rows, copies, found_urls, found_sha)


def _append_audit(root: Storage, record: dict[str, Any], exists: bool) -> None:
    # Read and rewrite whole: S3 has no append, and write_atomic keeps the log whole.
    old = root.read_bytes(AUDIT_NAME) if exists else b""
    if old and not old.endswith(b"\n"):
        old += b"\n"
    root.write_atomic(AUDIT_NAME, old + json.dumps(record, sort_keys=True).encode("utf-8") + b"\n")


# ------------------------------------------------------------------------------ report


def _report_is_stale(root: Storage, marked_rows: int) -> bool:
    """True when ``_stats.json`` does not count every taken-down row under a takedown reason
    (the report predates this takedown, or a crash came before its regeneration)."""
    from pipeline.report import STATS_NAME

    try:
        stats = json.loads(root.read_bytes(STATS_NAME))
    except Exception:  # missing or unreadable: regenerate
        return True
    reasons = stats.get("drop_reasons") or {}
    counted = sum(int(v) for k, v in reasons.items() if str(k).startswith(REASON_PREFIX))
    return counted != marked_rows


def _regenerate_report(root: Storage, output: str, tables: list[pa.Table], storage: StorageConfig) -> None:
    """``_stats.json`` and ``report.html`` again from the marked embeddings rows (``tables``:
    every embeddings file, without embedding columns), keeping the run's stage timings, phase
    timings, thresholds and extra keys from the old ``_stats.json``.
    Thumbnails come from the rewritten tars, so a taken-down image has none."""
    from pipeline import report

    try:
        old = json.loads(root.read_bytes(report.STATS_NAME))
    except Exception:  # only report.html exists, or the stats are unreadable: start afresh
        old = {}
    table = pa.concat_tables(tables, promote_options="permissive")
    # _stats.json's keys (pipeline/report/stats.py), not column names.
    clip = (old.get("clip_score") or {}).get("threshold")
    unsafe = (old.get("unsafe_score") or {}).get("threshold")
    input_rows = old.get("input_rows")
    computed = set(report.build_stats(table))
    extra = {k: v for k, v in old.items() if k not in computed}
    keys = report.sample_keys(table)
    thumbs = report.read_thumbnails_from_shards(f"{output.rstrip('/')}/{SHARDS_DIR}", table, keys, storage)
    report.write_report(
        table,
        output,
        stages=old.get("stages") or None,
        timings=old.get("timings") or None,
        # A takedown never removes rows, so the old count holds unless the files disagree.
        input_rows=input_rows if input_rows == table.num_rows else None,
        clip_threshold=clip,
        unsafe_threshold=unsafe if isinstance(unsafe, (int, float)) else 0.0,
        thumbnails=thumbs,
        storage=storage,
        extra=extra or None,
    )
