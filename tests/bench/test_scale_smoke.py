"""bench/scale.py: the RSS probe against a process of known size, the growth check and the
log parsing by hand-made examples, and one tiny end-to-end run of its main function (the whole
job on a local stack) whose printed tables must account for every row."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.bench.bench_module import load_bench

REPO = Path(__file__).resolve().parents[2]


scale = load_bench("scale")
MIB = 1024 * 1024


def test_rss_of_a_process_holding_256_mib_is_at_least_that_and_none_once_gone() -> None:
    # The child touches every page of 256 MiB, so all of it is resident.
    code = "import sys, time; b = bytearray(256 * 1024 * 1024); print('ready', flush=True); time.sleep(60)"
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        rss = scale.rss_bytes(child.pid)
        assert rss is not None and 256 * MIB <= rss < 256 * MIB + 200 * MIB
    finally:
        child.kill()
        child.wait()
    assert scale.rss_bytes(child.pid) is None


def test_local_workers_are_the_descendants_named_cc_but_not_their_children() -> None:
    # A child names itself as a LocalScheduler worker does (prctl PR_SET_NAME) and starts a
    # grandchild, as a worker starts its decode crash-guard child: only the child is a worker
    # (the grandchild may still show the name while it execs).
    code = ("import ctypes, subprocess, sys, time; ctypes.CDLL(None).prctl(15, b'cc-cpu', 0, 0, 0); "
            "g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
            "print(g.pid, flush=True); time.sleep(60)")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    grandchild = None
    try:
        grandchild = int(child.stdout.readline())
        assert scale.local_worker_pids(child.pid) == []
        workers = scale.local_worker_pids(os.getpid())
        assert child.pid in workers and grandchild not in workers
    finally:
        if grandchild is not None:
            os.kill(grandchild, signal.SIGKILL)
        child.kill()
        child.wait()


def _result(rows: int, driver: int, worker: int, total: int) -> object:
    peaks = scale.MemoryPeaks(driver=driver * MIB, worker_process=worker * MIB, worker_total=total * MIB)
    return scale.SizeResult(rows, 1, rows, {"ok": rows}, 1.0, {}, {}, peaks, "python x")


def test_growth_check_compares_largest_with_smallest_size_per_measure() -> None:
    within = [_result(50000, 1300, 1000, 5000), _result(2000, 1000, 1000, 4000)]
    text, ok = scale.ratio_check(within)
    assert ok
    assert "50,000 rows vs 2,000 rows" in text
    assert "driver 1.30x" in text and "largest worker 1.00x" in text and "workers (sum) 1.25x" in text

    text, ok = scale.ratio_check([_result(2000, 1000, 1000, 4000), _result(50000, 1000, 1400, 4000)])
    assert not ok and "largest worker 1.40x" in text and "NOT within 1.3x" in text

    text, ok = scale.ratio_check([_result(2000, 1000, 1000, 4000)])
    assert ok and "no growth check" in text

    # The PSS sum is reported beside the verdict, which stays on RSS.
    small, big = _result(2000, 1000, 1000, 4000), _result(50000, 1000, 1000, 5600)
    small.peaks.worker_total_pss, big.peaks.worker_total_pss = 3000 * MIB, 3600 * MIB
    text, ok = scale.ratio_check([small, big])
    assert not ok and "workers (sum) 1.40x" in text and text.endswith("workers (sum of PSS, shared pages once) 1.20x")


def test_stream_growth_is_one_workers_last_third_peak_over_its_middle_third() -> None:
    """A worker that loads its model in the first third and stays flat reads 1.00x; one that
    grows by 5 MiB per sample is the worst, with its role; a worker the pool adds in the last
    third has no middle third and is left out."""
    peaks = scale.MemoryPeaks()
    # Stream from t=0 to t=30 s (thirds from 10 and 20 s), samples every 2 s.
    peaks.stream_series[1] = [(t, (200 if t < 6 else 800) * MIB) for t in range(0, 31, 2)]
    peaks.stream_series[2] = [(t, (300 + 5 * t // 2) * MIB) for t in range(0, 31, 2)]
    peaks.stream_series[3] = [(t, (100 if t < 26 else 900) * MIB) for t in (22, 24, 26, 28, 30)]
    peaks.long_lived_role = {1: "ray::MapWorker(embed)", 2: "ray::MapWorker(write)", 3: "ray::MapWorker(late)"}
    ratio, added, role = scale.stream_growth(peaks)
    # Worker 2: middle third (t 10..18) peaks at 300 + 45 = 345 MiB, last (t 20..30) at 375 MiB.
    assert role == "ray::MapWorker(write)" and added == 30 * MIB and ratio == pytest.approx(375 / 345)
    del peaks.stream_series[2]
    assert scale.stream_growth(peaks)[:2] == (1.0, 0)
    assert scale.stream_growth(scale.MemoryPeaks()) is None

    small, big = _result(2000, 1, 1, 1), _result(50000, 1, 1, 1)
    big.peaks = peaks
    line = scale.growth_line([small, big])
    assert line.endswith("2,000 rows: -; 50,000 rows: 1.00x (+0 MiB, `ray::MapWorker(embed)`)")


def test_pss_of_processes_sharing_library_pages_sums_below_their_rss() -> None:
    """Two processes that map the same library: their PSS splits the shared pages, so the sum
    of PSS is below the sum of RSS; each PSS is at most its RSS."""
    code = "import sys, time, numpy; sys.stdout.write('up\\n'); sys.stdout.flush(); time.sleep(30)"
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE) for _ in range(2)]
    try:
        for p in procs:
            assert p.stdout.readline() == b"up\n"
        rss = [scale.rss_bytes(p.pid) for p in procs]
        pss = [scale.pss_bytes(p.pid) for p in procs]
        assert all(0 < b <= a for a, b in zip(rss, pss, strict=True))
        assert sum(pss) < sum(rss)
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert scale.pss_bytes(procs[0].pid) is None


def test_log_timings_reads_the_last_summary_line() -> None:
    log = ("timings: plan 9.0 s\n  shard 00000 embedded: 5 rows\n"
           "timings: plan 0.3 s, stream 27.8 s, global_pass 1.0 s, total 33.1 s, report 4.0 s\n")
    assert scale.log_timings(log) == {"plan": 0.3, "stream": 27.8, "global_pass": 1.0, "total": 33.1, "report": 4.0}
    assert scale.log_timings("no summary") == {}


@pytest.mark.slow
@pytest.mark.parametrize("scheduler", [pytest.param("ray", marks=pytest.mark.machine_wide), "local"])
def test_main_runs_the_job_and_reports_every_row_and_stage(tmp_path, capsys, scheduler) -> None:
    rows = 60
    started = time.monotonic()
    results = scale.main(["--rows", str(rows), "--per-shard", "20", "--workdir", str(tmp_path),
                          "--interval", "0.2", "--scheduler", scheduler])
    assert time.monotonic() - started < 240
    (r,) = results
    assert r.scheduler == scheduler
    assert (r.rows, r.output_rows, r.shards) == (rows, rows, 3)
    assert sum(r.status.values()) == rows
    # Every stream stage saw every row (the synthetic world has no failing rows).
    for stage in ("ReadStage+DownloadStage+DecodeStage+ShardStage+TokenizeStage", "EmbedStage", "WriteStage"):
        assert r.stages[stage]["rows"] == rows, (stage, r.stages[stage])
    # The driver loads torch and the model: far above an idle interpreter's ~10 MiB.
    assert r.loopback_checked
    assert r.peaks.driver > 200 * MIB
    assert r.peaks.worker_process > 100 * MIB
    assert r.peaks.worker_total >= r.peaks.worker_process
    assert len(r.peaks.workers_seen) >= 2
    # The embedding worker (an actor, or the local model worker) is seen, and none is
    # restarted: on the stack's 4 CPUs Ray's pools hold at most 2 embedding + 2 writer actors.
    assert 1 <= len(r.peaks.long_lived_seen) <= (4 if scheduler == "ray" else 1)
    assert set(r.peaks.driver_by_phase) >= {"stream", "global pass", "report"}
    assert max(r.peaks.driver_by_phase.values()) == r.peaks.driver
    out = capsys.readouterr().out
    assert f"| {rows} | 3 | {rows} | {r.status.get('ok', 0)} |" in out
    assert "| EmbedStage |" in out and "one size only" in out
    assert f"| long-lived workers started over the run (actors / model workers) | {len(r.peaks.long_lived_seen)} |" in out
    assert "--number-sample-per-shard 20" in r.command
    assert ("--scheduler local" in r.command) == (scheduler == "local")
    assert f"{scheduler} scheduler" in out
