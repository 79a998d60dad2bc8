"""bench/job_cpu.py's steady state inside one run: shard completion times from the job's
progress lines and from img2dataset-style ``_stats.json`` files, and the rows/s their
least-squares slope gives (hand-worked series)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.bench.bench_module import load_bench

J = load_bench("job_cpu")


def test_one_worker_finishing_a_shard_every_two_seconds_is_125_rows_per_s() -> None:
    times = [100.0 + 2 * i for i in range(12)]
    assert J.completion_rate(times, 250) == pytest.approx(125.0)


def test_two_processes_finishing_shards_in_pairs_are_not_overcounted() -> None:
    """Pairs every 4 s: 500 rows per 4 s is 125 rows/s; first-to-last would say 137.5
    (11 shards over 20 s), the slope says 125 within the pairing's wobble."""
    times = [100.0 + 4 * (i // 2) for i in range(2, 14)]  # 4, 4, 8, 8, ... 24, 24 s after start
    first_to_last = 11 * 250 / (max(times) - min(times))
    assert first_to_last == pytest.approx(137.5)
    assert J.completion_rate(times, 250) == pytest.approx(125.0, rel=0.03)


def test_too_few_shards_or_no_spread_give_no_rate() -> None:
    assert J.completion_rate([1.0, 2.0], 250) is None
    assert J.completion_rate([5.0, 5.0, 5.0], 250) is None


def test_shard_times_come_from_the_jobs_progress_lines_and_from_stats_files(tmp_path: Path) -> None:
    lines = [
        (10.0, "stream: read -> download -> decode -> shard -> tokenize -> embed -> write\n"),
        (12.5, "  shard 00001 embedded: 250 rows (ok 250); 1/3 shards, 250 rows, 20.0 rows/s\n"),
        (11.0, "  shard 00000 embedded: 250 rows (ok 249, decode_error 1); 2/3 shards, 500 rows, 45.4 rows/s\n"),
        (14.0, "global pass: dedup and decisions\n"),
        (13.0, "  shard 00002 embedded: 250 rows (ok 250); 3/3 shards, 750 rows, 57.7 rows/s\n"),
    ]
    assert J.job_shard_times(lines) == [11.0, 12.5, 13.0]
    for i, end in enumerate([7.0, 3.0, 5.0]):
        (tmp_path / f"{i:05d}_stats.json").write_text(json.dumps({"count": 250, "start_time": 1.0, "end_time": end}))
    (tmp_path / "_stats.json").write_text(json.dumps({"count": 750}))  # the folder's total: no end_time
    assert J.stats_shard_times(tmp_path) == [3.0, 5.0, 7.0]


def _run(tool: str, rows: int, cpu: float, wall: float, rnd: int) -> object:
    return J.Run(tool=tool, rows=rows, wall_s=wall, machine_cpu_s=cpu, tree_cpu_s=cpu, ok=rows, round=rnd)


def test_rounds_are_summarised_by_median_and_range_of_same_round_ratios() -> None:
    """Two rounds of 500 and 3,000 rows (2,500 marginal rows). Round 1: img2dataset 25 CPU-s
    more (10 ms/image), the job 20 (8 ms, 0.80x); round 2 slower for both: 30 (12 ms) and 21
    (8.4 ms, 0.70x). Median of two = their mean."""
    runs = [
        _run("img2dataset", 500, 10.0, 10.0, 1), _run("img2dataset", 3000, 35.0, 25.0, 1),
        _run("job", 500, 8.0, 8.0, 1), _run("job", 3000, 28.0, 20.5, 1),
        _run("img2dataset", 500, 12.0, 11.0, 2), _run("img2dataset", 3000, 42.0, 31.0, 2),
        _run("job", 500, 9.0, 9.0, 2), _run("job", 3000, 30.0, 19.0, 2),
    ]
    text = "\n".join(J.summary_lines(runs))
    assert "Over 2 rounds" in text
    # job: ms 8.00 and 8.40; ratio 0.80 and 0.70; wall rates 2500/12.5 = 200 and 2500/10 = 250
    assert "| job | 8.20 (8.00-8.40) | 0.75x (0.70-0.80) | 225.0 (200.0-250.0) | n/a |" in text
    # img2dataset: walls 15 and 20 s more, 166.7 and 125.0 rows/s
    assert "| img2dataset | 11.00 (10.00-12.00) | 1.00x (1.00-1.00) | 145.8 (125.0-166.7) | n/a |" in text
    report = J.report(runs, ["--rounds", "2"], (0.0, 0.0, 0.0))
    assert "Round 1:" in report and "Round 2:" in report and "| job (round 2) | 3000 |" in report
    assert "| job | 8.40 | 8.40 | 0.70x / 0.70x | 250.0 | n/a |" in report
    # No shard times in these runs: the first-shard column says so rather than guessing.
    assert "| job (round 2) | 3000 | 3000 | 19.0 | n/a | 30.0 | 30.0 |" in report


def test_first_shard_is_counted_from_the_command_start() -> None:
    small = J.Run(tool="job", rows=500, wall_s=12.0, machine_cpu_s=15.0, tree_cpu_s=15.0, ok=500,
                  shard_done=[1000.0 + 10.5, 1000.0 + 8.25], started=1000.0)
    big = J.Run(tool="job", rows=3000, wall_s=30.0, machine_cpu_s=35.0, tree_cpu_s=35.0, ok=3000, started=2000.0)
    assert small.first_shard_s == 8.25 and big.first_shard_s is None
    report = J.report([small, big], [], (0.0, 0.0, 0.0))
    assert "| job | 500 | 500 | 12.0 | 8.2 | 15.0 | 15.0 |" in report
    assert "| job | 3000 | 3000 | 30.0 | n/a | 35.0 | 35.0 |" in report


@pytest.mark.parametrize("tools", [["job-i2d"], ["job-i2d", "img2dataset"]])
def test_job_i2d_needs_img2dataset_before_it(tools: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        J.main(["--tools", *tools])
    assert info.value.code == 2
    assert "job-i2d reads img2dataset's output, so img2dataset must come before it" in capsys.readouterr().err
