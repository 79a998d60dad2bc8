"""What a run report reads and writes: ``_stats.json`` and ``report.html`` in the output root
(:func:`write_report`, each file committed atomically), and the sample thumbnails read from
the run's shard tars (:func:`read_thumbnails_from_shards`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import pyarrow as pa

from pipeline import schema as S
from pipeline.report.page import Thumbnails, render_html
from pipeline.report.stats import build_stats

STATS_NAME = "_stats.json"
HTML_NAME = "report.html"


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
