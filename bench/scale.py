"""Scale: the whole job on growing synthetic URL lists; rows/s per stage and peak memory.

For each scheduler in ``--scheduler`` (default ``ray``; ``local``: the job's local worker
processes, no Ray; ``ray local`` measures both in one run) and each size in ``--rows`` (default
2000 10000 50000), on a fresh loopback-only local stack (``infra/local/up.sh``: Ray head,
local S3 server, synthetic image server; with ``local`` the Ray head idles):

1. a synthetic world of that many rows with small images (``--min-side``/``--max-side``,
   no "large" format, so 50k rows fit a 2-core box) is generated once and cached under
   ``--workdir``; its URL list, pointed at the image server, is uploaded to the local S3;
2. the job runs as users run it, ``python jobs/embed_laion.py --config jobs/demo.yaml ...``,
   reading from and writing to the local S3: with ``ray`` as a driver joining the stack's Ray
   (``$RAY_ADDRESS``, as under ``ray job submit``), with ``local`` as a plain command
   (``--scheduler local``, no Ray address) whose own worker processes run the stages;
3. while it runs, the resident set size (``VmRSS`` from ``/proc/<pid>/status``) of the driver
   and of every worker process is sampled every ``--interval`` s: with ``ray`` the raylet's
   ``ray::`` / ``default_worker.py`` children (tasks and actors), with ``local`` the driver's
   LocalScheduler workers (``cc-cpu`` / ``cc-model<i>``, forked by its forkserver; see
   pipeline/schedulers/local.py). In both, a worker's decode crash-guard child is not counted.
   Once the workers are up, ``infra/local/check_loopback.sh`` must find every socket of the
   run (driver included) on 127.0.0.1;
4. the per-stage rows and seconds the job recorded in ``<output>/_stats.json`` are read back,
   and the output's row count is checked against the input.

Prints, per scheduler, a table of memory and totals, the driver's peak per phase of the job
(start, stream, global pass, report) and rows/s per stage, then compares the peak memory of the
largest size with the smallest (target: within 1.3x, i.e. the stream does not accumulate), and
per size the largest growth of one long-lived worker from the stream's middle third to its last
(a pool that adds workers grows the sum; only a worker holding state per row grows this figure).
``--append FILE`` adds the sections to ``bench/RESULTS.md`` style Markdown.

    .venv/bin/python bench/scale.py --rows 2000 10000 50000 --scheduler ray local --append bench/RESULTS.md

RSS counts shared pages (libraries, Ray's object store mappings) in every process that
touches them, so the "total" column overstates the physical memory of the workers together;
it is the per-size trend that matters here.
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
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

REPO = Path(__file__).resolve().parent.parent
# The repository root: this checkout's packages and the test rig (testkit is not installed).
sys.path.insert(0, str(REPO))
LOCAL = REPO / "infra" / "local"
PY = Path(sys.executable)
TARGET_RATIO = 1.3
BUCKET_PREFIX = "scale"
MIB = 1024 * 1024


def _format_mix() -> dict[str, float]:
    # "large" images are 1500-4000 px whatever min/max side say: not what a 2-core scale run needs.
    from testkit.synthetic import DEFAULT_FORMAT_MIX

    return {k: v for k, v in DEFAULT_FORMAT_MIX.items() if k != "large"}


# (start of a line the job prints, phase it opens), see pipeline.job.run and _finish.
PHASES = (("stream:", "stream"), ("global pass:", "global pass"), ("report:", "report"))


# ------------------------------------------------------------------------------ world


def make_world(worlds: Path, rows: int, seed: int, min_side: int, max_side: int) -> str:
    """Generate (once) a synthetic world under ``worlds/<name>``; returns ``<name>``.

    URLs in its ``urls.parquet`` carry the placeholder ``http://HOST/<name>/``; they are
    rewritten to the image server's address per run (:func:`upload_url_list`).
    """
    from testkit.synthetic import generate_world

    name = f"r{rows}-s{seed}-{min_side}-{max_side}"
    if not (worlds / name / "urls.parquet").exists():
        tmp = worlds / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        generate_world(tmp, rows, seed, f"http://HOST/{name}/", formats=_format_mix(),
                       min_side=min_side, max_side=max_side, unsafe_rate=0.1)
        tmp.rename(worlds / name)  # a world is complete or absent, never half-written
    return name


# ------------------------------------------------------------------------------ stack


@dataclass
class Stack:
    """A running ``infra/local/up.sh`` stack: its run directory and state.env values."""

    run_dir: Path
    state: dict[str, str]

    @classmethod
    def up(cls, cpus: int, object_store_mb: int, images: Path) -> Stack:
        # Short on purpose: Ray's unix socket paths live under it (up.sh allows 40 chars).
        run_dir = Path(tempfile.mkdtemp(prefix="ccscale-", dir="/tmp"))
        proc = subprocess.run(
            [str(LOCAL / "up.sh"), "--run-dir", str(run_dir), "--num-cpus", str(cpus),
             "--object-store-mb", str(object_store_mb), "--images", str(images)],
            capture_output=True, text=True, timeout=300, env=_clean_env(), cwd=REPO,
        )  # fmt: skip
        if proc.returncode != 0:
            _down(run_dir)
            raise RuntimeError(f"infra/local/up.sh failed:\n{proc.stdout}\n{proc.stderr}")
        return cls(run_dir, _read_state(run_dir / "state.env"))

    def down(self) -> None:
        _down(self.run_dir)
        shutil.rmtree(self.run_dir, ignore_errors=True)

    @property
    def s3_endpoint(self) -> str:
        return self.state["S3_ENDPOINT_URL"]

    def driver_env(self, ray: bool = True) -> dict[str, str]:
        """A driver that uses this stack's S3 and, with ``ray``, joins its Ray (GCS address,
        the run's token); without, it has no Ray address, so the job runs on its local
        scheduler. The run marker makes the driver (and the processes it starts) part of the
        run for check_loopback.sh and down.sh."""
        joins = {
            "RAY_ADDRESS": self.state["RAY_GCS_ADDRESS"],
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": self.state["RAY_AUTH_TOKEN_PATH"],
            # Ray's local-only mode, as up.sh sets for the head: every socket on loopback.
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
            "RAY_USAGE_STATS_ENABLED": "0",
        }
        return _clean_env() | (joins if ray else {}) | {
            "CLIPCURATE_LOCAL_RUN": str(self.run_dir),
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": self.s3_endpoint,
            "AWS_ENDPOINT_URL_S3": self.s3_endpoint,
            "AWS_CONFIG_FILE": str(self.run_dir / "aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(self.run_dir / "aws-credentials"),
        }

    def s3(self) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.s3_endpoint, region_name="us-east-1",
                            aws_access_key_id="testing", aws_secret_access_key="testing")

    def check_loopback(self) -> str | None:
        """None when every socket of the run (driver included) is on loopback, else the report."""
        proc = subprocess.run([str(LOCAL / "check_loopback.sh"), "--run-dir", str(self.run_dir)],
                              capture_output=True, text=True, timeout=60, env=_clean_env())
        return None if proc.returncode == 0 else proc.stdout + proc.stderr


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_", "CLIPCURATE_"))}
    env["VENV"] = str(PY.parent.parent)
    env["NO_ALBUMENTATIONS_UPDATE"] = "1"
    return env


def _down(run_dir: Path) -> None:
    subprocess.run([str(LOCAL / "down.sh"), "--run-dir", str(run_dir), "--quiet"],
                   capture_output=True, text=True, timeout=120, env=_clean_env())


def _read_state(path: Path) -> dict[str, str]:
    state = {}
    for line in path.read_text().splitlines():
        if line.startswith("export "):
            key, _, value = line[len("export "):].partition("=")
            state[key] = shlex.split(value)[0] if value else ""
    return state


# ------------------------------------------------------------------------------ memory


def _proc_kib_field(path: str, key: str) -> int | None:
    """``key``'s value (a "<n> kB" line of a /proc file) in bytes; None when the file is
    gone (the process ended), 0 when the line is missing (a zombie has none)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return 0


