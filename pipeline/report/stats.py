"""The numbers of a run report: ``_stats.json`` (:func:`build_stats`), histograms, drop-reason
categories, duplicate group sizes, and which rows the page illustrates each category with
(:func:`sample_rows`). Pure functions of the output table; nothing is read or written here.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import schema as S

# The keys of ``_stats.json`` ("status", "clip_score", ...) are the report's own format
# (img2dataset's keys included), not column names, though some are spelled alike: a renamed
# column leaves them as they are.
UNSPECIFIED_REASON = "unspecified"


@dataclass(frozen=True)
class Histogram:
    """Counts of finite values in bins. ``edges``: float64 [B + 1], increasing; ``counts``:
    int64 [B], with numpy.histogram's convention (bins half-open except the last, closed).
    ``missing``: null or NaN values, not in any bin."""

    edges: np.ndarray
    counts: np.ndarray
    missing: int

    @property
    def total(self) -> int:
        return int(self.counts.sum())


def _float_column(table: pa.Table, name: str) -> np.ndarray | None:
    """float64 [N] with NaN for nulls, or None when the column is absent."""
    if name not in table.column_names:
        return None
    col = pc.cast(table.column(name), pa.float64())
    return col.to_numpy(zero_copy_only=False).astype(np.float64, copy=False)


def histogram(values: np.ndarray, bins: int = 40, threshold: float | None = None) -> Histogram:
    """Histogram of the finite entries of ``values`` (float, any shape) over ``bins`` equal
    bins spanning the data's min..max, widened to include ``threshold`` so its marker lands
    on the axis. With no finite values the range is [0, 1] (or around the threshold)."""
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    v = np.asarray(values, dtype=np.float64).ravel()
    finite = v[np.isfinite(v)]
    points = list(finite[[finite.argmin(), finite.argmax()]]) if finite.size else []
    if threshold is not None and math.isfinite(threshold):
        points.append(float(threshold))
    lo, hi = (min(points), max(points)) if points else (0.0, 1.0)
    if hi <= lo:  # one distinct value: give the bins a width
        lo, hi = lo - 0.5, hi + 0.5
    counts, edges = np.histogram(finite, bins=bins, range=(lo, hi))
    return Histogram(edges=edges, counts=counts.astype(np.int64), missing=int(v.size - finite.size))


def integer_histogram(values: Sequence[int], max_bins: int = 40) -> Histogram:
    """Histogram of positive integers: one bin per value (edges at k - 0.5, k + 0.5) while
    the range fits ``max_bins``, else ``max_bins`` equal bins over it."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return Histogram(np.array([1.5, 2.5]), np.zeros(1, np.int64), 0)
    lo, hi = float(v.min()), float(v.max())
    n = int(hi - lo) + 1
    if n <= max_bins:
        edges = np.arange(lo - 0.5, hi + 1.0, 1.0)
    else:
        edges = np.linspace(lo - 0.5, hi + 0.5, max_bins + 1)
    counts, edges = np.histogram(v, bins=edges)
    return Histogram(edges=edges, counts=counts.astype(np.int64), missing=0)


def reason_category(reason: str | None) -> str:
    """The countable part of a drop reason: the text before its first ``(``, stripped.
    ``"unsafe:nudity(image margin 0.3>0.1; m)"`` -> ``"unsafe:nudity"``; ``"clip_score<0.28
    (m)"`` -> ``"clip_score<0.28"``; None or blank -> ``"unspecified"``."""
    if reason is None:
        return UNSPECIFIED_REASON
    head = reason.split("(", 1)[0].strip()
    return head or UNSPECIFIED_REASON


def _column(table: pa.Table, name: str) -> list[Any] | None:
    return table.column(name).to_pylist() if name in table.column_names else None


def _kept_and_categories(table: pa.Table) -> tuple[list[bool], list[str | None]]:
    """Per row: kept?, and the drop category (None for kept rows). Without a ``keep`` column
    a row is kept when its status is ``ok``; a null ``keep`` counts as dropped."""
    status = table.column(S.STATUS).to_pylist()
    keep = _column(table, S.KEEP)
    if keep is None:
        keep = [s == S.OK for s in status]
    reasons = _column(table, S.DROP_REASON) or [None] * table.num_rows
    kept = [k is True for k in keep]
    cats: list[str | None] = []
    for k, r, s in zip(kept, reasons, status, strict=True):
        if k:
            cats.append(None)
        elif r is None and s != S.OK:
            cats.append(S.status_reason(s))  # what pipeline.decisions would have written
        else:
            cats.append(reason_category(r))
    return kept, cats


