"""The job's global pass on hand-made embeddings files (no Ray): decisions land in the files,
an earlier run's kept rows are deduplicated against, and a second pass rewrites nothing."""

from __future__ import annotations

import os
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import schema as S
from pipeline.config import ConfigError, DedupConfig, FilterConfig, JobConfig, ModerateConfig
from pipeline.global_pass import global_pass, read_previous
from pipeline.stages.write import output_table, write_parquet

from .conftest import REPO

DIM = 4
MODEL = "tiny-synthetic@sha256:" + "cd" * 32
SHORT = "tiny-synthetic@sha256:" + "cd" * 6 + "…"


def _unit(*v: float) -> list[float]:
    a = np.array(v, np.float64)
    return (a / np.linalg.norm(a)).tolist()


E1, E2, E3, E4 = _unit(1, 0, 0, 0), _unit(0, 1, 0, 0), _unit(0, 0, 1, 0), _unit(0, 0, 0, 1)
E3_NEAR = _unit(0, 0.05, 1, 0)


def _write(folder, shard: str, rows: list[tuple], extra: dict | None = None) -> None:
    """rows: (key, status, clip_score, embedding, sha256)."""
    keys, statuses, scores, embs, shas = (list(c) for c in zip(*rows, strict=True))
    n = len(rows)
    t = pa.table({
        S.KEY: keys, S.SHARD: [shard] * n, S.STATUS: statuses,
        S.CLIP_SCORE: pa.array(scores, pa.float32()),
        S.IMAGE_EMBEDDING: pa.array([None if e is None else np.float16(e).tolist() for e in embs],
                                    S.embedding_type(DIM)),
        S.SHA256: pa.array(shas, pa.string()), S.MODEL: [MODEL] * n,
        **(extra or {}),
    })
    from pipeline.config import WriteConfig

    write_parquet(output_table(t, DIM), os.path.join(folder, f"{shard}.parquet"), WriteConfig(output_folder=str(folder)),
                  JobConfig().storage)


@pytest.fixture
def runs(tmp_path):
    prev = tmp_path / "prev" / "embeddings"
    prev.mkdir(parents=True)
    _write(prev, "00000", [("000000000", "ok", 0.5, E1, "p-sha0"), ("000000001", "ok", 0.5, E2, "p-sha1")],
           extra={S.KEEP: [True, False]})
    out = tmp_path / "run" / "embeddings"
    out.mkdir(parents=True)
    _write(out, "00000", [
        ("000000000", "ok", 0.40, E1, "a"),  # the earlier run kept this picture
        ("000000001", "ok", 0.40, E2, "b"),  # the earlier run had it but dropped it: new here
        ("000000002", "http_404", None, None, None),
    ])
    _write(out, "00001", [
        ("000010000", "ok", 0.10, E3, "c"),  # below the clip_score threshold
        ("000010001", "ok", 0.50, E3_NEAR, "d"),
        ("000010002", "ok", 0.45, E4, "e"),
        ("000010003", "ok", 0.30, E4, "e"),  # same bytes as 000010002
    ])
    cfg = JobConfig(
        input="unused.parquet",
        output=str(tmp_path / "run"),
        moderate=ModerateConfig(enabled=False),
        filter=FilterConfig(clip_score_threshold=0.2),
        dedup=DedupConfig(threshold=0.95, against=str(tmp_path / "prev")),
    ).resolved()
    return cfg, out


