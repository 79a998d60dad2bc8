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

The configuration is validated before any work starts; a bad value exits with status 2 and a
message naming the field. At the end a summary is printed (and ``--summary_json`` writes it).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from pipeline.config import (
    BlocklistConfig,
    ConfigError,
    DecodeConfig,
    DownloadConfig,
    DownloadJobConfig,
    ExecutionConfig,
    ReadConfig,
    ShardConfig,
    StorageConfig,
)

DISTRIBUTORS = ("multiprocessing", "ray")
# img2dataset's distributor names -> the scheduler that runs the stage graph.
_SCHEDULER = {"multiprocessing": "local", "ray": "ray"}


def _bool(v: str) -> bool:
    s = str(v).strip().lower()
    if s in ("1", "true", "yes", "y", "on"):
        return True
    if s in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {v!r}")


def _list(v: str) -> tuple[str, ...]:
    """``a,b`` or img2dataset's ``["a","b"]`` -> ``("a", "b")``."""
    s = v.strip()
    if s.startswith("["):
        try:
            items = json.loads(s)
        except ValueError:
            items = [x.strip().strip("'\"") for x in s.strip("[]").split(",")]
        return tuple(str(x) for x in items if str(x))
    return tuple(x.strip() for x in s.split(",") if x.strip())


def _none_or_str(v: str) -> str | None:
    return None if v.strip().lower() in ("", "none", "null") else v


def _add_download_args(p: argparse.ArgumentParser) -> None:
    r, dl, dc, sh = ReadConfig(), DownloadConfig(), DecodeConfig(), ShardConfig()
    g = p.add_argument_group("input")
    g.add_argument("--url_list", required=True, help="file, directory, glob or s3:// URI")
    g.add_argument("--input_format", default=r.input_format, help="parquet | csv | tsv | jsonl | txt")
    g.add_argument("--url_col", default=r.url_col)
    g.add_argument("--caption_col", type=_none_or_str, default=r.caption_col)
    g.add_argument("--save_additional_columns", type=_list, default=())
    g = p.add_argument_group("output")
    g.add_argument("--output_folder", required=True, help="local folder or s3:// URI")
    g.add_argument("--output_format", default="webdataset", help="only webdataset is written")
    g.add_argument("--number_sample_per_shard", type=int, default=sh.number_sample_per_shard)
    g.add_argument("--s3_endpoint_url", default=None)
    g = p.add_argument_group("download")
    g.add_argument("--timeout", type=float, default=dl.timeout, help="seconds, total per request")
    g.add_argument("--retries", type=int, default=dl.retries)
    g.add_argument("--thread_count", type=int, default=dl.thread_count, help="threads per download actor")
    g.add_argument("--max_bytes", type=int, default=dl.max_bytes)
    g.add_argument("--user_agent_token", default=dl.user_agent_token)
    g.add_argument(
        "--disallowed_header_directives", type=_list, default=dl.disallowed_header_directives
    )
    g.add_argument(
        "--allowed_networks",
        type=_list,
        action="append",
        default=[],
        help="CIDR allowed despite the address guard (repeat or comma-separate)",
    )
    g = p.add_argument_group("decode and resize")
    g.add_argument("--image_size", type=int, default=dc.image_size)
    g.add_argument("--resize_mode", default=dc.resize_mode, help="no | border | center_crop | keep_ratio")
    g.add_argument("--resize_only_if_bigger", type=_bool, nargs="?", const=True, default=False)
    g.add_argument("--encode_format", default=dc.encode_format, help="jpg | png | webp")
    g.add_argument("--encode_quality", type=int, default=dc.encode_quality)
    g.add_argument("--min_image_size", type=int, default=dc.min_image_size)
    g.add_argument("--max_aspect_ratio", type=float, default=dc.max_aspect_ratio)
    g.add_argument("--max_image_pixels", type=int, default=dc.max_image_pixels)
    g.add_argument("--max_frames", type=int, default=dc.max_frames)
    g = p.add_argument_group("execution")
    g.add_argument(
        "--distributor",
        default="multiprocessing",
        metavar="{" + ",".join(DISTRIBUTORS) + "}",
        help="multiprocessing (default): local worker processes, one shard per task, no Ray; "
        "ray: Ray Data on --ray_address or $RAY_ADDRESS, else a local Ray",
    )
    g.add_argument(
        "--processes_count",
        type=int,
        default=None,
        help="multiprocessing: worker processes (default: one per CPU); each downloads its "
        "next shard while it decodes the current one",
    )
    g.add_argument("--ray_address", default=None, help="ray: cluster address; default: $RAY_ADDRESS or start locally")
    g.add_argument("--summary_json", default=None, help="also write the summary to this path")
    g = p.add_argument_group("safety")
    g.add_argument("--optout_tokens", type=_list, default=dl.optout_tokens,
                   help="X-Robots-Tag tokens whose opt-outs are honoured besides --user_agent_token")
    g.add_argument("--blocklist", action="append", default=[], metavar="KIND=[NAME=]PATH",
                   help="a list never to store: KIND is url, domain, md5, sha1, sha256 or pdq; PATH a text "
                   "or Parquet file or s3:// URI (repeatable)")
    g.add_argument("--blocklist_output", action="append", default=[],
                   help="a job output whose takedowns (its _blocklist/) apply (repeatable)")
    g.add_argument("--pdq_threshold", type=int, default=31, help="PDQ match distance in bits")