def rss_bytes(pid: int) -> int | None:
    """Resident set size of ``pid`` in bytes (``VmRSS``), None when it is gone."""
    return _proc_kib_field(f"/proc/{pid}/status", "VmRSS:")


def pss_bytes(pid: int) -> int | None:
    """Proportional set size of ``pid`` in bytes (``Pss`` of /proc/<pid>/smaps_rollup: each
    page shared with other processes counted as its share), None when it is gone. Summed over
    processes it is the memory they take together: torch's ~220 MiB of library text, mapped
    by every process that imports it, counts once, where a sum of RSS counts it per process."""
    return _proc_kib_field(f"/proc/{pid}/smaps_rollup", "Pss:")


def _children(pid: int) -> list[int]:
    out = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(p) for p in f.read().split()]
    except OSError:
        pass
    return out


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def worker_role(pid: int) -> str:
    """What a worker process runs: Ray's process title (``ray::MapWorker(...)``,
    ``ray::IDLE``, a task's name) or the local scheduler's ``cc-<pool>``."""
    argv = _cmdline(pid)
    if argv and argv[0].startswith("ray::"):
        return argv[0].split(" ")[0]
    return _comm(pid) or "?"


def ray_worker_pids(raylet: int) -> list[int]:
    """The raylet's worker processes (tasks and actors of every job): children whose command
    line Ray rewrote to ``ray::...`` or that still run ``default_worker.py``. The raylet's
    agents (dashboard, runtime env) are its children too and are left out."""
    out = []
    for pid in _children(raylet):
        argv = _cmdline(pid)
        if argv and (argv[0].startswith("ray::") or any(a.endswith("default_worker.py") for a in argv)):
            out.append(pid)
    return out


