"""Curate LAION-style URL lists: download, shard, CLIP-embed, moderate, deduplicate, report.

    python jobs/embed_laion.py --input 's3://bucket/laion/part-*.parquet' \\
        --output s3://bucket/curated/2026-11-23 --model ViT-L-14 --pretrained openai

    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python jobs/embed_laion.py --config job.yaml --set filter.clip_score_threshold=0.28

``--input-format img2dataset`` takes an img2dataset output (or a clipcurate output's
``shards/``) instead of URL lists and reads the images from its tars (docs/operations.md).

Flags, ``--config job.yaml`` and ``--set section.field=value`` build one validated JobConfig
(pipeline/job_config.py; ``--help`` lists the flags); a bad value exits with status 2 and a
message naming the field, before Ray starts. Under ``ray job submit`` the driver joins the
cluster through ``$RAY_ADDRESS``; run directly, it starts a local Ray (only when there is
something to download or embed). Output layout:
``<output>/shards/`` (img2dataset's tars), ``<output>/embeddings/<shard>.parquet``,
``<output>/_stats.json``, ``<output>/report.html``, ``<output>/config.yaml``. Re-running on
the same output resumes (see pipeline/job.py).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

# The repository root, so `python jobs/embed_laion.py` imports this checkout's packages (under
# `ray job submit --working-dir .` that is the uploaded copy the workers import too).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from pipeline import job_config as J  # noqa: E402
from pipeline.config import ConfigError  # noqa: E402
from pipeline.errors import failure_lines  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit status (2 for a configuration error, 1 for a
    failed run: the traceback goes to the log, then one line with the root cause)."""
    args = J.build_parser(prog="embed_laion.py").parse_args(argv)
    try:
        cfg = J.from_namespace(args)
    except ConfigError as e:
        print(f"embed_laion.py: error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(J.to_yaml(cfg), end="")
        return 0
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from pipeline.job import format_summary, run

    # Ray starts (or is joined) only when shards need streaming: a re-run of a finished job
    # or a re-decision needs no cluster.
    try:
        summary = run(cfg)
    except ConfigError as e:  # found once the inputs are read (no files, missing columns, ...)
        print(f"embed_laion.py: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        print(failure_lines("embed_laion.py", e), file=sys.stderr, flush=True)
        return 1
    print(format_summary(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
