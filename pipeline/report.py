"""The run report: ``_stats.json`` (numbers) and ``report.html`` (one self-contained page).

Both are computed from the final output table (one row per input row, after the stream, the
global dedup and the keep/drop decisions) plus the per-stage counts and timings the job
measured. ``report.html`` needs nothing but itself: CSS is inline, the histograms are inline
SVG, thumbnails are ``data:`` URIs, and a Content-Security-Policy forbids scripts and every
network fetch, so the page can be opened from S3, a mail attachment or a CI artifact.

Every string that comes from the data (captions, URLs, errors, keys, reasons, concepts) is
hostile input and is HTML-escaped; the CSP is a second line of defence, not the first.

Drop reasons carry per-row numbers (``unsafe:nudity(image margin 0.1234>0.0500; ...)``), so
they are counted by *category*: the reason up to its first ``(``, stripped
(``unsafe:nudity``, ``clip_score<0.28``, ``dedup:semantic``, ``status:http_404``). See
:func:`reason_category`.

    stats = write_report(table, "s3://bucket/run", stages=stage_timings,
                         thumbnails=lambda key: jpeg_bytes_or_none(key),
                         clip_threshold=0.28)

Callers that read thumbnails from shard tars can ask :func:`sample_keys` first which keys the
page will show, read just those, and pass a dict.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import schema as S

STATS_NAME = "_stats.json"
HTML_NAME = "report.html"
# The keys of ``_stats.json`` ("status", "clip_score", ...) and the histograms' names are the
# report's own format (img2dataset's keys included), not column names, though some are spelled
# alike: a renamed column leaves them as they are.

# Decoded-pixel cap for a thumbnail source; images in our shards are already resized, so this
# only guards against a caller handing over something unexpected.
_MAX_THUMB_SOURCE_PIXELS = 40_000_000
_CAPTION_CHARS = 160
UNSPECIFIED_REASON = "unspecified"

Thumbnails = Callable[[str], "bytes | None"] | Mapping[str, bytes]


# ----------------------------------------------------------------------------- numbers


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


def thumbnail_data_uri(image: bytes, size: int = 128) -> str | None:
    """``data:image/jpeg;base64,...`` of ``image`` (any format Pillow reads) scaled to fit
    ``size`` x ``size`` pixels, or None when the bytes are not a readable image."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(image)) as img:
            if img.width * img.height > _MAX_THUMB_SOURCE_PIXELS:
                return None
            img.draft("RGB", (size, size))  # JPEG: decode at reduced scale
            rgb = img.convert("RGB")
            rgb.thumbnail((size, size))
            out = io.BytesIO()
            rgb.save(out, format="JPEG", quality=80)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        return None
    return "data:image/jpeg;base64," + base64.b64encode(out.getvalue()).decode("ascii")


def read_thumbnails_from_shards(
    shards_root: str, table: pa.Table, keys: set[str], storage: Any = None
) -> dict[str, bytes]:
    """Image bytes of ``keys`` from the WebDataset tars under ``shards_root`` (folder or
    ``s3://`` URI holding ``<shard>.tar``), for :func:`render_html`'s ``thumbnails``.

    ``table`` maps each key to its shard (``shard`` column). Each needed tar is streamed once
    and only until its last wanted member, so memory stays at one image
    (:func:`pipeline.shard_format.stream_tar_images`). A missing or unreadable tar leaves its
    keys out (their figures show "no thumbnail").
    ``storage``: a :class:`pipeline.config.StorageConfig` or None.
    """
    from pipeline.shard_format import stream_tar_images

    if S.SHARD not in table.column_names:
        raise ValueError(f"the table has no {S.SHARD!r} column to find the tars by")
    by_shard: dict[str, set[str]] = {}
    for k, sh in zip(
        table.column(S.KEY).to_pylist(), table.column(S.SHARD).to_pylist(), strict=True
    ):
        if k in keys and sh is not None:
            by_shard.setdefault(sh, set()).add(k)
    return stream_tar_images(shards_root, by_shard, storage)


def _lookup(thumbnails: Thumbnails | None, key: str) -> bytes | None:
    if thumbnails is None:
        return None
    if isinstance(thumbnails, Mapping):
        return thumbnails.get(key)
    try:
        return thumbnails(key)
    except Exception:  # noqa: BLE001 - one unreadable thumbnail must not sink the report
        return None


# ----------------------------------------------------------------------------- HTML


def _e(value: Any) -> str:
    """HTML-escape anything for element content and double-quoted attributes."""
    return html.escape("" if value is None else str(value), quote=True)


