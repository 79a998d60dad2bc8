"""Take given URLs, image hashes or look-alikes down from a finished output.

    python jobs/takedown.py --output s3://bucket/curated/2026-11-23 \\
        --url https://example.com/a.jpg --sha256 <hex> --reason "DMCA 2026-118"

    # every row that looks like these images / rows / words, listed for review first:
    python jobs/takedown.py --output s3://bucket/curated/2026-11-23 --like suspect.jpg \\
        --like 000120042 --like-text "a hazard sign" --threshold 0.9 --dry-run --review review/

``--like`` takes image files (local or s3://) or row keys of the output; rows whose image
embedding is within cosine ``--threshold`` of any of them (default: the output's
``dedup.threshold``; image matches also confirmed by thumbnails when the output's model uses
the pixel check) are found with a faiss index (pipeline/similar.py). ``--dry-run`` with
``--review DIR`` writes ``DIR/matches.parquet`` and ``DIR/review.html`` (thumbnails) to check.

Rows are marked (``keep=false``, ``drop_reason="takedown: <reason>"``, image embedding
removed), the samples are removed from the shard tars (manifests updated), the report is
regenerated, ``<output>/_takedowns.jsonl`` gets an audit line and ``<output>/_blocklist/`` the
rows' URLs, hashes and PDQ hashes, so later runs never store them again; see
pipeline/takedown/.
Running the same takedown again changes nothing. Exit status 0 when done (URLs or hashes not
found are listed), 2 for bad input or an output that cannot be changed safely.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from pipeline import job_config as J  # noqa: E402
from pipeline.config import ConfigError, JobConfig  # noqa: E402
from pipeline.takedown import (  # noqa: E402
    Matchers,
    TakedownError,
    format_summary,
    read_list_file,
    takedown,
)

# The job's own flags, read by the same loader (pipeline/job_config.py).
FLAGS = {"--s3-endpoint-url": J.FLAGS["--s3-endpoint-url"]}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="takedown.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--output", required=True, help="a finished job's output (folder or s3:// URI)")
    p.add_argument("--url", action="append", default=[], help="a URL to take down (repeatable)")
    p.add_argument("--urls-file", action="append", default=[], help="file with one URL per line")
    p.add_argument("--sha256", action="append", default=[], help="sha256 hex of a stored image (repeatable)")
    p.add_argument("--hashes-file", action="append", default=[], help="file with one sha256 per line")
    J.add_flags(p, FLAGS)
    p.add_argument("--reason", default="request", help="recorded in drop_reason and the audit log")
    p.add_argument("--dry-run", action="store_true", help="report what would change, write nothing")
    p.add_argument("--like", action="append", default=[],
                   help="an image file or a row key: take down every row that looks like it (repeatable)")
    p.add_argument("--like-text", action="append", default=[], help="take down rows whose image matches this text")
    p.add_argument("--threshold", type=float, default=None,
                   help="cosine for --like/--like-text (default: the output's dedup.threshold)")
    p.add_argument("--pixel-check", default=None, choices=("on", "off"),
                   help="confirm --like image matches by thumbnails (default: the output's dedup.pixel_check)")
    p.add_argument("--review", default=None, help="with --like: write matches.parquet and review.html here")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        urls = list(args.url)
        hashes = list(args.sha256)
        for path in args.urls_file:
            urls += read_list_file(Path(path).read_text(encoding="utf-8"))
        for path in args.hashes_file:
            hashes += read_list_file(Path(path).read_text(encoding="utf-8"))
        storage = J.apply_flags(JobConfig(), args, FLAGS).storage
        keys: list[str] = []
        if args.like or args.like_text:
            from pipeline.similar import find_similar, write_review

            found, facts = find_similar(
                args.output, args.like, args.like_text, args.threshold,
                None if args.pixel_check is None else args.pixel_check == "on", storage,
                emit=lambda line: print(line, flush=True),
            )
            print(f"look-alikes: {len(found)} row(s) (index {facts['index']}, {facts['rows']:,} rows, "
                  f"built in {facts['build_s']:.1f} s, {facts['query_ms']:.1f} ms a query)", flush=True)
            if args.review:
                pq_path, html_path = write_review(found, facts, args.output, args.review, storage)
                print(f"review: {html_path} ({pq_path})", flush=True)
            keys = [m.key for m in found]
            if not keys and not urls and not hashes:
                print("nothing looks like the given images or texts; nothing to take down", flush=True)
                return 0
        matchers = Matchers.build(urls, hashes, keys)
        summary = takedown(
            args.output,
            matchers,
            args.reason,
            storage=storage,
            dry_run=args.dry_run,
            emit=lambda line: print(line, flush=True),
        )
    except (TakedownError, ConfigError, OSError) as e:
        print(f"takedown.py: error: {e}", file=sys.stderr)
        return 2
    print(format_summary(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
