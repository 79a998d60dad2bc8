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

Modules: :mod:`.stats` (the numbers of ``_stats.json``, drop categories, which rows the page
shows), :mod:`.page` (the HTML: tables, inline SVG histograms, thumbnails as ``data:`` URIs),
:mod:`.files` (``write_report``, and thumbnails read from the run's shard tars).
"""

from pipeline.report.files import HTML_NAME, STATS_NAME, read_thumbnails_from_shards, write_report
from pipeline.report.page import histogram_svg, render_html, thumbnail_data_uri
from pipeline.report.stats import (
    UNSPECIFIED_REASON,
    Histogram,
    build_stats,
    duplicate_group_sizes,
    histogram,
    integer_histogram,
    reason_category,
    sample_keys,
    sample_rows,
)

__all__ = [
    "HTML_NAME",
    "STATS_NAME",
    "UNSPECIFIED_REASON",
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
