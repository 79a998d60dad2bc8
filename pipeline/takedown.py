"""Takedowns: remove given URLs or image hashes from a finished output.

A takedown never deletes a row (every input row stays in the output exactly once); it removes
the image and everything computed from its pixels:

* ``embeddings/<shard>.parquet``: ``keep = false``, ``drop_reason = "takedown: <reason>"``,
  ``image_embedding = null`` (and ``image_thumb = null``), and a ``takedown`` column holding the
  reason (status unchanged);
* ``shards/<shard>.parquet``: the same ``takedown`` column (status unchanged);
* ``shards/<shard>.tar``: rewritten without the taken-down samples (``.jpg``, ``.json`` and
  ``.txt``); every other member keeps its exact header and bytes;
* ``shards/<shard>.manifest.json``: ``samples``, ``keys`` and the tar/parquet size + sha256
  of the new files, plus ``taken_down`` (the keys removed so far);
* ``_stats.json`` / ``report.html``: regenerated from the marked rows (thumbnails read from the
  rewritten tars) so the report neither shows the image nor counts the row as kept;
* ``_takedowns.jsonl``: one audit line per takedown that changed something (time, matchers,
  reason, keys affected; never image bytes);
* ``_blocklist/urls.txt``, ``sha256.txt``, ``pdq.txt``: the output's own blocklist
  (pipeline/blocklist.py) gets the taken-down rows' URLs, the sha256 of their downloaded bytes
  and their PDQ hashes, so every later run that writes to this output, deduplicates against
  it or names it in ``blocklist.outputs`` never requests those URLs and never stores those
  pictures again, under any URL (written first, before the files below).

Rows are matched by URL, by sha256 (of the stored image or of the downloaded file), or by key
(a similarity takedown, pipeline/similar.py); every exact copy of a matched row's picture (the
same stored or downloaded bytes under another URL) is taken down with it.

Crash safety without a log: every file's wanted content is computed from the current files
(matching reads only ``url`` and ``sha256``, which a takedown never changes), and a file is
written, atomically, only when its wanted bytes differ from what is stored. Per shard the tar
and parquet go first and the manifest last, so after a crash the shard either still matches
its old manifest or holds the new files with a stale manifest; a rerun of the same takedown
recognises the latter (the tar's samples are exactly the manifest's minus the taken-down keys)
and completes it. A second identical takedown therefore writes nothing at all.
"""

from __future__ import annotations

import io
import json
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import schema as S
from pipeline.config import EMBEDDINGS_DIR, SHARDS_DIR, StorageConfig
from pipeline.shard_format import (
    file_matches,
    filter_tar,
    manifest_bytes,
    manifest_keys,
    manifest_name,
    read_manifest,
    rewritten_manifest,
    tar_sample_keys,
)
from pipeline.storage import Storage, filesystem_for

TAKEDOWN = S.TAKEDOWN  # string column: the takedown reason, null for rows not taken down
AUDIT_NAME = "_takedowns.jsonl"
REASON_PREFIX = S.REASON_TAKEDOWN

_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class TakedownError(ValueError):
    """Bad takedown input, or an output this module cannot safely change."""


# ------------------------------------------------------------------------------ matchers


@dataclass(frozen=True)
class Matchers:
    """What to take down: exact URLs (whitespace-stripped), sha256 hex digests (lower-cased)
    of the stored image or of the downloaded file (``source_sha256``), and row keys (what a
    similarity search found)."""

    urls: frozenset[str] = frozenset()
    sha256: frozenset[str] = frozenset()
    keys: frozenset[str] = frozenset()

    @classmethod
    def build(cls, urls: Iterable[str] = (), hashes: Iterable[str] = (), keys: Iterable[str] = ()) -> Matchers:
        """Normalise and validate; raises :class:`TakedownError` naming the bad value."""
        u = set()
        for raw in urls:
            url = raw.strip()
            if not url:
                raise TakedownError("an empty URL was given")
            u.add(url)
        h = set()
        for raw in hashes:
            digest = raw.strip().lower()
            if not _HEX64.match(digest):
                raise TakedownError(f"{raw!r} is not a sha256 hex digest (64 hex characters)")
            h.add(digest)
        k = {str(x).strip() for x in keys if str(x).strip()}
        if not u and not h and not k:
            raise TakedownError("nothing to take down: give at least one URL, sha256 or row")
        return cls(frozenset(u), frozenset(h), frozenset(k))

    def match(self, urls: list[Any], hashes: list[Any], keys: list[Any] | None = None,
              sources: list[Any] | None = None) -> list[bool]:
        """Per row: whether its url, sha256 (stored or source) or key is named."""
        n = len(urls)
        keys = keys if keys is not None else [None] * n
        sources = sources if sources is not None else [None] * n
        out = []
        for url, digest, key, src in zip(urls, hashes, keys, sources, strict=True):
            hit = isinstance(url, str) and url.strip() in self.urls
            hit = hit or (isinstance(digest, str) and digest.lower() in self.sha256)
            hit = hit or (isinstance(src, str) and src.lower() in self.sha256)
            hit = hit or (key is not None and key in self.keys)
            out.append(hit)
        return out