def local_worker_pids(driver: int) -> list[int]:
    """The driver's LocalScheduler worker processes: its descendants (children of the
    scheduler's forkserver) named ``cc-<pool>`` (``cc-cpu``, ``cc-model<i>``) by
    pipeline/schedulers/local.py, under a parent not so named. That leaves out the forkserver,
    multiprocessing's resource tracker and the workers' decode crash-guard children (exec'd,
    so named ``python``, though for an instant during their exec they still show the
    worker's name)."""
    out, todo = [], [driver]
    while todo:
        parent = todo.pop()
        named = _comm(parent).startswith("cc-")
        for pid in _children(parent):
            if not named and _comm(pid).startswith("cc-"):
                out.append(pid)
            todo.append(pid)
    return out


def find_raylet(run_dir: Path) -> int:
    """Pid of the stack's raylet (a process of the run named ``raylet``)."""
    proc = subprocess.run([str(PY), str(LOCAL / "localrun.py"), "pids", str(run_dir)],
                          capture_output=True, text=True, timeout=60, check=True)
    for pid in map(int, proc.stdout.split()):
        if _comm(pid) == "raylet":
            return pid
    raise RuntimeError(f"no raylet among the processes of {run_dir}")


@dataclass
class MemoryPeaks:
    """Peaks in bytes over one run. ``worker_total``: the largest sum over the worker
    processes alive at one sample; ``worker_process``: the largest single worker."""

    driver: int = 0
    worker_process: int = 0
    worker_total: int = 0
    worker_total_pss: int = 0  # peak of the workers' summed PSS (pss_bytes), sampled with RSS
    workers_seen: set[int] = field(default_factory=set)
    samples: int = 0
    # Driver peak per phase of the job (start, stream, global pass, report), to tell streaming
    # state from the global pass when memory grows with rows.
    driver_by_phase: dict[str, int] = field(default_factory=dict)
    # The workers alive at the sample of ``worker_total``, (role, RSS) each: whether a larger
    # sum is more processes (pools scaled out) or bigger ones (state that grows with rows).
    worker_total_parts: list[tuple[str, int]] = field(default_factory=list)
    # Long-lived workers seen over the run (Ray Data's ``MapWorker`` actors, the local
    # scheduler's ``cc-model`` workers): more than the pools' size means workers were
    # stopped and started again (each embedding worker loads the model).
    long_lived_seen: set[int] = field(default_factory=set)
    # Each long-lived worker's RSS at every sample of the stream phase, (seconds since the
    # sampler started, bytes): whether a worker grows with the rows it has processed.
    stream_series: dict[int, list[tuple[float, int]]] = field(default_factory=dict)
    long_lived_role: dict[int, str] = field(default_factory=dict)


