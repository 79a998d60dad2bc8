"""Deduplicate (and re-decide) a finished output again, without downloading or embedding.

    python jobs/dedup.py --output s3://bucket/curated/2026-11-23 \\
        --dedup-threshold 0.9 --dedup-against s3://bucket/curated/2026-11-22

Reads ``<output>/config.yaml`` (written by jobs/embed_laion.py), applies the flags and
``--set section.field=value`` overrides (only ``filter.*``, ``dedup.*`` except
``dedup.pixel_check``, ``storage.*`` and ``execution.*`` may change: the rest shaped the stored
rows), recomputes ``duplicate_of``,
``keep`` and ``drop_reason`` over ``<output>/embeddings/*.parquet``, rewrites only the files
whose decisions change, and rewrites ``_stats.json`` / ``report.html`` when something did.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from pipeline import job_config as J  # noqa: E402
from pipeline.config import ConfigError  # noqa: E402

FLAGS = {k: J.FLAGS[k] for k in ("--dedup-threshold", "--dedup-against", "--clip-score-threshold",
                                  "--dedup-pixel-check", "--s3-endpoint-url")}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dedup.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--output", required=True, help="a finished job's output (folder or s3:// URI)")
    J.add_flags(p, FLAGS)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (2 for a configuration error)."""
    args = build_parser().parse_args(argv)
    from pipeline.job import format_summary, redecide

    try:
        summary = redecide(J.load_output(args, FLAGS, args.output))
    except ConfigError as e:
        print(f"dedup.py: error: {e}", file=sys.stderr)
        return 2
    print(format_summary(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
