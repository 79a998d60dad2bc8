"""Marginal CPU per image of the whole job vs img2dataset's download + resize + shard alone.

On one photo-like URL list (synthetic scenes re-encoded with camera-like grain and texture,
``testkit/photo_like.py``; long side 300-1200 px; JPEG), served by one loopback HTTP server
process, each tool runs as a separate process on the first ``--small`` rows and on all
``--rows`` rows:

- ``img2dataset``: ``img2dataset.download`` (2 processes, its default threads, image_size 256,
  border, webdataset, retries 0);
- ``job (default)``: ``python jobs/embed_laion.py --input ... --output ...`` with no scheduler
  flag and no Ray address (the default on one machine), bundled model, moderation, clip_score,
  dedup, Parquet, report;
- ``job (Ray Data)``: the same command with ``RAY_ADDRESS`` pointing at a local Ray head
  started before timing (loopback only), i.e. the path ``ray job submit`` takes;
- ``download`` (with ``--tools``): ``clipcurate download`` with its default flags (the
  download half alone: download, decode + resize, shards);
- ``job-i2d`` (with ``--tools``, after ``img2dataset``): the default job with ``--input-format
  img2dataset`` on img2dataset's output of the same round and size (its 256 px stored images,
  no download): what curating an existing img2dataset output costs.

CPU is counted two ways for each run: the whole machine's busy time from ``/proc/stat``
(every process, this benchmark's included: what a user's machine pays), and the CPU
of the run's own process tree from a cpuacct cgroup that the run, the image server and the Ray
head are placed in (exact for the run even when other work shares the machine; absent when
the cgroup cannot be created). Start-up cancels in the marginal figure:
``(cpu(rows) - cpu(small)) / (rows - small)``, in ms per image; the same difference of wall
times gives the steady-state rows/s.

That difference of two walls carries each run's start-up noise and, for the job, the global
pass after the stream, so the steady state is also measured inside the ``--rows`` run: the
least-squares slope of each shard's completion time against its rank (img2dataset and
``download``: the ``end_time`` of each shard's ``_stats.json``; the job: when its "shard ...
embedded" line, the end of the stream for that shard, reached this process), in rows/s. A
slope, not first-to-last, because img2dataset's two processes finish shards in pairs.

With ``--delay S`` each image server waits S seconds before answering (a network's latency),
and ``--hosts N`` serves the list from N server processes on 127.0.0.1..127.0.0.N, row i from
host i % N: to the downloaders N hosts, each under its own per-host limit (the job's
``download.per_host_concurrency``, 8 per task). The acceptance figures use neither.

This machine's speed drifts by tens of per cent within minutes, and the tools run one after
another, so one round's ratio carries that drift. ``--rounds R`` runs every tool in turn R
times and adds, per tool, the median and range over the rounds of its marginal ms per image,
of its ratio to img2dataset's figure of the same round and of both steady rates.

    python bench/job_cpu.py --rows 3000 --small 500 --rounds 3 --append bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
CGROUP_ROOT = Path("/sys/fs/cgroup/cpuacct")
PER_SHARD = 250


# ----------------------------------------------------------------------------- CPU meters


def machine_busy_s() -> float:
    """Busy CPU seconds of the whole machine since boot (/proc/stat: all but idle, iowait)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    v = [int(x) for x in fields]
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    # guest time is already counted in user/nice
    total = sum(v[:8])
    return (total - idle) / os.sysconf("SC_CLK_TCK")


class Cgroup:
    """A cpuacct cgroup (v1) for the processes of one benchmark; None-safe when unavailable."""

    def __init__(self, name: str) -> None:
        self.path: Path | None = CGROUP_ROOT / name
        try:
            self.path.mkdir(exist_ok=True)
            (self.path / "cpuacct.usage").read_text()
        except OSError:
            self.path = None

    def add(self, pid: int) -> None:
        if self.path is not None:
            (self.path / "cgroup.procs").write_text(str(pid))

    def cpu_s(self) -> float | None:
        if self.path is None:
            return None
        return int((self.path / "cpuacct.usage").read_text()) / 1e9

    def remove(self) -> None:
        if self.path is None:
            return
        for pid in (self.path / "cgroup.procs").read_text().split():
            try:
                (CGROUP_ROOT / "cgroup.procs").write_text(pid)
            except OSError:
                pass
        try:
            self.path.rmdir()
        except OSError:
            pass


