"""Calibrate a model's own defaults from the job's embeddings of a labelled synthetic world, and
check them on a second world.

For each of two worlds (calibration, then validation), the real job (``jobs/embed_laion.py``,
local Ray, loopback image server) embeds the world with the model, filters off so every row is
scored. From the calibration world's output:

- clip_score threshold: 95 % of mismatched captions below it (testkit.evaluate_model's rule);
- hazard concept (image side): ``python -m pipeline.calibrate`` at target recall 0.95 with the
  prompts of the tests' hazard concept;
- the same concept by plain cosine (no neutral-prompt margin): AUC and the 95 %-recall threshold;
- dedup: cosine of near-duplicate pairs and of the closest pair of different scenes.

Then the same numbers are measured on the validation world (recall, false drops).

    .venv/bin/python bench/calibrate_model_defaults.py --model multilingual-synthetic --pretrained synthetic --languages en=1,zh=1,ru=1,hi=1 --work /tmp/cal --append bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import yaml

REPO = Path(__file__).resolve().parents[1]
# The repository root: this checkout's packages and the test rig (testkit is not installed).
sys.path.insert(0, str(REPO))
MACHINE = "2-core CI box, CPU, shared with other agents' work"
HAZARD = "hazard=a hazard sign|a warning sign|a danger sign"
WORLD = dict(mismatch_rate=0.3, exact_dup_rate=0.0, near_dup_rate=0.1, unsafe_rate=0.2,
             min_side=96, max_side=320)  # fmt: skip


def run_job(
    work: Path, name: str, seed: int, rows: int, model: str, pretrained: str, languages, reuse: bool
) -> Path:
    from testkit.http_server import FaultServer
    from testkit.synthetic import generate_world

    root = work / name
    if reuse and (root / "out" / "_stats.json").is_file():
        return root / "out"
    with FaultServer(root) as srv:
        table = generate_world(root, rows, seed, srv.base_url + "/", languages=languages, **WORLD)
        pq.write_table(table, root / "urls.parquet")
        cols = "_gt_row,_gt_caption_matches,_gt_unsafe,_gt_duplicate_kind,_gt_duplicate_of,_gt_description"
        cmd = [sys.executable, "jobs/embed_laion.py", "--input", str(root / "urls.parquet"),
               "--output", str(root / "out"), "--allowed-networks", "127.0.0.1/32",
               "--model", model, "--pretrained", pretrained, "--image-size", "128",
               "--resize-mode", "center_crop", "--dedup-threshold", "1.0",
               "--set", "moderate.enabled=false", "--set", f"read.save_additional_columns={cols}"]  # fmt: skip
        with open(root / "job.log", "w") as f:
            subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, check=True)
    return root / "out"


def _rows(out: Path) -> list[dict]:
    return [r for r in pads.dataset(out / "embeddings", format="parquet").to_table().to_pylist() if r["status"] == "ok"]


def _unit(rows: list[dict], col: str) -> np.ndarray:
    x = np.array([r[col] for r in rows], np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def dedup_stats(rows: list[dict]) -> dict:
    img = _unit(rows, "image_embedding")
    by_row = {r["_gt_row"]: i for i, r in enumerate(rows)}
    near = [(i, by_row[r["_gt_duplicate_of"]]) for i, r in enumerate(rows)
            if r["_gt_duplicate_kind"] == "near" and r["_gt_duplicate_of"] in by_row]  # fmt: skip
    pos = np.array([float(img[i] @ img[j]) for i, j in near])
    desc = np.array([r["_gt_description"] for r in rows])
    sim = img @ img.T
    orig = np.array([r["_gt_duplicate_kind"] == "" for r in rows])
    differ = (desc[:, None] != desc[None, :]) & orig[:, None] & orig[None, :]
    neg_max = float(sim[differ].max())
    return {"near_pairs": len(pos), "near_cos_p05": float(np.quantile(pos, 0.05)),
            "near_cos_min": float(pos.min()), "different_scenes_cos_max": neg_max,
            "near_recall_above_max_different": float((pos > neg_max).mean())}  # fmt: skip


def concept_cosine(out: Path, model: str, pretrained: str, threshold: float | None = None) -> dict:
    """The hazard concept scored by plain cosine (its prompts' mean direction), without the
    job's neutral-prompt margin: AUC, and the threshold at 95 % recall (or ``threshold``'s
    recall and false-positive rate)."""
    import torch

    import clip_model
    from testkit.evaluate_model import roc_auc

    rows = _rows(out)
    img = _unit(rows, "image_embedding")
    unsafe = np.array([r["_gt_unsafe"] for r in rows])
    m, _ = clip_model.create_model(model, pretrained, device="cpu")
    prompts = HAZARD.split("=", 1)[1].split("|")
    with torch.inference_mode():
        e = torch.nn.functional.normalize(m.encode_text(m.tokenizer(prompts)).float(), dim=-1).numpy()
    direction = e.mean(0) / np.linalg.norm(e.mean(0))
    s = img @ direction
    if threshold is None:
        pos = np.sort(s[unsafe])
        threshold = float(np.floor(pos[int(np.floor(0.05 * len(pos)))] * 1000) / 1000)
    return {"auc": roc_auc(s, unsafe), "threshold": threshold,
            "recall": float((s[unsafe] >= threshold).mean()),
            "false_positive_rate": float((s[~unsafe] >= threshold).mean())}  # fmt: skip


def calibrate(out: Path, model: str, pretrained: str) -> dict:
    from testkit.evaluate_model import clip_score_threshold

    rows = _rows(out)
    scores = np.array([r["clip_score"] for r in rows])
    matched = np.array([r["_gt_caption_matches"] for r in rows])
    clip = clip_score_threshold(scores, matched, 0.95)
    thresholds = out.parent / "thresholds.yaml"
    subprocess.run(
        [sys.executable, "-m", "pipeline.calibrate", "--input", str(out / "embeddings"),
         "--model", model, "--pretrained", pretrained, "--concept", HAZARD,
         "--label_col", "_gt_unsafe", "--target_recall", "0.95", "--out", str(thresholds)],
        cwd=REPO, check=True, capture_output=True, text=True,
    )  # fmt: skip
    doc = yaml.safe_load(thresholds.read_text())
    return {"clip_score": clip, "moderation": doc, "hazard_cosine": concept_cosine(out, model, pretrained),
            "dedup": dedup_stats(rows)}  # fmt: skip


def validate(out: Path, cal: dict, model: str, pretrained: str) -> dict:
    rows = _rows(out)
    t = cal["clip_score"]["threshold"]
    bad = [r for r in rows if not r["_gt_caption_matches"]]
    good = [r for r in rows if r["_gt_caption_matches"]]
    return {
        "clip_score_mismatch_recall": sum(r["clip_score"] < t for r in bad) / len(bad),
        "clip_score_matched_dropped": sum(r["clip_score"] < t for r in good) / len(good),
        "hazard_cosine": concept_cosine(out, model, pretrained, cal["hazard_cosine"]["threshold"]),
        "dedup": dedup_stats(rows),
    }


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--pretrained", required=True)
    p.add_argument("--languages", default=None, help="e.g. en=1,zh=1,ru=1,hi=1")
    p.add_argument("--rows", type=int, default=800)
    p.add_argument("--seeds", type=int, nargs=2, default=(5151, 6262), help="calibration, validation")
    p.add_argument("--work", required=True)
    p.add_argument("--append")
    p.add_argument("--reuse", action="store_true", help="keep job outputs already in --work")
    a = p.parse_args(argv)
    languages = None
    if a.languages:
        languages = {k: float(v) for k, _, v in (x.partition("=") for x in a.languages.split(","))}
    work = Path(a.work)
    cal_out = run_job(work, "calibration", a.seeds[0], a.rows, a.model, a.pretrained, languages, a.reuse)
    cal = calibrate(cal_out, a.model, a.pretrained)
    val_out = run_job(work, "validation", a.seeds[1], a.rows, a.model, a.pretrained, languages, a.reuse)
    val = validate(val_out, cal, a.model, a.pretrained)
    result = {"calibration": cal, "validation": val}
    print(json.dumps(result, indent=2, default=str))
    if a.append:
        when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        with open(a.append, "a") as f:
            f.write(
                f"\n## Calibrated defaults of {a.model} ({when})\n\nMachine: {MACHINE}. Command: "
                f"`python bench/calibrate_model_defaults.py {shlex.join(argv)}`.\n\n```json\n"
                + json.dumps(result, indent=2, default=str) + "\n```\n"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