class Sampler(threading.Thread):
    """Samples the RSS of the driver and of the worker processes ``workers()`` lists (Ray's:
    :func:`ray_worker_pids`; the local scheduler's: :func:`local_worker_pids`) every
    ``interval`` s until stopped."""

    def __init__(self, driver: int, workers: Callable[[], list[int]], interval: float, log: Path) -> None:
        super().__init__(daemon=True)
        self.driver, self.workers, self.interval, self.log = driver, workers, interval, log
        self.peaks = MemoryPeaks()
        self.phase = "start"
        self._t0 = time.monotonic()
        self._offset = 0
        self._halt = threading.Event()

    def _follow_log(self) -> None:
        """Advance :attr:`phase` from the lines pipeline.job prints when a phase begins."""
        try:
            with open(self.log, "rb") as f:
                f.seek(self._offset)
                chunk = f.read()
        except OSError:
            return
        end = chunk.rfind(b"\n") + 1  # only whole lines; the rest is read next time
        self._offset += end
        for line in chunk[:end].decode(errors="replace").splitlines():
            for marker, phase in PHASES:
                if line.startswith(marker):
                    self.phase = phase

    def sample(self) -> None:
        p = self.peaks
        self._follow_log()
        d = rss_bytes(self.driver)
        if d is not None:
            p.driver = max(p.driver, d)
            p.driver_by_phase[self.phase] = max(p.driver_by_phase.get(self.phase, 0), d)
        total, total_pss, parts = 0, 0, []
        for pid in self.workers():
            r = rss_bytes(pid)
            if r is None:
                continue
            total_pss += pss_bytes(pid) or 0
            p.workers_seen.add(pid)
            p.worker_process = max(p.worker_process, r)
            total += r
            role = worker_role(pid)
            parts.append((role, r))
            if "MapWorker(" in role or role.startswith("cc-model"):
                p.long_lived_seen.add(pid)
                p.long_lived_role[pid] = role
                if self.phase == "stream":
                    p.stream_series.setdefault(pid, []).append((time.monotonic() - self._t0, r))
        if total > p.worker_total:
            p.worker_total, p.worker_total_parts = total, parts
        p.worker_total_pss = max(p.worker_total_pss, total_pss)
        p.samples += 1

    def run(self) -> None:
        while not self._halt.is_set():
            self.sample()
            self._halt.wait(self.interval)

    def stop(self) -> MemoryPeaks:
        self._halt.set()
        self.join()
        self.sample()  # Ray's workers outlive the driver; their final size counts too
        return self.peaks


# ------------------------------------------------------------------------------ one run


@dataclass
class SizeResult:
    """One size's run. Memory in bytes, times in seconds."""

    rows: int
    shards: int
    output_rows: int
    status: dict[str, int]
    wall_s: float
    timings: dict[str, float]
    stages: dict[str, dict[str, Any]]
    peaks: MemoryPeaks
    command: str
    loopback_checked: bool = False  # check_loopback.sh ran while the workers were up, and passed
    scheduler: str = "ray"  # what ran the job's stages: "ray" (the stack's Ray) or "local"