_BLOCKLIST_FIELDS = {"url": "urls", "domain": "domains", "md5": "md5", "sha1": "sha1", "sha256": "sha256", "pdq": "pdq"}


def _blocklist_config(a: argparse.Namespace) -> BlocklistConfig:
    lists: dict[str, list[str]] = {f: [] for f in _BLOCKLIST_FIELDS.values()}
    for entry in a.blocklist:
        kind, sep, rest = entry.partition("=")
        if not sep or kind.strip().lower() not in _BLOCKLIST_FIELDS or not rest:
            raise ConfigError(f"blocklist: {entry!r} is not KIND=[NAME=]PATH with KIND one of {', '.join(_BLOCKLIST_FIELDS)}")
        lists[_BLOCKLIST_FIELDS[kind.strip().lower()]].append(rest)
    return BlocklistConfig(**{k: tuple(v) for k, v in lists.items()}, outputs=tuple(a.blocklist_output),
                           pdq_threshold=a.pdq_threshold)


def config_from_args(a: argparse.Namespace) -> DownloadJobConfig:
    """Build (and validate) the job configuration from parsed ``download`` arguments."""
    if a.output_format != "webdataset":
        raise ConfigError(f"shard.output_format: only 'webdataset' is supported, got {a.output_format!r}")
    cfg = DownloadJobConfig(
        read=ReadConfig(
            url_list=a.url_list,
            input_format=a.input_format,
            url_col=a.url_col,
            caption_col=a.caption_col,
            save_additional_columns=tuple(a.save_additional_columns),
        ),
        download=DownloadConfig(
            timeout=a.timeout,
            retries=a.retries,
            max_bytes=a.max_bytes,
            thread_count=a.thread_count,
            user_agent_token=a.user_agent_token,
            disallowed_header_directives=tuple(a.disallowed_header_directives),
            optout_tokens=tuple(a.optout_tokens),
            allowed_networks=tuple(x for group in a.allowed_networks for x in group),
        ),
        decode=DecodeConfig(
            image_size=a.image_size,
            resize_mode=a.resize_mode,
            resize_only_if_bigger=a.resize_only_if_bigger,
            encode_format=a.encode_format,
            encode_quality=a.encode_quality,
            min_image_size=a.min_image_size,
            max_aspect_ratio=a.max_aspect_ratio,
            max_image_pixels=a.max_image_pixels,
            max_frames=a.max_frames,
        ),
        shard=ShardConfig(output_folder=a.output_folder, number_sample_per_shard=a.number_sample_per_shard),
        storage=StorageConfig(s3_endpoint_url=a.s3_endpoint_url),
        blocklist=_blocklist_config(a),
    )
    cfg.validate()
    return cfg


def execution_from_args(a: argparse.Namespace) -> ExecutionConfig:
    """The execution settings of parsed ``download`` arguments (validated; errors name the
    flag as the field it sets)."""
    if a.distributor not in DISTRIBUTORS:
        raise ConfigError(f"--distributor: must be one of {', '.join(DISTRIBUTORS)}, got {a.distributor!r}")
    if a.processes_count is not None and a.processes_count < 1:
        raise ConfigError(f"--processes_count: must be >= 1, got {a.processes_count}")
    if a.distributor != "ray" and a.ray_address:
        raise ConfigError("--ray_address: only used with --distributor ray")
    ex = ExecutionConfig(scheduler=_SCHEDULER[a.distributor], ray_address=a.ray_address, processes=a.processes_count)
    ex.validate()
    return ex


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
        execution = execution_from_args(args)
        from pipeline.safety import check_blocklists

        check_blocklists(cfg, lambda line: logging.getLogger("clipcurate").info(line))  # before Ray
    except ConfigError as e:
        print(f"clipcurate: error: {e}", file=sys.stderr)
        return 2
    try:
        from pipeline.download_job import run_download

        summary = run_download(cfg, execution)
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
