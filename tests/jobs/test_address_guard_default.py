"""A new user's first run against images on their own machine: the address guard refuses
loopback by default, every row says so, and the summary names the one setting that allows it."""

from __future__ import annotations

import gc
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline import job
from pipeline import schema as S
from pipeline.config import ExecutionConfig, JobConfig
from testkit.http_server import FaultServer
from testkit.synthetic import generate_world


def test_loopback_rows_are_refused_and_the_summary_says_how_to_allow_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with FaultServer(tmp_path) as srv:
        generate_world(tmp_path, 6, 2024, srv.base_url + "/")
        out = tmp_path / "out"
        cfg = JobConfig(input=str(tmp_path / "urls.parquet"), output=str(out),
                        execution=ExecutionConfig(scheduler="local", processes=1))
        summary = job.run(cfg, emit=lambda _: None)
        assert srv.count() == 0  # not one request reached the loopback server
    # The stream froze the collector's view of start-up's objects; run() hands it back.
    assert gc.get_freeze_count() == 0
    rows = pq.read_table(out / "embeddings").to_pylist()
    assert len(rows) == 6 and all(r[S.STATUS] == S.BLOCKED_ADDRESS for r in rows)
    assert all("127.0.0.1 is loopback" in r[S.ERROR] for r in rows)
    text = job.format_summary(summary)
    assert "note: 6 rows were refused by the address guard" in text
    assert "--allowed-networks" in text
    # A run with nothing refused has no such note.
    assert "address guard" not in job.format_summary(job.JobSummary(output="x", status_counts={S.OK: 3}))