# ----------------------------------------------------------------------------- the world


def make_world(workdir: Path, rows: int, seed: int) -> Path:
    from testkit.photo_like import texturize
    from testkit.synthetic import generate_world

    world = workdir / f"photo-world-{rows}-{seed}"
    if not (world / "urls.parquet").exists():
        shutil.rmtree(world, ignore_errors=True)
        generate_world(world, rows, seed, "http://HOST/", formats={"jpeg": 1.0}, min_side=300, max_side=1200)
        texturize(world, seed)
    return world


def free_port(addr: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((addr, 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer")


def url_list(world: Path, bases: list[str], rows: int, out: Path, delay: float = 0.0) -> Path:
    """The first ``rows`` of the world's list, row i pointed at ``bases[i % len(bases)]``; with
    ``delay`` (s) the server waits that long before answering each request
    (testkit.http_server's ``delay``)."""
    t = pq.read_table(world / "urls.parquet", columns=["url", "caption"]).slice(0, rows)
    query = f"?delay={delay:g}" if delay > 0 else ""
    urls = [u.replace("http://HOST/", bases[i % len(bases)] + "/") + query
            for i, u in enumerate(t.column("url").to_pylist())]
    pq.write_table(pa.table({"url": urls, "caption": t.column("caption")}), out)
    return out


# ----------------------------------------------------------------------------- the runs


@dataclass
class Run:
    tool: str
    rows: int
    wall_s: float
    machine_cpu_s: float
    tree_cpu_s: float | None
    ok: int
    shard_done: list[float] = field(default_factory=list)  # epoch s, each shard's completion
    round: int = 1  # which pass over the tools (--rounds)
    started: float | None = None  # epoch s the command started

    @property
    def first_shard_s(self) -> float | None:
        """Seconds from the command's start to its first finished shard: the start-up a user
        waits through before output appears."""
        if self.started is None or not self.shard_done:
            return None
        return min(self.shard_done) - self.started


# The job's per-shard progress line (pipeline/job.py, _Progress.update).
_EMBEDDED = re.compile(r"^\s*shard (\S+) embedded:")


def job_shard_times(lines: list[tuple[float, str]]) -> list[float]:
    """When each shard's "shard ... embedded" line arrived: ``lines`` are (epoch s, line)."""
    return sorted(t for t, line in lines if _EMBEDDED.match(line))


def stats_shard_times(folder: Path) -> list[float]:
    """Each shard's ``end_time`` (epoch s) from its ``NNNNN_stats.json`` (img2dataset's
    layout, which ``clipcurate download`` keeps)."""
    out = []
    for p in folder.glob("*_stats.json"):
        end = json.loads(p.read_text()).get("end_time")
        if end is not None:
            out.append(float(end))
    return sorted(out)


def completion_rate(times: list[float], per_shard: int) -> float | None:
    """Rows/s from shard completion times: ``per_shard`` over the least-squares slope of
    time against rank (None with fewer than three shards or no spread in time)."""
    if len(times) < 3:
        return None
    slope = float(np.polyfit(np.arange(len(times)), sorted(times), 1)[0])
    return per_shard / slope if slope > 1e-12 else None


I2D_CODE = """
import json, os, sys
from pathlib import Path
os.environ["NO_ALBUMENTATIONS_UPDATE"] = "1"
from img2dataset import download
src, out, per_shard = sys.argv[1], sys.argv[2], int(sys.argv[3])
download(url_list=src, output_folder=out, processes_count=2, image_size=256, resize_mode="border",
         output_format="webdataset", input_format="parquet", url_col="url", caption_col="caption",
         number_sample_per_shard=per_shard, timeout=10, retries=0, encode_quality=95,
         enable_wandb=False, disallowed_header_directives=[])
print(sum(json.loads(p.read_text())["successes"] for p in Path(out).glob("*_stats.json")))
"""


def _collect(stream: IO[str], into: list[tuple[float, str]]) -> None:
    for line in stream:
        into.append((time.time(), line))


def run_measured(tool: str, rows: int, cmd: list[str], env: dict[str, str], cg: Cgroup,
                 out_folder: Path | None = None) -> Run:
    """Run ``cmd`` to its end, timed: wall, CPU, rows ok, and each shard's completion time
    (from its output lines, or the ``_stats.json`` files in ``out_folder``)."""
    m0, c0, t0, started = machine_busy_s(), cg.cpu_s(), time.perf_counter(), time.time()
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    cg.add(proc.pid)
    # Lines are timestamped as they arrive (the job flushes each), for job_shard_times.
    got: dict[str, list[tuple[float, str]]] = {"out": [], "err": []}
    readers = [threading.Thread(target=_collect, args=(f, got[k]), daemon=True)
               for k, f in (("out", proc.stdout), ("err", proc.stderr))]
    for t in readers:
        t.start()
    proc.wait()
    for t in readers:
        t.join()
    wall = time.perf_counter() - t0
    m1, c1 = machine_busy_s(), cg.cpu_s()
    out, err = ("".join(line for _, line in got[k]) for k in ("out", "err"))
    if proc.returncode != 0:
        raise RuntimeError(f"{tool} failed ({proc.returncode}):\n{out[-3000:]}\n{err[-3000:]}")
    if tool.startswith("job"):
        done = job_shard_times(got["out"])
    else:
        done = stats_shard_times(out_folder) if out_folder is not None else []
    return Run(tool, rows, wall, m1 - m0, None if c0 is None else c1 - c0, parse_ok(tool, out), done,
               started=started)


def parse_ok(tool: str, out: str) -> int:
    if tool == "img2dataset":
        return int(out.strip().splitlines()[-1])
    if tool == "download":  # "rows: N  successes: M ..."
        line = next(x for x in out.splitlines() if x.startswith("rows:"))
        return int(line.split("successes:")[1].split()[0])
    for line in out.splitlines():
        # format_summary's status block: "  ok    N"
        parts = line.split()
        if len(parts) == 2 and parts[0] == "ok" and parts[1].isdigit():
            return int(parts[1])
    return -1


def job_cmd(src: Path, out: Path, sets: list[str] | None = None) -> list[str]:
    extra = [x for kv in sets or [] for x in ("--set", kv)]
    return [
        sys.executable, "jobs/embed_laion.py", "--input", str(src), "--output", str(out),
        "--allowed-networks", "127.0.0.0/8", "--number-sample-per-shard", str(PER_SHARD), *extra,
    ]  # fmt: skip


def head_env(run_dir: Path) -> dict[str, str]:
    """What a process needs to start or join the benchmark's head: loopback addresses kept as
    127.0.0.1 (Ray otherwise swaps in the host's external address) and the head's token."""
    return {
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(run_dir / "auth_token"),
    }


def start_ray_head(run_dir: Path, cpus: int, cg: Cgroup) -> tuple[subprocess.Popen, str]:
    """A loopback-only Ray head in its own session (``ray start --block``), so that stopping
    it kills exactly its processes (``ray stop`` would stop every Ray on the machine)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    # Token auth with a token private to this head, as infra/local/up.sh starts one; the
    # driver gets the same two variables (head_env).
    token = run_dir / "auth_token"
    token.write_text(os.urandom(32).hex())
    token.chmod(0o600)
    env = dict(os.environ, **head_env(run_dir))
    ray = str(Path(sys.executable).with_name("ray"))
    port = free_port()
    log = open(run_dir / "head.log", "wb")  # noqa: SIM115 - kept open for the head's life
    proc = subprocess.Popen(
        [ray, "start", "--head", "--block", "--node-ip-address", "127.0.0.1", f"--port={port}",
         "--num-cpus", str(cpus), "--include-dashboard=false", f"--temp-dir={run_dir}",
         "--disable-usage-stats"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    cg.add(proc.pid)
    address = f"127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline:
        if b"Ray runtime started" in (run_dir / "head.log").read_bytes():
            return proc, address
        if proc.poll() is not None:
            break
        time.sleep(0.5)
    stop_ray_head(proc)
    raise RuntimeError("ray start failed:\n" + (run_dir / "head.log").read_text(errors="replace")[-3000:])


def stop_ray_head(proc: subprocess.Popen) -> None:
    import signal

    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(20)
            time.sleep(2)  # its daemons exit after it
        except subprocess.TimeoutExpired:
            continue


# ----------------------------------------------------------------------------- report


def marginal(small: Run, big: Run) -> tuple[float, float | None, float]:
    n = big.rows - small.rows
    machine = (big.machine_cpu_s - small.machine_cpu_s) / n * 1000
    tree = None
    if big.tree_cpu_s is not None and small.tree_cpu_s is not None:
        tree = (big.tree_cpu_s - small.tree_cpu_s) / n * 1000
    rate = n / max(big.wall_s - small.wall_s, 1e-9)
    return machine, tree, rate


@dataclass
class Figures:
    """One tool's figures in one round: marginal CPU ms per image (machine; the run's cgroup),
    their ratios to img2dataset's of the same round (None: no img2dataset run, or no cgroup
    figure), and the steady rows/s by the wall difference and inside the big run."""

    ms: float
    tree_ms: float | None
    ratio: float | None
    tree_ratio: float | None
    rate: float
    inner: float | None


def round_figures(runs: list[Run]) -> dict[str, Figures]:
    """Per tool, in run order, the :class:`Figures` of ``runs`` (one round: each tool's small
    and big run)."""
    by_tool: dict[str, list[Run]] = {}
    for r in runs:
        by_tool.setdefault(r.tool, []).append(r)
    base = marginal(*by_tool["img2dataset"]) if "img2dataset" in by_tool else None
    out = {}
    for tool, (small, big) in by_tool.items():
        m, t, rate = marginal(small, big)
        ratio = tree_ratio = None
        if base is not None:
            ratio = m / base[0]
            tree_ratio = None if t is None or base[1] is None else t / base[1]
        out[tool] = Figures(m, t, ratio, tree_ratio, rate, completion_rate(big.shard_done, PER_SHARD))
    return out


def _tool_lines(runs: list[Run]) -> list[str]:
    """The per-tool table of one round: marginal CPU, ratio to img2dataset, steady rates."""
    lines = [
        "| tool | marginal ms/image (machine) | marginal ms/image (run's cgroup) | vs img2dataset (machine / cgroup) "
        "| steady rows/s (wall difference) | steady rows/s (in the big run) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for tool, f in round_figures(runs).items():
        ratio = ""
        if f.ratio is not None:
            rt = "n/a" if f.tree_ratio is None else f"{f.tree_ratio:.2f}x"
            ratio = f"{f.ratio:.2f}x / {rt}"
        tstr = "n/a" if f.tree_ms is None else f"{f.tree_ms:.2f}"
        istr = "n/a" if f.inner is None else f"{f.inner:.1f}"
        lines.append(f"| {tool} | {f.ms:.2f} | {tstr} | {ratio} | {f.rate:.1f} | {istr} |")
    return lines


def summary_lines(runs: list[Run]) -> list[str]:
    """Across rounds, per tool: the median and range of its marginal ms per image, of its ratio
    to img2dataset's figure of the same round (machine CPU) and of both steady rates."""
    rounds = sorted({r.round for r in runs})
    per: dict[str, dict[str, list[float]]] = {}
    for rnd in rounds:
        for tool, f in round_figures([r for r in runs if r.round == rnd]).items():
            d = per.setdefault(tool, {"ms": [], "ratio": [], "wall": [], "inner": []})
            d["ms"].append(f.ms)
            d["wall"].append(f.rate)
            if f.ratio is not None:
                d["ratio"].append(f.ratio)
            if f.inner is not None:
                d["inner"].append(f.inner)

    def cell(xs: list[float], fmt: str, unit: str = "") -> str:  # "median (min-max)"
        if not xs:
            return "n/a"
        return f"{statistics.median(xs):{fmt}}{unit} ({min(xs):{fmt}}-{max(xs):{fmt}})"

    lines = [
        f"Over {len(rounds)} rounds, median (min-max):",
        "",
        "| tool | marginal ms/image (machine) | vs img2dataset, same round | steady rows/s (wall difference) "
        "| steady rows/s (in the big run) |",
        "|---|---:|---:|---:|---:|",
    ]
    for tool, d in per.items():
        lines.append(f"| {tool} | {cell(d['ms'], '.2f')} | {cell(d['ratio'], '.2f', 'x')} | "
                     f"{cell(d['wall'], '.1f')} | {cell(d['inner'], '.1f')} |")
    return lines


def report(runs: list[Run], argv: list[str], load: tuple[float, float, float], delay: float = 0.0,
           hosts: int = 1) -> str:
    rounds = sorted({r.round for r in runs})
    lines = [
        "| run | rows | ok | wall s | first shard done, s | machine CPU s | run's CPU s (cgroup) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        tree = "n/a" if r.tree_cpu_s is None else f"{r.tree_cpu_s:.1f}"
        first = "n/a" if r.first_shard_s is None else f"{r.first_shard_s:.1f}"
        name = r.tool if len(rounds) == 1 else f"{r.tool} (round {r.round})"
        lines.append(f"| {name} | {r.rows} | {r.ok} | {r.wall_s:.1f} | {first} | {r.machine_cpu_s:.1f} | {tree} |")
    for rnd in rounds:
        lines += ["", *([f"Round {rnd}:", ""] if len(rounds) > 1 else []),
                  *_tool_lines([r for r in runs if r.round == rnd])]
    if len(rounds) > 1:
        lines += ["", *summary_lines(runs)]
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    head = (
        f"\n## Whole job vs img2dataset: marginal CPU per image ({when})\n\n"
        f"Machine: {platform.node()}, {os.cpu_count()} CPUs, {platform.machine()}; load average "
        f"{load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f} (1/5/15 min) before the runs. Command: "
        f"`python bench/job_cpu.py {shlex.join(argv)}`. Photo-like JPEGs (300-1200 px, "
        + (f"testkit/photo_like.py) from {hosts} loopback servers (127.0.0.1..127.0.0.{hosts}), one host each"
           if hosts > 1 else "testkit/photo_like.py) from one loopback server")
        + (f", answering each request after {delay:g} s" if delay > 0 else "")
        + f"; {PER_SHARD} rows per shard for every "
        "tool; bundled tiny model, default job settings"
        + (f"; the tools run in turn, {len(rounds)} rounds" if len(rounds) > 1 else "")
        + ".\n\n"
    )
    return head + "\n".join(lines) + "\n"


def list_arguments(p: argparse.ArgumentParser) -> None:
    """The URL list's flags, shared with the benchmarks that run the job on the same list:
    ``--rows``, ``--small`` (the two list sizes), ``--seed`` (the world) and ``--workdir``."""
    p.add_argument("--rows", type=int, default=3000)
    p.add_argument("--small", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default="/tmp/clipcurate-bench-jobcpu")


def serve_list(p: argparse.ArgumentParser, a: argparse.Namespace,
               hosts: int = 1) -> tuple[Path, Path, list[subprocess.Popen], list[str]]:
    """Check the list flags (:func:`list_arguments`), make (or reuse) the world in the
    workdir and serve it from one HTTP server process per loopback address 127.0.0.1 ..
    127.0.0.<hosts> (to a downloader, ``hosts`` hosts, each under its own per-host limit):
    (workdir, world folder, the server processes, their base URLs). The caller waits for them
    (:func:`wait_http`) and stops them."""
    if not 0 < a.small < a.rows:
        p.error("need 0 < --small < --rows")
    if not 1 <= hosts <= 254:
        p.error("--hosts must be 1..254")
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    world = make_world(work, a.rows, a.seed)
    servers, bases = [], []
    for i in range(1, hosts + 1):
        addr = f"127.0.0.{i}"
        port = free_port(addr)
        servers.append(subprocess.Popen(
            [sys.executable, "-m", "testkit.http_server", "--root", str(world), "--host", addr, "--port", str(port)],
            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        ))  # fmt: skip
        bases.append(f"http://{addr}:{port}")
    return work, world, servers, bases


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    list_arguments(p)
    p.add_argument("--cpus", type=int, default=2, help="Ray head num_cpus")
    p.add_argument("--tools", nargs="+", default=["img2dataset", "job", "job-ray"],
                   choices=["img2dataset", "download", "job", "job-ray", "job-i2d"])
    p.add_argument("--job-set", action="append", default=[], metavar="KEY=VALUE",
                   help="a --set for both job runs (e.g. execution.task_cpus=1.0); default: none")
    p.add_argument("--delay", type=float, default=0.0,
                   help="seconds the image server waits before each answer, as a real network's "
                        "latency would (default 0: loopback speed)")
    p.add_argument("--hosts", type=int, default=1,
                   help="image servers, one per loopback address 127.0.0.1..127.0.0.N, the list "
                        "spread over them: N hosts to the downloaders' per-host limits (default 1)")
    p.add_argument("--rounds", type=int, default=1,
                   help="run every tool, in turn, this many times; the report adds each tool's median and "
                        "range (this machine's speed drifts by tens of per cent within minutes)")
    p.add_argument("--append", default=None)
    a = p.parse_args(argv)
    if a.delay < 0:
        p.error("--delay must be >= 0")
    if a.rounds < 1:
        p.error("--rounds must be >= 1")
    if "job-i2d" in a.tools and ("img2dataset" not in a.tools
                                 or a.tools.index("img2dataset") > a.tools.index("job-i2d")):
        p.error("--tools: job-i2d reads img2dataset's output, so img2dataset must come before it")
    work, world, servers, bases = serve_list(p, a, a.hosts)
    cg = Cgroup(f"clipcurate-bench-{os.getpid()}")
    for server in servers:
        cg.add(server.pid)
    load = os.getloadavg()
    runs: list[Run] = []
    head: subprocess.Popen | None = None
    try:
        for base in bases:
            wait_http(base + "/")
        env = dict(os.environ)
        env.pop("RAY_ADDRESS", None)
        for rnd, tool in ((rnd, tool) for rnd in range(1, a.rounds + 1) for tool in a.tools):
            if tool == "job-ray":
                head, address = start_ray_head(work / "ray", a.cpus, cg)
            for rows in (a.small, a.rows):
                src = url_list(world, bases, rows, work / f"urls-{rows}.parquet", a.delay)
                out = work / f"out-{tool}-{rows}"
                shutil.rmtree(out, ignore_errors=True)
                if tool == "img2dataset":
                    cmd = [sys.executable, "-c", I2D_CODE, str(src), str(out), str(PER_SHARD)]
                    run_env = env
                elif tool == "download":
                    cmd = [sys.executable, "-m", "pipeline.cli", "download", "--url_list", str(src),
                           "--output_folder", str(out), "--allowed_networks", "127.0.0.0/8",
                           "--number_sample_per_shard", str(PER_SHARD), "--retries", "0"]
                    run_env = env
                elif tool == "job-i2d":
                    cmd = [*job_cmd(work / f"out-img2dataset-{rows}", out, a.job_set), "--input-format", "img2dataset"]
                    run_env = env
                else:
                    cmd = job_cmd(src, out, a.job_set)
                    run_env = (dict(env, RAY_ADDRESS=address, **head_env(work / "ray"))
                               if tool == "job-ray" else env)
                r = run_measured(tool, rows, cmd, run_env, cg, out)
                r.round = rnd
                print(json.dumps({k: v for k, v in r.__dict__.items() if k != "shard_done"}), flush=True)
                runs.append(r)
            if tool == "job-ray" and head is not None:
                stop_ray_head(head)
                head = None
    finally:
        if head is not None:
            stop_ray_head(head)
        for server in servers:
            server.terminate()
            server.wait(10)
        cg.remove()
    text = report(runs, argv, load, a.delay, a.hosts)
    print(text)
    if a.append:
        with open(a.append, "a") as f:
            f.write(text)


if __name__ == "__main__":
    main()
