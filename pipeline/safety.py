"""Start-up checks of everything safety-related, in the driver, before Ray starts.

A bad blocklist (unreadable, malformed, a hash of the wrong length) or an unsafe-classifier head
that does not fit the model would otherwise fail in every worker after the cluster is up, or,
worse, let rows through. :func:`preflight` loads them once in the driver and raises
:class:`~pipeline.config.ConfigError` with one line naming the file (and line).
"""

from __future__ import annotations

from collections.abc import Callable

from pipeline.blocklist import BlocklistSpec, validate
from pipeline.config import ConfigError, DownloadJobConfig, JobConfig


def blocklist_spec(cfg: JobConfig | DownloadJobConfig) -> BlocklistSpec:
    """The spec the download and decode stages of ``cfg`` load (own outputs included)."""
    download = cfg.download_job() if isinstance(cfg, JobConfig) else cfg
    return BlocklistSpec(download.blocklist, download.storage)


def check_blocklists(cfg: JobConfig | DownloadJobConfig, emit: Callable[[str], None] | None = None) -> None:
    """Load every list now; ConfigError (a BlocklistError) names the first bad file and line."""
    bl = validate(blocklist_spec(cfg))
    if bl is not None and emit is not None and not bl.empty:
        exact = sum(s.nbytes for s in bl.sets.values())
        pdq = bl.pdq.nbytes if bl.pdq is not None else 0
        emit(f"blocklists: {bl.summary()} ({exact / 1e6:.1f} MB in each download worker, "
             f"{pdq / 1e6:.1f} MB in each decode worker)")


def check_head(cfg: JobConfig) -> None:
    """The unsafe-classifier head, when configured, parses and takes the model's embedding
    size; ConfigError names the file otherwise."""
    m = cfg.moderate
    if not (m.enabled and m.head_path):
        return
    from pipeline.model_defaults import embedding_dim
    from pipeline.stages.moderate import Head
    from pipeline.storage import filesystem_for

    try:
        fs, path = filesystem_for(m.head_path, cfg.storage)
        with fs.open_input_stream(path) as f:
            data = f.read()
    except Exception as e:
        raise ConfigError(f"moderate.head_path: {m.head_path}: cannot read: {type(e).__name__}: {e}") from e
    dim = embedding_dim(cfg.embed.model, cfg.embed.pretrained)
    try:
        Head.from_bytes(data, dim)
    except Exception as e:
        raise ConfigError(f"moderate.head_path: {m.head_path}: {e}") from e


def preflight(cfg: JobConfig, emit: Callable[[str], None] | None = None) -> None:
    """Every start-up check of this module, in order; see the module docstring. Also says
    once what the model-owned settings leave unfiltered (pipeline/model_defaults.py)."""
    from pipeline.model_defaults import notes

    check_blocklists(cfg, emit)
    check_head(cfg)
    if emit is not None:
        for line in notes(cfg):
            emit(line)