def upload_url_list(stack: Stack, worlds: Path, name: str, bucket: str) -> str:
    """The world's URL list, pointed at the stack's image server, as an S3 object; its URI."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(worlds / name / "urls.parquet")
    urls = [u.replace("http://HOST", stack.state["IMAGES_URL"], 1) for u in table.column("url").to_pylist()]
    table = table.set_column(table.column_names.index("url"), "url", pa.array(urls, pa.string()))
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    stack.s3().put_object(Bucket=bucket, Key=f"{name}/urls.parquet", Body=sink.getvalue().to_pybytes())
    return f"s3://{bucket}/{name}/urls.parquet"


def job_args(url_list: str, output: str, endpoint: str, a: argparse.Namespace, scheduler: str = "ray") -> list[str]:
    """The job's command line (after ``python``), as a user on this stack would type it. With
    ``ray`` the driver finds the Ray through ``$RAY_ADDRESS``; ``local`` is said explicitly."""
    return [
        "jobs/embed_laion.py", "--config", "jobs/demo.yaml",
        "--input", url_list, "--output", output, "--s3-endpoint-url", endpoint,
        "--allowed-networks", "127.0.0.1/32", "--image-size", str(a.image_size),
        "--number-sample-per-shard", str(a.per_shard),
        *(["--scheduler", "local"] if scheduler == "local" else []),
    ]  # fmt: skip


def _workers_of(scheduler: str, stack: Stack) -> Callable[[int], Callable[[], list[int]]]:
    """For a driver pid, the function listing the worker processes that run its stages."""
    if scheduler == "ray":
        raylet = find_raylet(stack.run_dir)
        return lambda driver: lambda: ray_worker_pids(raylet)
    return lambda driver: lambda: local_worker_pids(driver)


def run_size(rows: int, a: argparse.Namespace, worlds: Path, log: Path, scheduler: str = "ray") -> SizeResult:
    """World (cached) -> fresh stack -> the job on ``scheduler`` (``ray`` or ``local``) with
    memory sampling -> figures from _stats.json."""
    name = make_world(worlds, rows, a.seed, a.min_side, a.max_side)
    stack = Stack.up(a.cpus, a.object_store_mb, worlds)
    try:
        bucket = f"{BUCKET_PREFIX}-{uuid.uuid4().hex[:12]}"
        stack.s3().create_bucket(Bucket=bucket)
        url_list = upload_url_list(stack, worlds, name, bucket)
        output = f"s3://{bucket}/{name}/out"
        args = job_args(url_list, output, stack.s3_endpoint, a, scheduler)
        workers_of = _workers_of(scheduler, stack)
        started = time.perf_counter()
        with open(log, "w") as out:
            driver = subprocess.Popen([str(PY), *args], stdout=out, stderr=subprocess.STDOUT,
                                      env=stack.driver_env(ray=scheduler == "ray"), cwd=REPO)
            sampler = Sampler(driver.pid, workers_of(driver.pid), a.interval, log)
            sampler.start()
            loopback_checked = False
            try:
                while driver.poll() is None:
                    time.sleep(0.5)
                    # Once the workers are up (the stream has started), every socket of the
                    # run, the driver's included, must be on loopback.
                    if not loopback_checked and len(sampler.peaks.workers_seen) >= 2:
                        loopback_checked = True
                        problem = stack.check_loopback()
                        if problem:
                            raise RuntimeError(f"a process of the run is not on loopback:\n{problem}")
            finally:
                if driver.poll() is None:
                    driver.kill()
                    driver.wait()
                peaks = sampler.stop()
        wall = time.perf_counter() - started
        if driver.returncode != 0:
            raise RuntimeError(f"the job failed (exit {driver.returncode}); log {log}:\n"
                               + log.read_text()[-4000:])
        stats = json.loads(stack.s3().get_object(Bucket=bucket, Key=f"{name}/out/_stats.json")["Body"].read())
    finally:
        stack.down()
    used = re.findall(r"^scheduler: (\w+)", log.read_text(errors="replace"), re.MULTILINE)
    if used != [scheduler]:
        raise RuntimeError(f"the job was to run on the {scheduler} scheduler, its log says {used}; log {log}")
    if stats["rows"] != rows or sum(stats["status"].values()) != rows:
        raise RuntimeError(f"{rows} input rows but the output has {stats['rows']} ({stats['status']})")
    command = "python " + shlex.join(args)
    # The printed summary's timings include the report's own, which _stats.json cannot hold.
    timings = dict(stats.get("timings", {})) | log_timings(log.read_text(errors="replace"))
    return SizeResult(rows, int(stats.get("shards") or 0), int(stats["rows"]), dict(stats["status"]), wall,
                      timings, dict(stats.get("stages", {})), peaks, command, loopback_checked, scheduler)


def log_timings(text: str) -> dict[str, float]:
    """Phase seconds from the job's last ``timings: plan 0.3 s, stream 27.8 s, ...`` line."""
    lines = [ln for ln in text.splitlines() if ln.startswith("timings: ")]
    if not lines:
        return {}
    return {k: float(v) for k, v in re.findall(r"(\w+) ([0-9.]+) s", lines[-1])}


