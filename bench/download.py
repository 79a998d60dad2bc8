"""Download + resize + shard throughput: clipcurate vs img2dataset, same list, same server.

Generates (once, cached under --workdir) a synthetic URL list of --rows JPEGs whose long side
is 300-1200 px, serves it from one loopback HTTP server process, then runs in this order:

1. img2dataset.download(processes_count=2, thread_count=its default, output_format=webdataset)
2. clipcurate's download half with ``--distributor multiprocessing``: ``--cpus`` local worker
   processes (pipeline/schedulers/local.py, no Ray; worker start-up is inside the timed run)
3. clipcurate's download half with ``--distributor ray``: local Ray with num_cpus=--cpus
   (started before timing, as on a cluster; Ray start-up time is printed separately)

(``--distributor ray`` or ``multiprocessing`` runs only that one of 2 and 3.) All with
image_size=256, resize_mode=border, JPEG quality 95, retries 0, decode isolation on (the
default), and the same number_sample_per_shard. Prints images/s for each and each clipcurate
run's ratio to img2dataset; --append writes a section to bench/RESULTS.md. --profile runs
cProfile over clipcurate's decode stage on the same images in this process and prints where
the time goes.

    python bench/download.py --rows 2000 --append
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import platform
import pstats
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parent.parent
# The repository root: this checkout's packages and the test rig (testkit is not installed).
sys.path.insert(0, str(REPO))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_world(workdir: Path, rows: int, seed: int) -> Path:
    """Synthetic images + URL list (URLs carry a placeholder host, rewritten per run)."""
    from testkit.synthetic import generate_world

    world = workdir / f"world-{rows}-{seed}"
    if not (world / "urls.parquet").exists():
        generate_world(
            world, rows, seed, "http://HOST", formats={"jpeg": 1.0}, min_side=300, max_side=1200
        )
    return world


def start_server(root: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "testkit.http_server", "--root", str(root), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            urllib.request.urlopen(base + "/", timeout=1)
        except urllib.error.HTTPError:
            return proc, base  # answering (404 for the directory) is what we wait for
        except OSError:
            time.sleep(0.2)
            continue
        return proc, base
    proc.kill()
    raise RuntimeError("HTTP server did not start")


def write_url_list(world: Path, base: str, out: Path) -> int:
    t = pq.read_table(world / "urls.parquet", columns=["url", "caption"])
    urls = [u.replace("http://HOST", base) for u in t.column("url").to_pylist()]
    pq.write_table(pa.table({"url": urls, "caption": t.column("caption")}), out)
    return len(urls)


def run_img2dataset(url_list: Path, out: Path, per_shard: int) -> tuple[float, int]:
    from img2dataset import download

    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    download(
        url_list=str(url_list),
        output_folder=str(out),
        processes_count=2,
        image_size=256,
        resize_mode="border",
        output_format="webdataset",
        input_format="parquet",
        url_col="url",
        caption_col="caption",
        number_sample_per_shard=per_shard,
        timeout=10,
        retries=0,
        encode_quality=95,
        enable_wandb=False,
        disallowed_header_directives=[],
    )
    elapsed = time.perf_counter() - t0
    import json

    ok = sum(json.loads(p.read_text())["successes"] for p in out.glob("*_stats.json"))
    return elapsed, ok


def _clipcurate_config(url_list: Path, out: Path, per_shard: int) -> Any:
    from pipeline.config import (
        DecodeConfig,
        DownloadConfig,
        DownloadJobConfig,
        ReadConfig,
        ShardConfig,
    )

    return DownloadJobConfig(
        read=ReadConfig(url_list=str(url_list)),
        download=DownloadConfig(timeout=10, retries=0, allowed_networks=("127.0.0.1/32",)),
        decode=DecodeConfig(image_size=256, resize_mode="border", encode_quality=95),
        shard=ShardConfig(output_folder=str(out), number_sample_per_shard=per_shard),
    )


def run_clipcurate(url_list: Path, out: Path, per_shard: int, cpus: int) -> tuple[float, int, float]:
    """The Ray distributor; returns (seconds, images stored, Ray start-up seconds)."""
    import ray

    from pipeline.config import ExecutionConfig
    from pipeline.download_job import run_download
    from pipeline.ray_start import init_ray

    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    init_ray(num_cpus=cpus, include_dashboard=False, logging_level="WARNING")
    ray_start = time.perf_counter() - t0
    try:
        summary = run_download(_clipcurate_config(url_list, out, per_shard), ExecutionConfig(scheduler="ray"))
    finally:
        ray.shutdown()
    return summary.duration_s, summary.successes, ray_start


def run_clipcurate_local(url_list: Path, out: Path, per_shard: int, cpus: int) -> tuple[float, int]:
    """The multiprocessing distributor with ``cpus`` worker processes; returns (seconds,
    images stored). Timed from before the worker processes start."""
    from pipeline.config import ExecutionConfig
    from pipeline.download_job import run_download

    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    summary = run_download(_clipcurate_config(url_list, out, per_shard), ExecutionConfig(scheduler="local", processes=cpus))
    return time.perf_counter() - t0, summary.successes


def profile_decode(world: Path, n: int) -> str:
    from pipeline.config import DecodeConfig
    from pipeline.stages.decode import DecodeStage

    paths = sorted((world / "images").rglob("*.jpg"))[:n]
    batch = pa.table(
        {
            "status": ["ok"] * len(paths),
            "error": pa.nulls(len(paths), pa.string()),
            "image_bytes": pa.array([p.read_bytes() for p in paths], pa.binary()),
        }
    )
    stage = DecodeStage(cfg=DecodeConfig(image_size=256, resize_mode="border"))
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    stage.process_batch(batch)
    prof.disable()
    per_image_ms = (time.perf_counter() - t0) / len(paths) * 1000
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(12)
    return f"decode+resize+encode on one core: {per_image_ms:.2f} ms/image\n{s.getvalue()}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--per_shard", type=int, default=250)
    ap.add_argument("--workdir", default="/tmp/clipcurate-bench-download")
    ap.add_argument("--append", action="store_true", help="append the result to bench/RESULTS.md")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument(
        "--distributor",
        choices=("both", "multiprocessing", "ray"),
        default="both",
        help="which clipcurate distributor(s) to run against img2dataset (default: both)",
    )
    args = ap.parse_args()

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    world = make_world(workdir, args.rows, args.seed)
    print(f"world ready in {time.perf_counter() - t0:.1f} s: {world}")
    proc, base = start_server(world)
    try:
        url_list = workdir / "urls-bench.parquet"
        n = write_url_list(world, base, url_list)
        i2d_s, i2d_ok = run_img2dataset(url_list, workdir / "out-img2dataset", args.per_shard)
        rows = [("img2dataset 1.47 (2 processes)", "img2dataset", i2d_ok, i2d_s)]
        ray_start = None
        if args.distributor in ("both", "multiprocessing"):
            mp_s, mp_ok = run_clipcurate_local(url_list, workdir / "out-clipcurate-mp", args.per_shard, args.cpus)
            rows.append((f"clipcurate (multiprocessing, {args.cpus} processes)", "multiprocessing", mp_ok, mp_s))
        if args.distributor in ("both", "ray"):
            cc_s, cc_ok, ray_start = run_clipcurate(
                url_list, workdir / "out-clipcurate", args.per_shard, args.cpus
            )
            rows.append((f"clipcurate (Ray, num_cpus={args.cpus})", "Ray", cc_ok, cc_s))
    finally:
        proc.terminate()
        proc.wait(10)
    i2d_rate = i2d_ok / i2d_s
    table = ["| tool | images stored | seconds | images/s | vs img2dataset |", "|---|---:|---:|---:|---:|"]
    for name, _, ok, s in rows:
        table.append(f"| {name} | {ok}/{n} | {s:.1f} | {ok / s:.1f} | {ok / s / i2d_rate:.2f}x |")
    text = "\n".join(table) + "\n\n"
    text += "; ".join(
        f"ratio clipcurate ({label}) / img2dataset: {ok / s / i2d_rate:.2f}x" for _, label, ok, s in rows[1:]
    )
    text += " (target >= 1.5x)"
    if ray_start is not None:
        text += f"; Ray start-up (not in the Ray time): {ray_start:.1f} s"
    text += "\n"
    print(text)
    prof_text = profile_decode(world, 200) if args.profile else ""
    if prof_text:
        print(prof_text)
    if args.append:
        machine = f"{platform.node()}, {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}"
        with open(REPO / "bench" / "RESULTS.md", "a") as f:
            f.write(
                f"\n## Download + resize + shard vs img2dataset ({datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC)\n\n"
                f"Machine: {machine}. Command: `python bench/download.py --rows {args.rows} "
                f"--cpus {args.cpus} --per_shard {args.per_shard} --distributor {args.distributor}`. "
                f"{n} synthetic JPEGs (long side "
                f"300-1200 px) served by one loopback server process; image_size 256, border, "
                f"webdataset output.\n\n{text}"
            )


if __name__ == "__main__":
    main()