def _short_model(model: str) -> str:
    name, sep, digest = model.partition("@sha256:")
    return f"{name}{sep}{digest[:12]}…" if sep and len(digest) > 12 else model


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def histogram_svg(
    hist: Histogram,
    *,
    name: str,
    title: str,
    threshold: float | None = None,
    threshold_label: str = "threshold",
    integer_bins: bool = False,
    width: int = 640,
    height: int = 220,
) -> str:
    """An inline SVG bar chart of ``hist``. Each bar is a ``<rect class="bar">`` carrying
    ``data-count``, ``data-lo`` and ``data-hi`` (its bin), so the numbers stay checkable;
    the threshold is a ``<line class="threshold" data-value=...>``. ``integer_bins``: label
    the bars' centres (for :func:`integer_histogram`) instead of five even ticks."""
    ml, mr, mt, mb = 48, 12, 24, 36
    pw, ph = width - ml - mr, height - mt - mb
    lo, hi = float(hist.edges[0]), float(hist.edges[-1])
    top = max(int(hist.counts.max()) if hist.counts.size else 0, 1)

    def x(v: float) -> float:
        return ml + (v - lo) / (hi - lo) * pw

    parts = [
        f'<svg class="hist" id="hist-{_e(name)}" data-name="{_e(name)}" '
        f'xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{_e(title)}">',
        f'<text x="{ml}" y="16" class="svg-title">{_e(title)}</text>',
        f'<line x1="{ml}" y1="{mt + ph}" x2="{ml + pw}" y2="{mt + ph}" class="axis"/>',
        f'<line x1="{ml}" y1="{mt}" x2="{ml}" y2="{mt + ph}" class="axis"/>',
        f'<text x="{ml - 4}" y="{mt + 4}" class="tick" text-anchor="end">{top}</text>',
        f'<text x="{ml - 4}" y="{mt + ph}" class="tick" text-anchor="end">0</text>',
    ]
    for i, c in enumerate(hist.counts.tolist()):
        b0, b1 = float(hist.edges[i]), float(hist.edges[i + 1])
        h = c / top * ph
        parts.append(
            f'<rect class="bar" x="{x(b0):.2f}" y="{mt + ph - h:.2f}" '
            f'width="{max(x(b1) - x(b0) - 1, 0.5):.2f}" height="{h:.2f}" '
            f'data-count="{c}" data-lo="{b0!r}" data-hi="{b1!r}">'
            f"<title>{_e(_fmt(b0))} to {_e(_fmt(b1))}: {c}</title></rect>"
        )
    if integer_bins:
        ticks = [(e0 + e1) / 2 for e0, e1 in zip(hist.edges[:-1], hist.edges[1:], strict=True)]
        ticks = ticks[:: max(1, math.ceil(len(ticks) / 20))]
    else:
        ticks = np.linspace(lo, hi, 5).tolist()
    for v in ticks:
        parts.append(
            f'<text x="{x(v):.2f}" y="{mt + ph + 14}" class="tick" '
            f'text-anchor="middle">{_e(_fmt(v))}</text>'
        )
    if threshold is not None and lo <= threshold <= hi:
        tx = x(threshold)
        parts.append(
            f'<line class="threshold" data-value="{threshold!r}" x1="{tx:.2f}" y1="{mt}" '
            f'x2="{tx:.2f}" y2="{mt + ph}"/>'
            f'<text x="{tx + 3:.2f}" y="{mt + 10}" class="threshold-label">'
            f"{_e(threshold_label)} {_e(_fmt(threshold))}</text>"
        )
    parts.append(
        f'<text x="{ml + pw}" y="{height - 4}" class="tick" text-anchor="end">'
        f"{hist.total} rows; {hist.missing} without a value</text></svg>"
    )
    return "".join(parts)


_CSS = """
body{font:14px/1.4 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#1d232a;
background:#fff}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #d8dde3}
h3{font-size:15px;margin:18px 0 6px}
table{border-collapse:collapse;margin:6px 0}td,th{border:1px solid #d8dde3;padding:3px 8px;
text-align:left}td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
.muted{color:#5b6672}.svg-title{font-weight:600;font-size:13px}
svg.hist{background:#f7f9fb;border:1px solid #d8dde3;margin:6px 12px 6px 0}
.bar{fill:#3d7cc9}.axis{stroke:#5b6672}.tick{font-size:10px;fill:#5b6672}
.threshold{stroke:#d0342c;stroke-width:2;stroke-dasharray:5 3}
.threshold-label{font-size:11px;fill:#d0342c}
.grid{display:flex;flex-wrap:wrap;gap:10px}
figure{margin:0;width:140px;font-size:11px;word-wrap:break-word}
figure img{display:block;width:128px;height:128px;object-fit:contain;background:#eef1f4;
border:1px solid #d8dde3}
figcaption{max-height:6.5em;overflow:hidden}
.nothumb{width:128px;height:128px;display:flex;align-items:center;justify-content:center;
background:#eef1f4;border:1px dashed #b8c0c8}
"""


