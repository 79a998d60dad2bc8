"""Calibrate the bundled tiny model's defaults (moderation, clip_score) on fresh synthetic worlds.

The numbers the registry entry of ``tiny-synthetic`` carries (clip_model/pretrained.py) come
from this script: for each seed it generates a world the way the job sees one by default
(256-1024 px images, 5 % hazard scenes, 10 % mismatched captions), decodes it as the job does
under each ``--resize-mode`` (``border``, the job's default today; ``center_crop``, what the
model sees once decode makes its input from the original pixels), embeds it with the job's
stages, and reports

* the hazard concept's image and caption margins (pipeline/stages/moderate.py) for rows that
  show the hazard sign and rows that do not, and what given thresholds flag (recall on the
  hazard ground truth, false-positive rate on the other rows);
* clip_score of matching and mismatched captions, and what a given threshold drops of each.

    python -m testkit.calibrate_tiny --seeds 31 32 --rows 600 --image-threshold 0.05 \\
        --caption-threshold 0.1 --clip-threshold 0.3

Runs on the CPU in a few minutes; no Ray, no network.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline import schema as S
from pipeline.config import DecodeConfig
from pipeline.schema import embedding_matrix
from pipeline.stages.embed import load_model
from pipeline.stages.moderate import concept_directions, embed_prompts, margins
from testkit.embedding import embed_images
from testkit.synthetic import generate_world

HAZARD = {"hazard": ("a hazard sign", "a warning sign", "a danger sign")}
NEUTRAL = ("a photo", "an image", "a picture")


def embedded_world(seed: int, rows: int, resize_mode: str, image_size: int = 256) -> tuple[pa.Table, pa.Table]:
    """(ground truth, embedded rows) of a fresh world decoded like the job's default."""
    with tempfile.TemporaryDirectory() as tmp:
        gt = generate_world(Path(tmp), rows, seed, "http://127.0.0.1/")
        images = [(Path(tmp) / p).read_bytes() for p in gt.column("_gt_path").to_pylist()]
    out = embed_images(images, gt.column("caption").to_pylist(), "tiny-synthetic", "synthetic",
                       DecodeConfig(image_size=image_size, resize_mode=resize_mode))
    return gt, out


def _pct(x: np.ndarray, qs: tuple[float, ...] = (0, 5, 50, 95, 100)) -> str:
    if not len(x):
        return "-"
    return " ".join(f"{np.percentile(x, q):+.3f}" for q in qs)


def report(seed: int, rows: int, mode: str, a: argparse.Namespace, model: object) -> dict:
    gt, out = embedded_world(seed, rows, mode)
    ok = np.array([s == S.OK for s in out.column(S.STATUS).to_pylist()])
    directions = concept_directions(model, HAZARD)
    neutral = embed_prompts(model, list(NEUTRAL))
    dim = directions.shape[1]
    img, img_ok = embedding_matrix(out.column(S.IMAGE_EMBEDDING), dim)
    txt, txt_ok = embedding_matrix(out.column(S.TEXT_EMBEDDING), dim)
    m_img = margins(img, directions, neutral)[:, 0]
    m_txt = margins(txt, directions, neutral)[:, 0]
    unsafe = np.array(gt.column("_gt_unsafe").to_pylist()) & ok
    safe = ~np.array(gt.column("_gt_unsafe").to_pylist()) & ok
    flagged = (img_ok & (m_img > a.image_threshold)) | (txt_ok & (m_txt > a.caption_threshold))
    match = np.array(gt.column("_gt_caption_matches").to_pylist()) & ok
    clip = np.array([np.nan if v is None else v for v in out.column(S.CLIP_SCORE).to_pylist()], float)
    res = {
        "seed": seed, "mode": mode, "ok": int(ok.sum()), "unsafe": int(unsafe.sum()),
        "img_pos": _pct(m_img[unsafe]), "img_neg": _pct(m_img[safe]),
        "txt_pos": _pct(m_txt[unsafe]), "txt_neg": _pct(m_txt[safe]),
        "recall": float(flagged[unsafe].mean()) if unsafe.any() else float("nan"),
        "fpr": float(flagged[safe].mean()),
        "clip_match": _pct(clip[match]), "clip_mismatch": _pct(clip[~match & ok]),
        "clip_drop_match": float((clip[match] < a.clip_threshold).mean()),
        "clip_drop_mismatch": float((clip[~match & ok] < a.clip_threshold).mean()),
    }
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m testkit.calibrate_tiny", description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[31, 32])
    p.add_argument("--rows", type=int, default=600)
    p.add_argument("--modes", nargs="+", default=["border", "center_crop"])
    p.add_argument("--image-threshold", type=float, default=0.05)
    p.add_argument("--caption-threshold", type=float, default=0.1)
    p.add_argument("--clip-threshold", type=float, default=0.3)
    a = p.parse_args(argv)
    model, _ = load_model("tiny-synthetic", "synthetic")
    print("margins as percentiles 0/5/50/95/100; recall and fpr on the image's hazard ground truth")
    for seed in a.seeds:
        for mode in a.modes:
            r = report(seed, a.rows, mode, a, model)
            print(f"seed {seed} {mode:<11} ok {r['ok']} unsafe {r['unsafe']}: recall {r['recall']:.3f} "
                  f"fpr {r['fpr']:.4f}; clip<{a.clip_threshold:g} drops {r['clip_drop_match']:.3f} of matching, "
                  f"{r['clip_drop_mismatch']:.3f} of mismatched")
            for k in ("img_pos", "img_neg", "txt_pos", "txt_neg", "clip_match", "clip_mismatch"):
                print(f"    {k:<14} {r[k]}")
            sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