def test_decisions_are_written_into_the_files(runs) -> None:
    cfg, out = runs
    decided, rewritten = global_pass(cfg, ["00000", "00001"], lambda line: None)
    assert rewritten == 2
    table = pq.read_table(out)
    got = dict(zip(table[S.KEY].to_pylist(), table[S.DROP_REASON].to_pylist(), strict=True))
    assert got == {
        "000000000": f"dedup:previous_run(cos>=0.95 or sha256; {SHORT})",
        "000000001": None,
        "000000002": "status:http_404",
        "000010000": f"clip_score<0.2 ({SHORT})",
        "000010001": None,
        "000010002": None,
        "000010003": "dedup:exact(sha256)",
    }
    assert table[S.KEEP].to_pylist() == [False, True, False, False, True, True, False]
    assert table[S.DUPLICATE_OF].to_pylist()[0] == "000000000"  # the earlier run's key
    assert table[S.DUPLICATE_OF].to_pylist()[6] == "000010002"
    # The embeddings survive the rewrite untouched.
    emb = np.array(table.filter(pa.compute.is_valid(table[S.IMAGE_EMBEDDING]))[S.IMAGE_EMBEDDING].to_pylist())
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-3)
    assert decided.num_rows == 7


def test_a_second_pass_rewrites_nothing(runs) -> None:
    cfg, out = runs
    global_pass(cfg, ["00000", "00001"], lambda line: None)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    _, rewritten = global_pass(cfg, ["00000", "00001"], lambda line: None)
    assert rewritten == 0
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps


def test_changed_filters_rewrite_only_the_decisions(runs) -> None:
    from dataclasses import replace

    cfg, out = runs
    global_pass(cfg, ["00000", "00001"], lambda line: None)
    before = pq.read_table(out)
    looser = replace(cfg, filter=FilterConfig(clip_score_threshold=None))
    _, rewritten = global_pass(looser, ["00000", "00001"], lambda line: None)
    assert rewritten == 1  # only shard 00001 held a clip_score drop
    after = pq.read_table(out)
    # Without the clip filter, 000010000 takes part in the dedup and turns out to be a near
    # duplicate of the better-scored 000010001.
    assert after[S.DROP_REASON][3].as_py() == f"dedup:semantic(cos>=0.95; {SHORT})"
    assert after[S.DUPLICATE_OF][3].as_py() == "000010001"
    assert after[S.IMAGE_EMBEDDING].equals(before[S.IMAGE_EMBEDDING])


def test_read_previous_accepts_an_output_root_or_its_embeddings_folder(runs, tmp_path) -> None:
    cfg, _ = runs
    for where in (tmp_path / "prev", tmp_path / "prev" / "embeddings"):
        prev = read_previous(str(where), cfg.storage)
        assert prev[S.KEY].to_pylist() == ["000000000"]  # only the row the earlier run kept
    with pytest.raises(ConfigError, match="dedup.against: no Parquet files"):
        read_previous(str(tmp_path / "nothing-here"), cfg.storage)


def _dedup_main():
    import importlib.util

    spec = importlib.util.spec_from_file_location("jobs_dedup", REPO / "jobs" / "dedup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_jobs_dedup_redecides_a_finished_output(runs, tmp_path, capsys) -> None:
    from pipeline import job_config as J

    cfg, out = runs
    root = tmp_path / "run"
    (root / "config.yaml").write_text(J.to_yaml(cfg))
    main = _dedup_main()
    assert main(["--output", str(root)]) == 0
    printed = capsys.readouterr().out
    assert "rows: 7 total, 0 this run, 3 kept, 4 dropped" in printed
    # The global pass reports dedup's phases as it goes.
    assert re.search(r"dedup: \d+ rows, \d+ distinct images by sha256", printed), printed
    assert re.search(r"dedup: \d+ semantic duplicates at cosine >= 0.95 in 1 clusters, [\d.]+ s", printed), printed
    assert (root / "report.html").exists() and (root / "_stats.json").exists()
    # Without the clip filter and with a cosine above the near twins' 0.9988, both are kept.
    assert main(["--output", str(root), "--clip-score-threshold", "null", "--dedup-threshold", "0.999"]) == 0
    table = pq.read_table(out)
    assert table[S.DROP_REASON][3].as_py() is None
    assert J.from_yaml_text((root / "config.yaml").read_text()).dedup.threshold == 0.999
    # Settings that shaped the stored rows cannot change here.
    assert main(["--output", str(root), "--set", "decode.image_size=32"]) == 2
    assert "decode.image_size: " in capsys.readouterr().err
