"""The report page: ``report.html`` as one self-contained string (:func:`render_html`): tables,
inline SVG histograms (:func:`histogram_svg`), sample thumbnails as ``data:`` URIs
(:func:`thumbnail_data_uri`), inline CSS, and a Content-Security-Policy that forbids scripts
and every fetch. Every string from the data is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline import schema as S
from pipeline.decisions import short_model
from pipeline.report.stats import (
    Histogram,
    _column,
    _float_column,
    duplicate_group_sizes,
    histogram,
    integer_histogram,
    sample_rows,
)

# Decoded-pixel cap for a thumbnail source; images in our shards are already resized, so this
# only guards against a caller handing over something unexpected.
_MAX_THUMB_SOURCE_PIXELS = 40_000_000
_CAPTION_CHARS = 160

Thumbnails = Callable[[str], "bytes | None"] | Mapping[str, bytes]


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


def _lookup(thumbnails: Thumbnails | None, key: str) -> bytes | None:
    if thumbnails is None:
        return None
    if isinstance(thumbnails, Mapping):
        return thumbnails.get(key)
    try:
        return thumbnails(key)
    except Exception:  # noqa: BLE001 - one unreadable thumbnail must not sink the report
        return None


def _e(value: Any) -> str:
    """HTML-escape anything for element content and double-quoted attributes."""
    return html.escape("" if value is None else str(value), quote=True)


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
        f"model(s): {_e(', '.join(short_model(m) for m in stats.get('models') or []) or 'n/a')}; "
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
    # The histograms' names (element ids) are the page's own, like _stats.json's keys.
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