def duplicate_group_sizes(table: pa.Table) -> list[int]:
    """Sizes of the duplicate groups: a group is a kept row (or a row of an earlier run) and
    every row whose ``duplicate_of`` chain ends at it, so every size is >= 2. A chain is
    followed through rows of this table (an exact duplicate may point at a dropped
    representative, see :mod:`pipeline.dedup`); a cycle ends the chain where it closes."""
    dup = _column(table, S.DUPLICATE_OF)
    if dup is None:
        return []
    keys = table.column(S.KEY).to_pylist()
    parent = {k: d for k, d in zip(keys, dup, strict=True) if d is not None}
    members: Counter[str] = Counter()
    for start in parent:
        node, seen = start, {start}
        while node in parent and parent[node] not in seen:
            node = parent[node]
            seen.add(node)
        members[node] += 1
    return sorted(n + 1 for n in members.values())


def _score_summary(values: np.ndarray | None, threshold: float | None, above: bool) -> dict:
    if values is None:
        return {"present": False}
    finite = values[np.isfinite(values)]
    out: dict[str, Any] = {
        "present": True,
        "n": int(finite.size),
        "missing": int(values.size - finite.size),
        "threshold": threshold,
    }
    if finite.size:
        p = np.percentile(finite, [5, 50, 95])
        out.update(
            mean=float(finite.mean()),
            min=float(finite.min()),
            max=float(finite.max()),
            p05=float(p[0]),
            p50=float(p[1]),
            p95=float(p[2]),
        )
    if threshold is not None:
        key = "above_threshold" if above else "below_threshold"
        out[key] = int((finite > threshold).sum() if above else (finite < threshold).sum())
    return out


def _stage_stats(stages: Mapping[str, Mapping[str, Any]] | None) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name, entry in (stages or {}).items():
        if "rows" not in entry or "seconds" not in entry:
            raise ValueError(f"stage {name!r} needs 'rows' and 'seconds', got {sorted(entry)}")
        rows, seconds = entry["rows"], float(entry["seconds"])
        if rows < 0 or not math.isfinite(seconds) or seconds < 0:
            raise ValueError(
                f"stage {name!r}: rows and seconds must be >= 0, got {rows}, {seconds}"
            )
        out[name] = {
            **entry,
            "rows": int(rows),
            "seconds": seconds,
            "rows_per_s": rows / seconds if seconds > 0 else None,
        }
    return out


def _timings(timings: Mapping[str, float] | None) -> dict[str, float]:
    out = {k: float(v) for k, v in (timings or {}).items()}
    bad = {k: v for k, v in out.items() if not math.isfinite(v) or v < 0}
    if bad:
        raise ValueError(f"timings must be finite seconds >= 0, got {bad}")
    return out