def _table_html(rows: Sequence[tuple[Any, ...]], header: Sequence[str], numeric: set[int]) -> str:
    head = "".join(
        f'<th class="n">{_e(h)}</th>' if i in numeric else f"<th>{_e(h)}</th>"
        for i, h in enumerate(header)
    )
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="n">{_e(v)}</td>' if i in numeric else f"<td>{_e(v)}</td>"
            for i, v in enumerate(r)
        )
        + "</tr>"
        for r in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _truncate(text: str | None, n: int = _CAPTION_CHARS) -> str:
    if text is None:
        return ""
    return text if len(text) <= n else text[: n - 1] + "…"


def render_html(
    table: pa.Table,
    stats: Mapping[str, Any],
    *,
    thumbnails: Thumbnails | None = None,
    samples_per_reason: int = 8,
    thumb_px: int = 128,
    bins: int = 40,
    title: str = "clipcurate run report",
) -> str:
    """The report page as one HTML string (see the module docstring).

    stats: :func:`build_stats` of the same table (thresholds are taken from it).
    thumbnails: key -> image bytes (a callable returning None, or a mapping, for keys it
        lacks); images are scaled to ``thumb_px`` and embedded as ``data:`` URIs. A key
        without bytes, or whose bytes do not decode, is listed without a picture.
    """
    clip_t = stats.get("clip_score", {}).get("threshold")
    unsafe_t = stats.get("unsafe_score", {}).get("threshold")
    out: list[str] = [
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
        # No scripts, no fetches: everything the page shows is inline.
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; '
        "img-src data:; style-src 'unsafe-inline'\">",
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        f'<p class="muted">generated {_e(stats.get("generated_at"))}; '
        f"model(s): {_e(', '.join(_short_model(m) for m in stats.get('models') or []) or 'n/a')}; "
        f"shards: {_e(stats.get('shards'))}</p>",
    ]
    n = int(stats["rows"])
    if stats.get("notes"):  # what the run's settings leave unfiltered (pipeline/model_defaults.py)
        out.append('<div id="notes"><h2>Notes</h2><ul>')
        out.extend(f"<li>{_e(line)}</li>" for line in stats["notes"])
        out.append("</ul></div>")

    def pct(c: int) -> str:
        return f"{100.0 * c / n:.1f}%" if n else "-"

    out.append("<h2>Rows</h2>")
    out.append(
        _table_html(
            [
                ("input rows", stats["input_rows"], ""),
                ("output rows", n, pct(n)),
                ("kept", stats["kept"], pct(stats["kept"])),
                ("dropped", stats["dropped"], pct(stats["dropped"])),
            ],
            ["", "rows", "share"],
            {1, 2},
        )
    )
    out.append('<div id="status-counts"><h3>By status</h3>')
    out.append(
        _table_html(
            [(s, c, pct(c)) for s, c in sorted(stats["status"].items(), key=lambda kv: -kv[1])],
            ["status", "rows", "share"],
            {1, 2},
        )
    )
    out.append('</div><div id="drop-counts"><h3>By drop reason</h3>')
    out.append(
        _table_html(
            [(r, c, pct(c)) for r, c in stats["drop_reasons"].items()],
            ["drop reason", "rows", "share"],
            {1, 2},
        )
    )
    out.append("</div>")

    out.append("<h2>Scores and duplicates</h2><div>")
    clip = _float_column(table, S.CLIP_SCORE)
    if clip is not None:
        out.append(
            histogram_svg(
                histogram(clip, bins, clip_t),
                name="clip_score",
                title="clip_score (cosine of image and caption embeddings)",
                threshold=clip_t,
                threshold_label="drop below",
            )
        )
    unsafe = _float_column(table, S.UNSAFE_SCORE)
    if unsafe is not None:
        out.append(
            histogram_svg(
                histogram(unsafe, bins, unsafe_t),
                name="unsafe_score",
                title="unsafe_score (largest margin minus its threshold)",
                threshold=unsafe_t,
                threshold_label="flag above",
            )
        )
    sizes = duplicate_group_sizes(table)
    out.append(
        histogram_svg(
            integer_histogram(sizes),
            name="dup_group_size",
            title=f"duplicate group size ({len(sizes)} groups)",
            integer_bins=True,
        )
    )
    out.append("</div>")
    if stats.get("unsafe_concepts"):
        out.append("<h3>Flagged by concept</h3>")
        out.append(_table_html(list(stats["unsafe_concepts"].items()), ["concept", "rows"], {1}))

    if stats.get("stages") or stats.get("timings"):
        out.append("<h2>Throughput</h2>")
        if stats.get("stages"):
            rows = [
                (
                    name,
                    e["rows"],
                    f"{e['seconds']:.1f}",
                    "-" if e["rows_per_s"] is None else f"{e['rows_per_s']:.1f}",
                )
                for name, e in stats["stages"].items()
            ]
            out.append(_table_html(rows, ["stage", "rows", "seconds", "rows/s"], {1, 2, 3}))
        if stats.get("timings"):
            out.append(
                _table_html(
                    [(k, f"{v:.1f}") for k, v in stats["timings"].items()],
                    ["phase", "seconds"],
                    {1},
                )
            )

    out.append(_samples_html(table, thumbnails, samples_per_reason, thumb_px))
    out.append("</body></html>")
    return "\n".join(out)


