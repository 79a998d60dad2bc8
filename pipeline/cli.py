"""``clipcurate`` command line. ``clipcurate download`` runs the download half alone.

Flag names are img2dataset's (``--url_list``, ``--output_folder``, ``--input_format``,
``--url_col``, ``--caption_col``, ``--save_additional_columns``, ``--image_size``,
``--resize_mode``, ``--resize_only_if_bigger``, ``--encode_format``, ``--encode_quality``,
``--min_image_size``, ``--max_aspect_ratio``, ``--number_sample_per_shard``, ``--timeout``,
``--retries``, ``--thread_count``, ``--user_agent_token``, ``--disallowed_header_directives``),
so an img2dataset command line mostly works after swapping the program name. Options that only
exist here: ``--allowed_networks``, ``--max_image_pixels``, ``--max_frames``, ``--max_bytes``,
``--s3_endpoint_url``, ``--ray_address``.

``--distributor`` (img2dataset's flag) picks what runs the stages: ``multiprocessing``
(default, as in img2dataset: ``--processes_count`` local worker processes, one shard per task,
no Ray; pipeline/schedulers/local.py) or ``ray`` (Ray Data on ``--ray_address`` or
``$RAY_ADDRESS``, else a local Ray). Both write the same shards.

Flags, ``--config FILE`` and ``--set section.field=value`` are read by the job's loader
(pipeline/job_config.py) into a DownloadJobConfig, validated before any work starts; a bad
value exits with status 2 and a message naming the field. At the end a summary is printed (and
``--summary_json`` writes it).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from pipeline import job_config as J
from pipeline.config import ConfigError, DownloadJobConfig
from pipeline.job_config import Flag

# img2dataset's distributor names -> the scheduler that runs the stage graph.
DISTRIBUTORS = {"multiprocessing": "local", "ray": "ray"}

# img2dataset's flag -> the field it sets. Read by the same loader as the job's flags
# (pipeline/job_config.py): values are typed by the field, errors name the field.
DOWNLOAD_FLAGS: dict[str, Flag] = {
    "--url_list": Flag("read.url_list", "file, directory, glob or s3:// URI"),
    "--input_format": Flag("read.input_format", "parquet | csv | tsv | jsonl | txt | img2dataset (an img2dataset output: images from its tars)"),
    "--url_col": Flag("read.url_col", "column with the image URL"),
    "--caption_col": Flag("read.caption_col", "column with the caption (none: no caption)"),
    "--save_additional_columns": Flag("read.save_additional_columns", "input columns to keep: a,b or [\"a\",\"b\"]"),
    "--output_folder": Flag("shard.output_folder", "local folder or s3:// URI"),
    "--number_sample_per_shard": Flag("shard.number_sample_per_shard", "rows per shard"),
    "--s3_endpoint_url": Flag("storage.s3_endpoint_url", "S3-compatible endpoint (MinIO, local S3)"),
    "--timeout": Flag("download.timeout", "seconds, total per request"),
    "--retries": Flag("download.retries", "extra attempts for transient failures"),
    "--thread_count": Flag("download.thread_count", "download threads per worker"),
    "--max_bytes": Flag("download.max_bytes", "byte cap per image"),
    "--user_agent_token": Flag("download.user_agent_token", "our token in User-Agent and X-Robots-Tag"),
    "--disallowed_header_directives": Flag("download.disallowed_header_directives", "X-Robots-Tag directives that opt out"),
    "--optout_tokens": Flag("download.optout_tokens",
                            "X-Robots-Tag tokens whose opt-outs are honoured besides --user_agent_token"),
    "--allowed_networks": Flag("download.allowed_networks",
                               "CIDR allowed despite the address guard (repeat or comma-separate)", repeatable=True),
    "--image_size": Flag("decode.image_size", "stored image size in pixels"),
    "--resize_mode": Flag("decode.resize_mode", "no | border | center_crop | keep_ratio"),
    "--resize_only_if_bigger": Flag("decode.resize_only_if_bigger", "true/false (bare flag: true)", const="true"),
    "--encode_format": Flag("decode.encode_format", "jpg | png | webp"),
    "--encode_quality": Flag("decode.encode_quality", "JPEG/WebP quality"),
    "--min_image_size": Flag("decode.min_image_size", "smallest side kept, pixels"),
    "--max_aspect_ratio": Flag("decode.max_aspect_ratio", "largest long/short side ratio kept"),
    "--max_image_pixels": Flag("decode.max_image_pixels", "decoded-pixel cap, checked from the header"),
    "--max_frames": Flag("decode.max_frames", "animation frame cap"),
    "--distributor": Flag("execution.scheduler", "multiprocessing (default): local worker processes, one shard "
                          "per task, no Ray; ray: Ray Data on --ray_address or $RAY_ADDRESS", values=DISTRIBUTORS),
    "--processes_count": Flag("execution.processes", "multiprocessing: worker processes (default: one per CPU)"),
    "--ray_address": Flag("execution.ray_address", "ray: cluster address; default: $RAY_ADDRESS or a local Ray"),
    "--blocklist_output": Flag("blocklist.outputs", "a job output whose takedowns (its _blocklist/) apply",
                               repeatable=True),
    "--pdq_threshold": Flag("blocklist.pdq_threshold", "PDQ match distance in bits"),
}
_BLOCKLIST_FIELDS = {"url": "urls", "domain": "domains", "md5": "md5", "sha1": "sha1", "sha256": "sha256", "pdq": "pdq"}


def _add_download_args(p: argparse.ArgumentParser) -> None:
    J.add_common_arguments(p, "YAML with the sections read, download, decode, shard, storage, blocklist, execution")
    J.add_flags(p, DOWNLOAD_FLAGS)
    p.add_argument("--output_format", default="webdataset", help="only webdataset is written")
    p.add_argument("--blocklist", action="append", default=[], metavar="KIND=[NAME=]PATH",
                   help="a list never to store: KIND is url, domain, md5, sha1, sha256 or pdq; PATH a text "
                   "or Parquet file or s3:// URI (repeatable)")
    p.add_argument("--summary_json", default=None, help="also write the summary to this path")


def config_from_args(a: argparse.Namespace) -> DownloadJobConfig:
    """The validated download configuration of parsed ``download`` arguments: defaults <
    ``--config`` < img2dataset's flags < ``--set``; a bad value raises ConfigError naming
    the field (and the flag that set it)."""
    if a.output_format != "webdataset":
        raise ConfigError(f"--output_format: only 'webdataset' is written, got {a.output_format!r}")
    cfg = J.load(a, DOWNLOAD_FLAGS, root=DownloadJobConfig, base=_without_validation(a))
    if cfg.execution.scheduler == "local" and cfg.execution.ray_address:
        raise ConfigError("execution.ray_address (--ray_address): only used with --distributor ray")
    return cfg


def _without_validation(a: argparse.Namespace) -> DownloadJobConfig:
    """``--config``'s YAML (or the defaults) with ``--blocklist KIND=PATH`` entries added; the
    download CLI's scheduler default is img2dataset's (multiprocessing: local)."""
    from dataclasses import replace

    cfg = J.from_yaml(a.config, root=DownloadJobConfig) if getattr(a, "config", None) else DownloadJobConfig()
    if cfg.execution.scheduler == "auto" and not getattr(a, "execution__scheduler", None):
        cfg = replace(cfg, execution=replace(cfg.execution, scheduler="local"))
    for entry in a.blocklist:
        kind, sep, rest = entry.partition("=")
        name = _BLOCKLIST_FIELDS.get(kind.strip().lower()) if sep else None
        if name is None or not rest:
            raise ConfigError(f"blocklist (--blocklist): {entry!r} is not KIND=[NAME=]PATH with KIND one of "
                              f"{', '.join(_BLOCKLIST_FIELDS)}")
        cfg = replace(cfg, blocklist=replace(cfg.blocklist, **{name: (*getattr(cfg.blocklist, name), rest)}))
    return cfg


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="clipcurate", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    _add_download_args(
        sub.add_parser(
            "download",
            help="URL lists -> WebDataset shards (img2dataset layout + manifests)",
            description="Download, resize and shard images, img2dataset-style.",
        )
    )
    from pipeline.calibrate import add_arguments as _add_calibrate_args

    _add_calibrate_args(
        sub.add_parser(
            "calibrate",
            help="pick moderation thresholds from a labelled sample -> YAML the job reads",
            description="Choose per-concept unsafe thresholds for a target precision or recall.",
        )
    )
    from pipeline.head_train import add_arguments as _add_head_args

    _add_head_args(
        sub.add_parser(
            "train-head",
            help="train an unsafe-classifier head (MLP over image embeddings) -> safetensors",
            description="Train a p_unsafe head on a labelled output; moderate.head_path loads it.",
        )
    )
    return p


def _print_summary(s: object) -> None:
    d = s.to_json()  # type: ignore[attr-defined]
    print(
        f"shards: {d['shards_planned']} planned, {d['shards_skipped']} already done, "
        f"{d['shards_written']} written to {d['output_folder']}"
    )
    print(
        f"rows: {d['count']}  successes: {d['successes']}  failed_to_download: "
        f"{d['failed_to_download']}  failed_to_resize: {d['failed_to_resize']}"
    )
    for status, count in d["status_dict"].items():
        print(f"  {status:<22} {count}")
    print(f"this run: {d['rows_this_run']} rows in {d['duration_s']:.1f} s ({d['images_per_s']:.1f} images/s)")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``clipcurate`` script; returns the process exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.command == "calibrate":
        from pipeline.calibrate import run as run_calibrate

        return run_calibrate(args)
    if args.command == "train-head":
        from pipeline.head_train import run as run_train_head

        return run_train_head(args)
    try:
        cfg = config_from_args(args)
        from pipeline.safety import check_blocklists

        check_blocklists(cfg, lambda line: logging.getLogger("clipcurate").info(line))  # before Ray
    except ConfigError as e:
        print(f"clipcurate: error: {e}", file=sys.stderr)
        return 2
    try:
        from pipeline.download_job import run_download

        summary = run_download(cfg)
    except ConfigError as e:  # input files or columns that do not exist
        print(f"clipcurate: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        from pipeline.errors import failure_lines

        print(failure_lines("clipcurate", e), file=sys.stderr, flush=True)
        return 1
    _print_summary(summary)
    if args.summary_json:
        from pipeline.storage import write_file

        write_file(args.summary_json, json.dumps(summary.to_json(), indent=2).encode("utf-8"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