def read_list_file(text: str) -> list[str]:
    """Lines of a URL/hash list file: blank lines and lines starting with ``#`` are skipped."""
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


# ------------------------------------------------------------------------------ summary


@dataclass
class TakedownSummary:
    """What a takedown found and did."""

    output: str
    reason: str
    dry_run: bool
    rows_matched: int = 0  # rows (in any file) whose url or sha256 is named
    rows_newly_marked: int = 0  # embeddings/shard rows whose marks this run set
    keys: list[str] = field(default_factory=list)  # keys of the matched rows, sorted
    samples_removed: int = 0  # tar samples removed by this run
    shards_rewritten: list[str] = field(default_factory=list)  # shards with a file written
    embeddings_rewritten: list[str] = field(default_factory=list)
    report_rewritten: bool = False
    urls_not_found: list[str] = field(default_factory=list)
    sha256_not_found: list[str] = field(default_factory=list)
    orphaned_duplicates: list[str] = field(default_factory=list)  # keys dropped as duplicates of a taken-down row
    copies: list[str] = field(default_factory=list)  # keys matched only as exact copies of a named row
    blocklist_added: dict[str, int] = field(default_factory=dict)  # new entries in <output>/_blocklist/

    @property
    def changed(self) -> bool:
        return bool(self.shards_rewritten or self.embeddings_rewritten or self.report_rewritten)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "changed": self.changed}