def build_stats(
    table: pa.Table,
    *,
    stages: Mapping[str, Mapping[str, Any]] | None = None,
    timings: Mapping[str, float] | None = None,
    input_rows: int | None = None,
    clip_threshold: float | None = None,
    unsafe_threshold: float = 0.0,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The content of ``_stats.json`` (a JSON-ready dict).

    table: the final output table; needs ``key`` and ``status``; ``keep``, ``drop_reason``,
        ``clip_score``, ``unsafe_score``, ``unsafe_concept``, ``duplicate_of``, ``shard`` and
        ``model`` are used when present.
    stages: per stage of the stream, ``{"rows": rows processed, "seconds": wall seconds, ...}``
        (other keys are copied); ``rows_per_s`` is added (None for 0 s).
    timings: wall seconds of the job's phases (e.g. ``{"stream": 812.0, "dedup": 14.2}``).
    input_rows: rows of the input URL lists; ValueError if the table has a different count
        (every input row must reach the output exactly once).
    clip_threshold / unsafe_threshold: the filters' thresholds, reported with the scores
        (rows are dropped for ``clip_score < clip_threshold`` and ``unsafe_score > 0``).

    Counts: ``status`` per status and ``drop_reasons`` per :func:`reason_category` sum to
    ``rows`` and ``dropped``; ``kept + dropped == rows``. img2dataset's keys (``count``,
    ``successes``, ``failed_to_download``, ``failed_to_resize``, ``status_dict``) are included
    so tools reading its ``_stats.json`` keep working.
    """
    for name in (S.KEY, S.STATUS):
        if name not in table.column_names:
            raise ValueError(
                f"the output table has no {name!r} column; it has {table.column_names}"
            )
    n = table.num_rows
    if input_rows is not None and input_rows != n:
        raise ValueError(
            f"the output has {n} rows but the input had {input_rows}: every input row must "
            "reach the output exactly once"
        )
    status_list = table.column(S.STATUS).to_pylist()
    if any(s is None for s in status_list):
        raise ValueError("the output table has rows with a null status")
    status = Counter(status_list)
    kept, cats = _kept_and_categories(table)
    drops = Counter(c for c in cats if c is not None)
    decode_failed = sum(c for s, c in status.items() if S.is_decode_failure(s))
    concepts = _column(table, S.UNSAFE_CONCEPT)
    unsafe = _float_column(table, S.UNSAFE_SCORE)
    flagged: Counter[str] = Counter()
    if concepts is not None and unsafe is not None:
        for c, u in zip(concepts, unsafe, strict=True):
            if c is not None and u > unsafe_threshold:
                flagged[c] += 1
    groups = duplicate_group_sizes(table)
    shards = _column(table, S.SHARD)
    models = _column(table, S.MODEL)
    stats: dict[str, Any] = {
        "rows": n,
        "input_rows": n if input_rows is None else input_rows,
        "kept": int(sum(kept)),
        "dropped": int(n - sum(kept)),
        "status": dict(sorted(status.items())),
        "drop_reasons": dict(sorted(drops.items(), key=lambda kv: (-kv[1], kv[0]))),
        "count": n,
        "successes": int(status.get(S.OK, 0)),
        "failed_to_download": int(n - status.get(S.OK, 0) - decode_failed),
        "failed_to_resize": int(decode_failed),
        "status_dict": dict(sorted(status.items())),
        "clip_score": _score_summary(_float_column(table, S.CLIP_SCORE), clip_threshold, False),
        "unsafe_score": _score_summary(unsafe, unsafe_threshold, True),
        "unsafe_concepts": dict(sorted(flagged.items())),
        "duplicates": {
            "groups": len(groups),
            "rows_in_groups": int(sum(groups)),
            "duplicate_rows": int(sum(groups) - len(groups)),
            "group_sizes": {str(k): v for k, v in sorted(Counter(groups).items())},
        },
        "shards": len({s for s in shards if s is not None}) if shards is not None else None,
        "models": sorted({m for m in models if m is not None}) if models is not None else [],
        "stages": _stage_stats(stages),
        "timings": _timings(timings),
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if extra:
        clash = sorted(set(extra) & set(stats))
        if clash:
            raise ValueError(f"extra stats would overwrite computed keys {clash}")
        stats.update(extra)
    return stats


# ----------------------------------------------------------------------------- samples


def sample_rows(table: pa.Table, per_reason: int = 8) -> dict[str, list[int]]:
    """Row indices to illustrate each drop category, plus ``"kept"``: up to ``per_reason``
    rows that have an image (non-null ``sha256``, or status ``ok`` without that column),
    spread evenly over the category in key order, so a re-run picks the same rows."""
    if per_reason < 0:
        raise ValueError(f"per_reason must be >= 0, got {per_reason}")
    kept, cats = _kept_and_categories(table)
    keys = table.column(S.KEY).to_pylist()
    sha = _column(table, S.SHA256)
    status = table.column(S.STATUS).to_pylist()
    has_image = [h is not None for h in sha] if sha is not None else [s == S.OK for s in status]
    by_cat: dict[str, list[int]] = {}
    for i, c in enumerate(cats):
        if has_image[i]:
            by_cat.setdefault("kept" if c is None else c, []).append(i)
    out = {}
    for cat, rows in by_cat.items():
        rows.sort(key=lambda r: keys[r])
        if len(rows) > per_reason:
            picks = np.linspace(0, len(rows) - 1, per_reason).round().astype(int)
            rows = [rows[p] for p in picks]
        out[cat] = rows
    return out


def sample_keys(table: pa.Table, per_reason: int = 8) -> set[str]:
    """The keys whose thumbnails :func:`render_html` will ask for (see :func:`sample_rows`)."""
    keys = table.column(S.KEY).to_pylist()
    return {keys[i] for rows in sample_rows(table, per_reason).values() for i in rows}