# ------------------------------------------------------------------------------ tables


def _mib(n: int) -> str:
    return f"{n / MIB:,.0f}"


def memory_table(results: list[SizeResult]) -> str:
    """Markdown: one row per size, totals and memory peaks (MiB)."""
    lines = [
        "| rows | shards | output rows | ok | job wall s | rows/s (wall) | stream s | global pass s "
        "| report s | driver peak RSS MiB | worker peak RSS MiB (largest process) "
        "| workers peak RSS MiB (sum) | workers peak PSS MiB (sum) | worker processes |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        t = r.timings
        lines.append(
            f"| {r.rows:,} | {r.shards} | {r.output_rows:,} | {r.status.get('ok', 0):,} | {r.wall_s:.1f} "
            f"| {r.rows / r.wall_s:.1f} | {t.get('stream', 0.0):.1f} | {t.get('global_pass', 0.0):.1f} "
            f"| {t.get('report', 0.0):.1f} | {_mib(r.peaks.driver)} | {_mib(r.peaks.worker_process)} "
            f"| {_mib(r.peaks.worker_total)} | {_mib(r.peaks.worker_total_pss)} | {len(r.peaks.workers_seen)} |"
        )
    return "\n".join(lines)


def phase_table(results: list[SizeResult]) -> str:
    """Markdown: the driver's peak RSS (MiB) in each phase of the job, one column per size."""
    phases = ["start", *(ph for _, ph in PHASES)]
    head = "| driver peak RSS MiB in phase | " + " | ".join(f"{r.rows:,} rows" for r in results) + " |"
    lines = [head, "|---|" + "---:|" * len(results)]
    for ph in phases:
        cells = [_mib(r.peaks.driver_by_phase[ph]) if ph in r.peaks.driver_by_phase else "-" for r in results]
        lines.append(f"| {ph} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def stage_table(results: list[SizeResult]) -> str:
    """Markdown: rows/s of each stream stage (rows out / seconds from its first task's start
    to its last task's end, as the job records them), one column per size."""
    names = list(dict.fromkeys(n for r in results for n in r.stages))
    head = "| stage | " + " | ".join(f"{r.rows:,} rows: rows/s (s)" for r in results) + " |"
    lines = [head, "|---|" + "---:|" * len(results)]
    for n in names:
        cells = []
        for r in results:
            st = r.stages.get(n)
            if st is None or not st.get("seconds"):
                cells.append("-")
            else:
                cells.append(f"{st['rows'] / st['seconds']:.1f} ({st['seconds']:.1f})")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def composition_table(results: list[SizeResult]) -> str:
    """Per size, the workers alive when their summed RSS peaked, by role: count x mean MiB."""
    roles = sorted({role for r in results for role, _ in r.peaks.worker_total_parts})
    head = "| workers at the peak of their sum | " + " | ".join(f"{r.rows:,} rows" for r in results) + " |"
    lines = [head, "|---|" + "---:|" * len(results)]
    for role in roles:
        cells = []
        for r in results:
            sizes = [b for name, b in r.peaks.worker_total_parts if name == role]
            cells.append(f"{len(sizes)} x {_mib(sum(sizes) // len(sizes))}" if sizes else "-")
        lines.append(f"| `{role}` | " + " | ".join(cells) + " |")
    lines.append("| long-lived workers started over the run (actors / model workers) | "
                 + " | ".join(f"{len(r.peaks.long_lived_seen)}" for r in results) + " |")
    return "\n".join(lines)


def ratio_check(results: list[SizeResult]) -> tuple[str, bool]:
    """Peak memory of the largest size over the smallest, per measure; (text, all within)."""
    small, big = min(results, key=lambda r: r.rows), max(results, key=lambda r: r.rows)
    if small.rows == big.rows:
        return "one size only: no growth check", True
    parts, ok = [], True
    for label, attr in (("driver", "driver"), ("largest worker", "worker_process"),
                        ("workers (sum)", "worker_total")):
        a, b = getattr(small.peaks, attr), getattr(big.peaks, attr)
        ratio = b / a if a else float("inf")
        ok &= ratio <= TARGET_RATIO
        parts.append(f"{label} {ratio:.2f}x")
    verdict = "within" if ok else "NOT within"
    text = (f"peak memory at {big.rows:,} rows vs {small.rows:,} rows: " + ", ".join(parts)
            + f" -> {verdict} {TARGET_RATIO}x")
    a, b = small.peaks.worker_total_pss, big.peaks.worker_total_pss
    if a and b:
        # Beside the verdict, not in it: the bound was set on RSS.
        text += f"; workers (sum of PSS, shared pages once) {b / a:.2f}x"
    return text, ok


def stream_growth(peaks: MemoryPeaks) -> tuple[float, int, str] | None:
    """The largest growth of one long-lived worker over the stream: its peak RSS in the last
    third of the stream over its peak in the middle third, as (ratio, bytes added, role); None
    when no worker was sampled at least twice in each. The first third is left out: workers
    load their model there (a worker the pool adds later shows its start-up as growth, which
    on a long stream is rare). Pools that scale out add workers (a larger sum at more rows)
    without any worker growing; a worker that keeps state per row grows here."""
    times = [t for series in peaks.stream_series.values() for t, _ in series]
    if not times:
        return None
    t0, t1 = min(times), max(times)
    a_from, b_from = t0 + (t1 - t0) / 3, t0 + 2 * (t1 - t0) / 3
    worst: tuple[float, int, str] | None = None
    for pid, series in peaks.stream_series.items():
        middle = [r for t, r in series if a_from <= t < b_from]
        last = [r for t, r in series if t >= b_from]
        if len(middle) < 2 or len(last) < 2:
            continue
        a, b = max(middle), max(last)
        if worst is None or b / a > worst[0]:
            worst = (b / a, b - a, peaks.long_lived_role.get(pid, "?"))
    return worst


def growth_line(results: list[SizeResult]) -> str:
    """One line per size: the largest growth of a long-lived worker over the stream
    (:func:`stream_growth`)."""
    parts = []
    for r in results:
        g = stream_growth(r.peaks)
        parts.append(f"{r.rows:,} rows: " + ("-" if g is None else f"{g[0]:.2f}x ({g[1] / MIB:+,.0f} MiB, `{g[2]}`)"))
    return ("long-lived workers (actors / model workers), largest growth of one worker's peak RSS from the "
            "stream's middle third to its last third: " + "; ".join(parts))


def _how(scheduler: str, a: argparse.Namespace) -> str:
    if scheduler == "local":
        return (f"the job on its local scheduler (no Ray address: on {len(os.sched_getaffinity(0))} CPUs, CPU worker "
                "processes for the CPUs the embedding worker(s) leave, and the embedding worker(s); the stack's Ray "
                "head idles); workers = the driver's LocalScheduler processes (cc-cpu, cc-model<i>)")
    return (f"the job as a driver on the stack's Ray ({a.cpus} logical CPUs, object store "
            f"{a.object_store_mb} MB); workers = the raylet's ray:: worker processes")


def report(results: list[SizeResult], a: argparse.Namespace, argv: list[str], load: tuple[float, ...]) -> str:
    """The Markdown section for bench/RESULTS.md (also what is printed): one scheduler's sizes."""
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    check, _ = ratio_check(results)
    cmd = "python bench/scale.py " + shlex.join(argv)
    scheduler = results[0].scheduler
    return (
        f"\n## Scale: the whole job at {', '.join(f'{r.rows:,}' for r in results)} rows, {scheduler} "
        f"scheduler ({when})\n\n"
        f"Machine: {platform.node()}, {os.cpu_count()} CPUs, {platform.machine()}; load average "
        f"(1/5/15 min) before {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f}, after "
        "{:.1f}/{:.1f}/{:.1f}. ".format(*os.getloadavg())
        + f"Command: `{cmd}`. Each size on a fresh local stack (infra/local/up.sh), "
        f"{_how(scheduler, a)}; synthetic world seed {a.seed}, long "
        f"side {a.min_side}-{a.max_side} px, no 'large' images; job: `jobs/demo.yaml` (tiny-synthetic "
        f"model, moderation, clip-score filter, dedup), image_size {a.image_size}, {a.per_shard} rows "
        f"per shard. RSS sampled every {a.interval} s from /proc.\n\n"
        f"Job command of the largest size: `{results[-1].command}`\n\n"
        f"{memory_table(results)}\n\n{composition_table(results)}\n\n{phase_table(results)}\n\n"
        f"{stage_table(results)}\n\n{check}\n\n{growth_line(results)}\n"
    )


def main(argv: list[str] | None = None) -> list[SizeResult]:
    """Run every size; print (and with ``--append``, append) the Markdown section."""
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, nargs="+", default=[2000, 10000, 50000])
    p.add_argument("--per-shard", type=int, default=500, help="rows per shard")
    p.add_argument("--image-size", type=int, default=64, help="stored image side (px)")
    p.add_argument("--min-side", type=int, default=48, help="shortest long side of a source image")
    p.add_argument("--max-side", type=int, default=96, help="longest long side of a source image")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scheduler", nargs="+", choices=("ray", "local"), default=["ray"],
                   help="what runs the job's stages: the stack's Ray, the job's local worker processes, or both")
    p.add_argument("--cpus", type=int, default=4, help="logical CPUs of the local Ray")
    p.add_argument("--object-store-mb", type=int, default=400)
    p.add_argument("--interval", type=float, default=0.5, help="RSS sampling period (s)")
    p.add_argument("--workdir", default="/tmp/clipcurate-bench-scale",
                   help="cached worlds and job logs")
    p.add_argument("--append", default=None, help="append the section to this Markdown file")
    a = p.parse_args(argv)
    if any(n < 1 for n in a.rows):
        p.error("--rows must be >= 1")

    work = Path(a.workdir)
    worlds = work / "worlds"
    worlds.mkdir(parents=True, exist_ok=True)
    results = []
    text = ""
    for scheduler in dict.fromkeys(a.scheduler):
        load = os.getloadavg()
        mine = []
        for rows in sorted(a.rows):
            log = work / f"job-{scheduler}-{rows}.log"
            t0 = time.perf_counter()
            mine.append(run_size(rows, a, worlds, log, scheduler))
            r = mine[-1]
            print(f"{scheduler}, {rows} rows: job {r.wall_s:.1f} s (all in {time.perf_counter() - t0:.1f} s); "
                  f"driver {_mib(r.peaks.driver)} MiB, largest worker {_mib(r.peaks.worker_process)} MiB, "
                  f"workers {_mib(r.peaks.worker_total)} MiB; log {log}", file=sys.stderr, flush=True)
        results += mine
        text += report(mine, a, argv, load)
    print(text)
    if a.append:
        with open(a.append, "a") as f:
            f.write(text)
    return results


if __name__ == "__main__":
    main()
