"""The job with the bundled multilingual model (ResNet + BERT towers) on Chinese and English
captions of the same images, and clip_model.train reading the shards that job wrote.

One job run (local Ray, local output, the loopback image server) over a URL list that holds a
fresh world twice: captioned in English and in Chinese (same images, same mismatched rows).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from testkit.http_server import FaultServer
from testkit.synthetic import generate_world

pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[2]
# Not a training seed (training scenes are seeded "multi-<seed>-<step>").
WORLD_SEED = 616
ROWS = 160


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    from clip_model.pretrained import get_pretrained_entry

    threshold = get_pretrained_entry("multilingual-synthetic", "synthetic").defaults.clip_score_threshold
    tmp = tmp_path_factory.mktemp("multilingual-job")
    root = tmp / "world"
    knobs = dict(mismatch_rate=0.3, exact_dup_rate=0.0, near_dup_rate=0.0, unsafe_rate=0.1,
                 min_side=64, max_side=160)  # fmt: skip
    with FaultServer(root) as srv:
        tables = [
            generate_world(root, ROWS, WORLD_SEED, srv.base_url + "/", languages=lang, **knobs)
            for lang in ("en", "zh")
        ]
        urls = root / "both.parquet"
        pq.write_table(pa.concat_tables(tables), urls)
        out = tmp / "out"
        proc = subprocess.run(
            [sys.executable, "jobs/embed_laion.py", "--input", str(urls), "--output", str(out),
             "--allowed-networks", "127.0.0.1/32", "--model", "multilingual-synthetic",
             "--pretrained", "synthetic", "--number-sample-per-shard", "100", "--image-size", "96",
             "--resize-mode", "center_crop", "--clip-score-threshold", str(threshold),
             "--dedup-threshold", "1.0", "--set", "moderate.enabled=false",
             "--set", "read.save_additional_columns=_gt_row,_gt_language,_gt_caption_matches"],
            cwd=REPO, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = pads.dataset(out / "embeddings", format="parquet").to_table()
    return {"out": out, "table": table, "threshold": threshold}


def test_chinese_captions_are_filtered_with_the_recall_of_english(job):
    rows = job["table"].to_pylist()
    assert len(rows) == 2 * ROWS and {r["status"] for r in rows} == {"ok"}
    assert all(r["model"].startswith("multilingual-synthetic@sha256:") for r in rows)
    stats = {}
    for lang in ("en", "zh"):
        mine = [r for r in rows if r["_gt_language"] == lang]
        bad = [r for r in mine if not r["_gt_caption_matches"]]
        good = [r for r in mine if r["_gt_caption_matches"]]
        # The clip_score filter comes before dedup in the decisions (the two copies of each image,
        # one per language, are exact duplicates of each other; dedup keeps one of them).
        by_score = [r for r in mine if not r["keep"] and r["drop_reason"].startswith("clip_score<")]
        dropped = [r for r in by_score if not r["_gt_caption_matches"]]
        wrongly = [r for r in by_score if r["_gt_caption_matches"]]
        stats[lang] = (len(dropped) / len(bad), len(wrongly) / len(good), len(bad))
    print(f"(mismatch recall, matched dropped, mismatched) by caption language: {stats}")
    (rec_en, fp_en, n_en), (rec_zh, fp_zh, n_zh) = stats["en"], stats["zh"]
    assert n_en == n_zh >= 40  # the same mismatched rows in both languages
    assert rec_en >= 0.9 and rec_zh >= 0.9, stats
    assert abs(rec_en - rec_zh) <= 0.05, stats
    assert fp_en <= 0.1 and fp_zh <= 0.1, stats


def test_trainer_reads_the_jobs_shards_keeps_only_kept_rows_and_resumes(job, tmp_path):
    """clip_model.train --data on the job's output: only rows marked keep, loss falling for the
    ResNet + BERT towers, and the same command again resumes from its last checkpoint."""
    kept = sum(bool(r["keep"]) for r in job["table"].to_pylist())
    out = tmp_path / "towers.safetensors"
    cmd = [sys.executable, "-m", "clip_model.train", "--recipe", "towers-small", "--data",
           str(job["out"]), "--steps", "60", "--batch-size", "32", "--log-every", "10",
           "--checkpoint-every", "30", "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, check=True)
    log = proc.stderr
    assert f"training on {kept} (kept)" in log and 0 < kept < 2 * ROWS, log
    losses = [float(x) for x in re.findall(r"step \d+/60 loss ([0-9.]+)", log)]
    assert len(losses) == 7, log
    assert losses[-1] < losses[0] - 0.3, losses

    import clip_model

    model, _ = clip_model.create_model(str(out), device="cpu")  # the file alone loads back
    assert type(model).__name__ == "TowerCLIP" and model.embed_dim == 128
    assert model.visual.trunk.pool_stages  # towers-small's max-pool downsampling, from the header
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, check=True)
    assert "resumed from" in again.stderr and "at step 60/60" in again.stderr