def _samples_html(
    table: pa.Table, thumbnails: Thumbnails | None, per_reason: int, thumb_px: int
) -> str:
    keys = table.column(S.KEY).to_pylist()
    captions = _column(table, S.CAPTION) or [None] * len(keys)
    urls = _column(table, S.URL) or [None] * len(keys)
    reasons = _column(table, S.DROP_REASON) or [None] * len(keys)
    clip = _float_column(table, S.CLIP_SCORE)
    parts = ['<h2>Samples by drop reason</h2><div id="samples">']
    picked = sample_rows(table, per_reason)
    order = sorted(picked, key=lambda c: (c == "kept", c))  # drop reasons first, kept last
    for cat in order:
        parts.append(
            f'<section class="sample-group" data-reason="{_e(cat)}"><h3>{_e(cat)}</h3>'
            '<div class="grid">'
        )
        for i in picked[cat]:
            uri = None
            data = _lookup(thumbnails, keys[i])
            if data:
                uri = thumbnail_data_uri(data, thumb_px)
            score = "" if clip is None or not np.isfinite(clip[i]) else f"clip {clip[i]:.3f}"
            tip = " | ".join(x for x in (urls[i], reasons[i]) if x)
            picture = (
                f'<img src="{uri}" alt="{_e(_truncate(captions[i], 80))}" '
                f'width="{thumb_px}" height="{thumb_px}">'
                if uri
                else '<div class="nothumb muted">no thumbnail</div>'
            )
            parts.append(
                f'<figure data-key="{_e(keys[i])}" title="{_e(tip)}">{picture}'
                f"<figcaption><b>{_e(keys[i])}</b> {_e(score)}<br>"
                f"{_e(_truncate(captions[i]))}</figcaption></figure>"
            )
        parts.append("</div></section>")
    if not picked:
        parts.append('<p class="muted">No row has an image.</p>')
    parts.append("</div>")
    return "".join(parts)


# ----------------------------------------------------------------------------- writing


def write_report(
    table: pa.Table,
    output: str,
    *,
    stages: Mapping[str, Mapping[str, Any]] | None = None,
    timings: Mapping[str, float] | None = None,
    input_rows: int | None = None,
    clip_threshold: float | None = None,
    unsafe_threshold: float = 0.0,
    thumbnails: Thumbnails | None = None,
    samples_per_reason: int = 8,
    storage: Any = None,
    title: str = "clipcurate run report",
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``_stats.json`` and ``report.html`` into ``output`` (a folder or ``s3://``
    URI), each atomically; returns the stats. Arguments as in :func:`build_stats` (``extra``:
    more top-level keys for ``_stats.json``, e.g. shard counts) and :func:`render_html`;
    ``storage``: a :class:`pipeline.config.StorageConfig` (S3 endpoint, credentials) or None
    for the defaults. Thumbnails from the run's tars::

        keys = sample_keys(table, samples_per_reason)
        thumbs = read_thumbnails_from_shards(f"{output}/shards", table, keys, storage)
        write_report(table, output, thumbnails=thumbs, ...)
    """
    from pipeline.storage import Storage

    stats = build_stats(
        table,
        stages=stages,
        timings=timings,
        input_rows=input_rows,
        clip_threshold=clip_threshold,
        unsafe_threshold=unsafe_threshold,
        extra=extra,
    )
    page = render_html(
        table, stats, thumbnails=thumbnails, samples_per_reason=samples_per_reason, title=title
    )
    target = Storage(output) if storage is None else Storage(output, storage)
    target.write_atomic(STATS_NAME, json.dumps(stats, indent=2, allow_nan=False).encode("utf-8"))
    target.write_atomic(HTML_NAME, page.encode("utf-8"))
    return stats


__all__ = [
    "HTML_NAME",
    "STATS_NAME",
    "Histogram",
    "build_stats",
    "duplicate_group_sizes",
    "histogram",
    "histogram_svg",
    "integer_histogram",
    "read_thumbnails_from_shards",
    "reason_category",
    "render_html",
    "sample_keys",
    "sample_rows",
    "thumbnail_data_uri",
    "write_report",
]