def format_summary(s: TakedownSummary) -> str:
    """Human-readable lines for the CLI."""
    lines = [
        f"output: {s.output}{'   (dry run: nothing written)' if s.dry_run else ''}",
        f"rows matched: {s.rows_matched} ({s.rows_newly_marked} not marked before)",
        f"samples removed from tars: {s.samples_removed}",
        f"shards rewritten: {len(s.shards_rewritten)} {s.shards_rewritten if s.shards_rewritten else ''}".rstrip(),
        f"embeddings files rewritten: {len(s.embeddings_rewritten)}",
        f"report regenerated: {'yes' if s.report_rewritten else 'no'}",
    ]
    if s.dry_run:
        lines.insert(1, "(counts below are what the takedown would do)")
    if s.copies:
        lines.append(f"exact copies (same image bytes under another URL) taken down with them: {len(s.copies)}")
    if s.blocklist_added:
        added = ", ".join(f"{n} {k}" for k, n in s.blocklist_added.items())
        lines.append(f"added to the output's blocklist (later runs never store them): {added}")
    for url in s.urls_not_found:
        lines.append(f"not found: url {url}")
    for digest in s.sha256_not_found:
        lines.append(f"not found: sha256 {digest}")
    if s.orphaned_duplicates:
        lines.append(
            f"note: {len(s.orphaned_duplicates)} row(s) were dropped as duplicates of a taken-down "
            "row; re-deciding them needs the global pass (jobs/dedup.py)"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------ helpers


def _read_table(store: Storage, rel: str) -> tuple[pa.Table, bytes]:
    data = store.read_bytes(rel)
    return pq.read_table(pa.BufferReader(data)), data


def _table_bytes(table: pa.Table, like: bytes) -> bytes:
    """Parquet bytes of ``table``, with the compression and row group size of the file
    ``like`` it replaces (so a takedown does not change a file's encoding)."""
    meta = pq.ParquetFile(pa.BufferReader(like)).metadata
    compression = "snappy"
    row_group = None
    if meta.num_row_groups and meta.num_columns:
        compression = meta.row_group(0).column(0).compression.lower()
        row_group = max(1, meta.row_group(0).num_rows)
    if compression == "uncompressed":
        compression = "none"
    buf = io.BytesIO()
    pq.write_table(table, buf, compression=compression, row_group_size=row_group)
    return buf.getvalue()


_EMBEDDING_COLUMNS = (S.IMAGE_EMBEDDING, S.TEXT_EMBEDDING)


def _read_light(uri: str, storage: StorageConfig) -> pa.Table:
    """A Parquet file without its embedding columns (only the other columns are fetched)."""
    fs, path = filesystem_for(uri, storage)
    names = pq.read_schema(path, filesystem=fs).names
    return pq.read_table(path, filesystem=fs, columns=[c for c in names if c not in _EMBEDDING_COLUMNS])


def _reason_text(reason: str) -> str:
    return f"{REASON_PREFIX}{reason}"


# ------------------------------------------------------------------------------ per file


@dataclass
class _Plan:
    """Writes wanted for one shard (rel path -> bytes), in commit order, manifest last."""

    shard: str
    writes: list[tuple[str, bytes]] = field(default_factory=list)
    samples_removed: int = 0
    newly_marked: set[str] = field(default_factory=set)


def _mark_shard_table(table: pa.Table, hit: list[bool], reason: str) -> tuple[pa.Table, set[str]]:
    current = S.column_list(table, TAKEDOWN)
    keys = S.column_list(table, S.KEY)
    new = [reason if h and c is None else c for h, c in zip(hit, current, strict=True)]
    newly = {k for k, a, b in zip(keys, current, new, strict=True) if a != b}
    return S.set_column(table, TAKEDOWN, pa.array(new, pa.string()), keep_type=True), newly


def _plan_shard(
    store: Storage, shard: str, hit_keys: set[str], reason: str, names: set[str]
) -> _Plan:
    """The writes that take ``hit_keys`` down in shard ``shard`` (possibly none).

    Raises :class:`TakedownError` when the shard's files disagree with its manifest in a way a
    crashed takedown cannot explain (another writer, or a shard never committed)."""
    plan = _Plan(shard)
    tar_rel, pq_rel, man_rel = f"{shard}.tar", f"{shard}.parquet", manifest_name(shard)
    manifest = read_manifest(store, shard) if man_rel in names else None

    tar_old = store.read_bytes(tar_rel) if tar_rel in names else None
    tar_new = tar_old
    if tar_old is not None:
        tar_new, plan.samples_removed = filter_tar(tar_old, hit_keys)

    table, pq_old = _read_table(store, pq_rel)
    hit = [k in hit_keys for k in S.column_list(table, S.KEY)]
    marked, plan.newly_marked = _mark_shard_table(table, hit, reason)
    pq_new = pq_old if marked.equals(table) else _table_bytes(marked, pq_old)

    if manifest is not None:
        if tar_old is not None and not file_matches(manifest, tar_rel, tar_old):
            # A tar that differs from its manifest is only ours to finish when it is exactly
            # the manifest's samples minus the ones this takedown removes.
            listed = manifest_keys(manifest)
            want = [k for k in listed if k not in hit_keys]
            if tar_sample_keys(tar_old) != want:
                gone = sorted(set(listed) - set(tar_sample_keys(tar_old)))
                raise TakedownError(
                    f"shard {shard}: {tar_rel} does not match its manifest and is not this "
                    f"takedown's rewrite of it (samples missing from the tar: {gone[:10]}); if an "
                    "earlier takedown was interrupted, run that one again first; else check "
                    "whether a job is writing this output"
                )
        if not file_matches(manifest, pq_rel, pq_old) and TAKEDOWN not in table.column_names:
            raise TakedownError(f"shard {shard}: {pq_rel} does not match its manifest")

    if tar_new is not None and tar_new is not tar_old:
        plan.writes.append((tar_rel, tar_new))
    if pq_new is not pq_old:
        plan.writes.append((pq_rel, pq_new))

    if manifest is not None and tar_new is not None:
        new_manifest = rewritten_manifest(manifest, shard, tar_new, pq_new)
        if new_manifest != manifest:
            plan.writes.append((man_rel, manifest_bytes(new_manifest)))
    return plan


def _mark_embeddings(table: pa.Table, hit_keys: set[str], reason: str) -> tuple[pa.Table, set[str]]:
    """Embeddings rows of ``hit_keys`` marked; returns (table, keys whose marks changed)."""
    keys = S.column_list(table, S.KEY)
    hit = [k in hit_keys for k in keys]
    if not any(hit):
        return table, set()
    text = _reason_text(reason)
    keep = S.column_list(table, S.KEEP)
    drop = S.column_list(table, S.DROP_REASON)
    mark = S.column_list(table, TAKEDOWN)
    newly: set[str] = set()
    for i, h in enumerate(hit):
        if not h:
            continue
        if mark[i] is None:
            mark[i] = reason
        before = (keep[i], drop[i])
        keep[i] = False
        # A row taken down twice keeps the reason of the first takedown.
        drop[i] = drop[i] if isinstance(drop[i], str) and drop[i].startswith(REASON_PREFIX) else text
        if before != (keep[i], drop[i]):
            newly.add(keys[i])
    out = S.set_column(table, S.KEEP, pa.array(keep, pa.bool_()), keep_type=True)
    out = S.set_column(out, S.DROP_REASON, pa.array(drop, pa.string()), keep_type=True)
    out = S.set_column(out, TAKEDOWN, pa.array(mark, pa.string()), keep_type=True)
    # The thumbnail (dedup.pixel_check) is the picture itself, only smaller.
    for name in (S.IMAGE_EMBEDDING, S.IMAGE_THUMB):
        if name in out.column_names:
            col = out.column(name)
            vals = [None if h else v for h, v in zip(hit, col.to_pylist(), strict=True)]
            out = S.set_column(out, name, pa.array(vals, col.type), keep_type=True)
    return out, newly


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


# ------------------------------------------------------------------------------ takedown


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
    ``s3://`` URI with ``shards/`` and ``embeddings/``); see the module docstring. With
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
    shards = sorted(n[: -len(".parquet")] for n in shard_names if n.endswith(".parquet") and not n.startswith("."))
    if not shards:
        raise TakedownError(f"{output}/{SHARDS_DIR} holds no shard parquet files: not a job output")
    emb_names = sorted(n for n in emb_store.list_names() if n.endswith(".parquet") and not n.startswith("."))

    # 1. Match: url and sha256 never change, so a rerun after a crash finds the same rows.
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
        table, _ = _read_table(shards_store, f"{shard}.parquet")
        scan(table, lambda i, shard=shard: shard)
    for name in emb_names:
        table = _read_light(emb_store.uri(name), storage)
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
    summary.copies = copies

    all_keys = set().union(*hits.values()) if hits else set()
    summary.keys = sorted(all_keys)
    summary.rows_matched = len(all_keys)
    summary.urls_not_found = sorted(matchers.urls - found_urls)
    summary.sha256_not_found = sorted(matchers.sha256 - found_sha)
    emit(f"{len(all_keys)} row(s) matched in {len(hits)} shard(s)")

    # 2. The output's own blocklist first: from now on no run that writes, deduplicates against
    # or names this output stores these URLs or pictures again, even if this takedown crashes
    # below (a rerun completes it; entries already listed are not added twice).
    taken = [rows[k] for k in sorted(all_keys) if k in rows]
    # Keyed by blocklist kind (pipeline/blocklist.py KINDS), not by column.
    entries = {
        "url": sorted(matchers.urls | {v[S.URL].strip() for v in taken if isinstance(v.get(S.URL), str)}),
        "sha256": sorted(matchers.sha256 | {v[S.SOURCE_SHA256] for v in taken if v.get(S.SOURCE_SHA256)}),
        "pdq": sorted({v[S.PDQ] for v in taken if v.get(S.PDQ)}),
    }
    entries["url"] = [u for u in entries["url"] if "://" in u]
    if not dry_run and any(entries.values()):
        from pipeline.blocklist import append_to_output

        summary.blocklist_added = append_to_output(output, entries, storage, note=_reason_text(reason))
        if any(summary.blocklist_added.values()):
            emit("added to the output's blocklist: " + ", ".join(f"{n} {k}" for k, n in summary.blocklist_added.items()))

    # 3. Shards: tar and parquet, manifest last.
    plans = []
    for shard in sorted(hits):
        if f"{shard}.parquet" not in shard_names:
            continue  # rows known only from an embeddings file; handled there
        plans.append(_plan_shard(shards_store, shard, hits[shard], reason, shard_names))
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
        full, data = _read_table(emb_store, name)
        new, newly_here = _mark_embeddings(full, all_keys, reason)
        newly |= newly_here
        light[name] = new.drop_columns([c for c in _EMBEDDING_COLUMNS if c in new.column_names])
        if not new.equals(full):
            summary.embeddings_rewritten.append(name[: -len(".parquet")])
            if not dry_run:
                emb_store.write_atomic(name, _table_bytes(new, data))
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


def _append_audit(root: Storage, record: dict[str, Any], exists: bool) -> None:
    # Read and rewrite whole: S3 has no append, and write_atomic keeps the log whole.
    old = root.read_bytes(AUDIT_NAME) if exists else b""
    if old and not old.endswith(b"\n"):
        old += b"\n"
    root.write_atomic(AUDIT_NAME, old + json.dumps(record, sort_keys=True).encode("utf-8") + b"\n")


__all__ = [
    "AUDIT_NAME",
    "TAKEDOWN",
    "Matchers",
    "TakedownError",
    "TakedownSummary",
    "format_summary",
    "read_list_file",
    "takedown",
]
