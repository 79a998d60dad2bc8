"""Take given URLs or image hashes down from a finished output.

    python jobs/takedown.py --output s3://bucket/curated/2026-11-23 \\
        --url https://example.com/a.jpg --sha256 <hex> --reason "DMCA 2026-118"

Rows are marked (``keep=false``, ``drop_reason="takedown: <reason>"``, image embedding
removed), the samples are removed from the shard tars (manifests updated), the report is
regenerated and ``<output>/_takedowns.jsonl`` gets an audit line; see pipeline/takedown.py.
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

from pipeline.config import StorageConfig  # noqa: E402
from pipeline.takedown import (  # noqa: E402
    Matchers,
    TakedownError,
    format_summary,
    read_list_file,
    takedown,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="takedown.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--output", required=True, help="a finished job's output (folder or s3:// URI)")
    p.add_argument("--url", action="append", default=[], help="a URL to take down (repeatable)")
    p.add_argument("--urls-file", action="append", default=[], help="file with one URL per line")
    p.add_argument("--sha256", action="append", default=[], help="sha256 hex of a stored image (repeatable)")
    p.add_argument("--hashes-file", action="append", default=[], help="file with one sha256 per line")
    p.add_argument("--s3-endpoint-url", default=None, help="S3-compatible endpoint")
    p.add_argument("--reason", default="request", help="recorded in drop_reason and the audit log")
    p.add_argument("--dry-run", action="store_true", help="report what would change, write nothing")
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
        matchers = Matchers.build(urls, hashes)
        summary = takedown(
            args.output,
            matchers,
            args.reason,
            storage=StorageConfig(s3_endpoint_url=args.s3_endpoint_url),
            dry_run=args.dry_run,
            emit=lambda line: print(line, flush=True),
        )
    except (TakedownError, OSError) as e:
        print(f"takedown.py: error: {e}", file=sys.stderr)
        return 2
    print(format_summary(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
