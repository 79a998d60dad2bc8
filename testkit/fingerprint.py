"""A job output's content, minus what legitimately changes from run to run (wall times, dates,
tar member mtimes, download durations): to show that a refactor leaves the bytes a seeded run
writes unchanged.

    python -m testkit.fingerprint run --workdir /tmp/fp > before.json   # on commit A
    python -m testkit.fingerprint run --workdir /tmp/fp > after.json    # on commit B
    python -m testkit.fingerprint diff before.json after.json

``run`` generates a seeded synthetic world, serves it on loopback, runs the job on the local
scheduler with the bundled model (one CPU worker, one torch thread: deterministic), and prints
``{relative path: sha256 of its normalised content}`` for every file of the output.
Normalisation: Parquet files are compared by their rows (Arrow IPC of the table without
``download_s``); tars by member names and contents; manifests without ``created_at`` and file
digests; per-shard stats without their times; ``_stats.json`` without ``timings``,
``generated_at`` and stage seconds; ``report.html`` with numbers next to ``s`` / ``rows/s``,
the throughput tables' seconds and rates, and the generation time masked; the work folder's
path and the server's port are masked everywhere, so two runs in different folders compare equal.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import tarfile
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

VOLATILE_COLUMNS = ("download_s",)
# The loopback server's port differs between runs; URLs are compared without it.
_HOST = re.compile(rb"http://127\.0\.0\.1:\d+")


_MASKS: list[bytes] = []  # paths that differ between runs (the work folder)


def _unhost(data: bytes) -> bytes:
    data = _HOST.sub(b"http://HOST", data)
    for m in _MASKS:
        data = data.replace(m, b"WORKDIR")
    return data


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _parquet(path: Path) -> str:
    import pyarrow.compute as pc

    table = pq.read_table(path)
    table = table.drop_columns([c for c in VOLATILE_COLUMNS if c in table.column_names])
    if "url" in table.column_names:
        url = pc.replace_substring_regex(table.column("url"), r"http://127\.0\.0\.1:\d+", "http://HOST")
        table = table.set_column(table.column_names.index("url"), "url", url)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return _digest(sink.getvalue().to_pybytes())


def _tar(path: Path) -> str:
    h = hashlib.sha256()
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            h.update(m.name.encode() + b"\0")
            f = tar.extractfile(m)
            h.update(_digest(_unhost(f.read()) if f else b"").encode())
    return h.hexdigest()


def _json(path: Path, drop: tuple[str, ...]) -> str:
    doc = json.loads(_unhost(path.read_bytes()))

    def clean(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items() if k not in drop}
        if isinstance(x, list):
            return [clean(v) for v in x]
        return x

    return _digest(json.dumps(clean(doc), sort_keys=True).encode())


_HTML_TIMES = re.compile(r"\d+(\.\d+)?(?=\s*(s|rows/s|ms)\b)|\d{4}-\d\d-\d\d[ T]\d\d:\d\d(:\d\d)?[^<\"]*")
# The report's throughput tables give seconds and rows/s in cells of their own ("1.9", "-"
# for 0 s), without a unit next to them; row counts (integers) and stage names stay compared.
_HTML_THROUGHPUT = re.compile(r"<h2>Throughput</h2>.*?(?=<h2>|$)", re.S)
_HTML_RATE_CELL = re.compile(r'(<td class="n">)(\d+\.\d+|-)(</td>)')


def _html(text: str) -> bytes:
    text = _HTML_THROUGHPUT.sub(lambda m: _HTML_RATE_CELL.sub(r"\1#\3", m.group(0)), text)
    return _unhost(_HTML_TIMES.sub("#", text).encode())


def fingerprint(output: str | Path) -> dict[str, str]:
    """``{path relative to output: normalised sha256}`` for every file under ``output``."""
    root = Path(output)
    out = {}
    for p in sorted(root.rglob("*")):
        if not p.is_file():
            continue
        rel = str(p.relative_to(root))
        if p.suffix == ".parquet":
            out[rel] = _parquet(p)
        elif p.suffix == ".tar":
            out[rel] = _tar(p)
        elif p.name.endswith(".manifest.json"):
            out[rel] = _json(p, ("created_at", "files"))
        elif p.name == "_stats.json":
            out[rel] = _json(p, ("timings", "generated_at", "seconds", "rows_per_s", "first", "last",
                                 "duration", "start_time", "end_time"))
        elif p.name.endswith("_stats.json"):
            out[rel] = _json(p, ("duration", "start_time", "end_time"))
        elif p.suffix == ".html":
            out[rel] = _digest(_html(p.read_text(errors="replace")))
        else:
            out[rel] = _digest(_unhost(p.read_bytes()))
    return out


def run(workdir: Path, rows: int, seed: int) -> dict[str, str]:
    """Generate, serve and run a seeded job (see the module docstring); its fingerprint."""
    import shutil

    import torch

    from pipeline import job_config as J
    from pipeline.job import run as run_job
    from testkit.http_server import FaultServer
    from testkit.synthetic import generate_world

    torch.set_num_threads(1)
    shutil.rmtree(workdir, ignore_errors=True)
    world = workdir / "world"
    with FaultServer() as srv:
        table = generate_world(world, rows, seed, "http://HOST/", min_side=64, max_side=320)
        srv.root = world.resolve()
        urls = [srv.url(p) for p in table.column("_gt_path").to_pylist()]
        # The server's port changes between runs: the url column is compared by path.
        pq.write_table(table.set_column(table.column_names.index("url"), "url", pa.array(urls)), world / "in.parquet")
        cfg = J.from_args([
            "--input", str(world / "in.parquet"), "--output", str(workdir / "out"),
            "--allowed-networks", "127.0.0.1/32", "--number-sample-per-shard", "50",
            "--scheduler", "local", "--processes", "1", "--set", "read.save_additional_columns=_gt_row",
        ])  # fmt: skip
        run_job(cfg, lambda line: None)
    _MASKS[:] = [str(workdir.resolve()).encode(), str(workdir).encode()]
    return fingerprint(workdir / "out")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--workdir", type=Path, required=True)
    r.add_argument("--rows", type=int, default=150)
    r.add_argument("--seed", type=int, default=2027)
    d = sub.add_parser("diff")
    d.add_argument("a", type=Path)
    d.add_argument("b", type=Path)
    a = p.parse_args(argv)
    if a.cmd == "run":
        json.dump(run(a.workdir, a.rows, a.seed), sys.stdout, indent=1, sort_keys=True)
        print()
        return 0
    x, y = json.loads(a.a.read_text()), json.loads(a.b.read_text())
    diff = sorted(k for k in set(x) | set(y) if x.get(k) != y.get(k))
    for k in diff:
        print(f"differs: {k}")
    print(f"{len(x)} files before, {len(y)} after, {len(diff)} differ")
    return 1 if diff else 0


if __name__ == "__main__":
    sys.exit(main())
