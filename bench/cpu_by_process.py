"""Where the whole job's CPU goes, by process role: every process on the machine, sampled.

The job (``jobs/embed_laion.py``, bundled model, default settings) runs on the photo-like
loopback list of ``bench/job_cpu.py`` at two sizes, on the local scheduler and on Ray Data (a
loopback head started before timing). Every 0.2 s each process's CPU time (utime + stime from
``/proc/<pid>/stat``) is read and the increase since the last sample is charged to the role its
title names at that moment (Ray renames a worker for the task or actor it runs): the driver,
the decode crash-guard children, the local scheduler's CPU and model workers, Ray's read tasks,
its actors (embedding and writer: ``MapWorker(MapBatches(EmbedStage))``,
``MapWorker(MapBatches(WriteStage))``), idle Ray workers, Ray's own daemons, the image
server. Per role the table gives both sizes' CPU seconds and the marginal ms per image
(start-up cancels in the difference); a process that starts and ends between two samples is
missed (the "unattributed" line: the machine's busy time from ``/proc/stat`` minus the
roles' sum).

    python bench/cpu_by_process.py --rows 3000 --small 500 --append bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import job_cpu as J  # noqa: E402
from results_md import append  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def role(comm: str, cmd: str) -> str:
    """A process's role from its command name and command line."""
    if "pipeline.crashguard" in cmd:
        return "decode child (crash guard)"
    if "testkit.http_server" in cmd:
        return "image server"
    if "embed_laion.py" in cmd:
        return "driver"
    if comm.startswith("cc-cpu"):
        return "local CPU worker (download, shard, write)"
    if comm.startswith("cc-model"):
        return "local model worker (embed)"
    if "forkserver" in cmd or "resource_tracker" in cmd:
        return "local forkserver"
    if cmd.startswith("ray::MapBatches(ReadStage"):
        return "Ray read task (download, shard)"
    if cmd.startswith("ray::MapWorker"):
        return "Ray actors (embed, write)"
    if cmd.startswith("ray::IDLE"):
        return "Ray idle workers"
    if cmd.startswith("ray::") or "raylet" in cmd or "gcs_server" in cmd or "dashboard" in cmd:
        return "Ray daemons and system actors"
    if comm.startswith("kworker"):
        return "kernel workers"
    return "other"


def _snapshot() -> dict[int, tuple[float, str]]:
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = open(f"/proc/{d}/stat").read()
            comm = stat[stat.index("(") + 1 : stat.rindex(")")]
            fields = stat[stat.rindex(")") + 2 :].split()
            cmd = open(f"/proc/{d}/cmdline").read().replace("\0", " ")
        except (OSError, ValueError):
            continue  # the process ended between listing and reading
        out[int(d)] = ((int(fields[11]) + int(fields[12])) / TICK, role(comm, cmd))
    return out


def measure(cmd: list[str], env: dict[str, str], log: Path) -> tuple[collections.Counter, float]:
    """CPU seconds per role while ``cmd`` runs, and the machine's busy seconds."""
    charged: collections.Counter = collections.Counter()
    last = _snapshot()
    m0 = J.machine_busy_s()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=J.REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        while True:
            time.sleep(0.2)
            now = _snapshot()
            for pid, (cpu, r) in now.items():
                before = last.get(pid)
                charged[r] += cpu - before[0] if before else cpu
            last = now
            if proc.poll() is not None:
                break
    if proc.returncode:
        raise RuntimeError(f"job failed ({proc.returncode}), see {log}")
    return charged, J.machine_busy_s() - m0


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    J.list_arguments(p)
    p.add_argument("--schedulers", nargs="+", default=["local", "ray"], choices=["local", "ray"])
    p.add_argument("--job-set", action="append", default=[], metavar="KEY=VALUE",
                   help="passed to the job as --set KEY=VALUE (repeatable)")
    p.add_argument("--append", default=None)
    a = p.parse_args(argv)
    work, world, servers, bases = J.serve_list(p, a)
    server, base = servers[0], bases[0]

    class _NoCgroup:
        def add(self, pid: int) -> None:
            pass

    sections = []
    try:
        J.wait_http(base + "/")
        for sched in a.schedulers:
            env = dict(os.environ)
            env.pop("RAY_ADDRESS", None)
            head = None
            if sched == "ray":
                head, address = J.start_ray_head(work / "ray-by-process", 2, _NoCgroup())
                env.update(J.head_env(work / "ray-by-process"), RAY_ADDRESS=address)
            try:
                got = {}
                for rows in (a.small, a.rows):
                    src = J.url_list(world, bases, rows, work / f"urls-{rows}.parquet")
                    out = work / f"out-by-process-{sched}-{rows}"
                    shutil.rmtree(out, ignore_errors=True)
                    got[rows] = measure(J.job_cmd(src, out, a.job_set), env, work / f"by-process-{sched}-{rows}.log")
                    print(sched, rows, f"{got[rows][1]:.1f} CPU-s", flush=True)
            finally:
                if head is not None:
                    J.stop_ray_head(head)
            (small, m_small), (big, m_big) = got[a.small], got[a.rows]
            lines = [f"| role ({sched} scheduler) | CPU s, {a.small} rows | CPU s, {a.rows} rows | marginal ms / image |",
                     "|---|---:|---:|---:|"]  # fmt: skip
            n = a.rows - a.small
            for r in sorted(set(small) | set(big), key=lambda r: -(big[r] - small[r])):
                if max(abs(small[r]), abs(big[r])) >= 0.05:
                    lines.append(f"| {r} | {small[r]:.2f} | {big[r]:.2f} | {1000 * (big[r] - small[r]) / n:.2f} |")
            un_s, un_b = m_small - sum(small.values()), m_big - sum(big.values())
            lines.append(f"| unattributed (machine minus roles) | {un_s:.2f} | {un_b:.2f} | {1000 * (un_b - un_s) / n:.2f} |")
            lines.append(f"| **machine (/proc/stat)** | {m_small:.2f} | {m_big:.2f} | {1000 * (m_big - m_small) / n:.2f} |")
            sections.append("\n".join(lines))
    finally:
        server.terminate()
        server.wait(10)
    body = "\n\n".join(sections)
    print(body)
    if a.append:
        append(a.append, "Whole job's CPU by process role", "Photo-like JPEGs (bench/job_cpu.py's world) "
               "from one loopback server, 250 rows per shard, bundled tiny model, default job settings; "
               "each process's CPU sampled every 0.2 s and charged to the role its title names.", body, argv)


if __name__ == "__main__":
    main()
