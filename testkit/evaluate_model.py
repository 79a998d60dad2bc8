"""Score a CLIP model on a freshly generated synthetic world.

    python -m testkit.evaluate_model --model tiny-synthetic --rows 400 --seed 12345

prints one JSON object:

- ``shape_acc`` / ``color_acc``: zero-shot accuracy on the shape / colour of single-group scenes
  (colour: grayscale files excluded, they carry no colour). The prompts are every way the world's
  captions name one object group, without position: count word x optional size word x colour x
  shape ("two small red stars", "an orange circle", 810 prompts); a class's score is the
  log-sum-exp of the model's logits (cosine x its learned logit scale) over its prompts, i.e.
  prompts are ensembled in probability space, so count, size and the other attribute are
  marginalised out instead of being fixed or averaged away.
- ``shape_acc_mean_prompt`` / ``color_acc_mean_prompt``: the same accuracies with one prompt per
  class, the mean of the normalised embeddings of "a {colour} {shape}" over the other attribute
  (the protocol of earlier model cards). It asks a group of two small stars whether it looks like
  "a star", which penalises a model for reading the count.
- ``match_auc``: ROC AUC of clip_score = cos(image, caption), matched vs mismatched captions
  (original rows, grayscale excluded: their matched captions name colours the file lacks).
- ``hazard_auc``: ROC AUC of cos(image, "a hazard sign") for hazard scenes vs the rest, from the
  image alone; ``hazard_auc_unmentioned`` the same with only hazard scenes whose caption does not
  mention the hazard as positives.
- ``neardup_auc``: ROC AUC of image-embedding cosine, (near duplicate, its source) pairs vs all
  pairs of original rows with different descriptions.
- ``shape_acc_by_group``: ``shape_acc`` split by the group's count and size ("1 large", "3
  small", ...), where a model still mixes shapes up (small groups of two or three are hardest).
- ``match_auc_by_language`` (worlds with ``--languages``): ``match_auc`` over each caption
  language's rows.

    python -m testkit.evaluate_model --model multilingual-synthetic --rows 800 --seed 4242 --languages en=1,zh=1,ru=1,hi=1
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from .synthetic import (
    COLORS,
    COUNT_WORDS,
    HAZARD_PROMPT,
    SHAPES,
    SIZES,
    ObjectGroup,
    decode_display,
    generate_world,
    group_phrase,
)

# World knobs for evaluation: more of each rare case than the default world, so a few hundred
# rows give every metric enough positives (~60 near duplicates, hazards and mismatches each at
# 400 rows). Exact duplicates are left out: identical bytes embed identically by construction.
EVAL_KNOBS: dict = dict(
    mismatch_rate=0.3,
    exact_dup_rate=0.0,
    near_dup_rate=0.15,
    unsafe_rate=0.2,
    hazard_caption_rate=0.5,
    min_side=96,
    max_side=512,
)


_COUNT_OF = {"a": 1, "an": 1, "two": 2, "three": 3}


def roc_auc(scores: Sequence[float] | np.ndarray, labels: Sequence[bool] | np.ndarray) -> float:
    """Area under the ROC curve: P(score of a random positive > score of a random negative),
    ties counted as 1/2 (the Mann-Whitney U statistic divided by n_pos * n_neg).

    scores: [N] floats; labels: [N] booleans. Raises ValueError without both classes.
    Computed from average ranks (ties share the mean of their ranks), in float64.
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels, dtype=bool).ravel()
    if s.shape != y.shape:
        raise ValueError(f"scores and labels differ in length: {s.shape[0]} vs {y.shape[0]}")
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"ROC AUC needs positives and negatives, got {n_pos} and {n_neg}")
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    ranks = np.empty(s.size, dtype=np.float64)
    # Runs of equal scores get the mean of the 1-based ranks they span.
    boundaries = np.flatnonzero(np.diff(sorted_s)) + 1
    starts = np.concatenate(([0], boundaries))
    ends = np.concatenate((boundaries, [s.size]))
    for a, b in zip(starts, ends, strict=True):
        ranks[order[a:b]] = (a + 1 + b) / 2
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def _embed_texts(model, tokenize, texts: list[str], batch: int = 256) -> torch.Tensor:
    out = []
    for i in range(0, len(texts), batch):
        out.append(model.encode_text(tokenize(texts[i : i + batch]), normalize=True).float())
    return torch.cat(out) if out else torch.empty(0)


def _class_prompts(
    model, tokenize, classes: Sequence[str], other: Sequence[str], key
) -> torch.Tensor:
    """[len(classes), D] unit vectors: mean embedding of the prompts for each class."""
    rows = []
    for c in classes:
        texts = [key(c, o) for o in other]
        e = _embed_texts(model, tokenize, texts).mean(0)
        rows.append(e / e.norm())
    return torch.stack(rows)


def group_prompts() -> list[tuple[str, str, str]]:
    """(text, shape, colour) for every way a caption names one object group, position left out:
    each count's count words x (no size, each size) x colour x shape."""
    out = []
    for shape in SHAPES:
        for color in COLORS:
            for count, words in COUNT_WORDS.items():
                for word in words:
                    for size in (None, *SIZES):
                        g = ObjectGroup(shape, color, count, size or SIZES[0], "center")
                        out.append((group_phrase(g, word, size is not None, False), shape, color))
    return out


def zero_shot_predict(
    logits: torch.Tensor, prompt_class: Sequence[int], n_classes: int
) -> np.ndarray:
    """Class per image from prompt logits, prompts ensembled in probability space.

    logits: [N, P] float (cosine x logit scale); prompt_class: [P] class index of each prompt.
    Returns [N] int64: argmax over classes of log-sum-exp of the class's prompt logits, which is
    the argmax of the class's total probability under one softmax over all prompts.
    """
    label = torch.as_tensor(list(prompt_class))
    scores = torch.stack(
        [torch.logsumexp(logits[:, label == c], dim=1) for c in range(n_classes)], dim=1
    )
    return scores.argmax(1).numpy()


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def evaluate_world(
    model: torch.nn.Module,
    preprocess: Callable,
    tokenize: Callable[[list[str]], torch.Tensor],
    table: pa.Table,
    root: str | Path,
    *,
    batch: int = 128,
) -> dict:
    """Compute the metrics (see the module docstring) for a world already written under root.

    preprocess: PIL image -> float tensor [3, S, S]; tokenize: list of str -> int64 [N, L].
    """
    rows = table.to_pylist()
    root = Path(root)
    feats = []
    with torch.inference_mode():
        for i in range(0, len(rows), batch):
            chunk = rows[i : i + batch]
            images = torch.stack(
                [preprocess(decode_display((root / r["_gt_path"]).read_bytes())) for r in chunk]
            )
            feats.append(model.encode_image(images, normalize=True).float())
        img = torch.cat(feats)
        cap = _embed_texts(model, tokenize, [r["caption"] for r in rows])
        shape_cls = _class_prompts(
            model, tokenize, SHAPES, list(COLORS), lambda s, c: f"{_article(c)} {c} {s}"
        )
        color_cls = _class_prompts(
            model, tokenize, list(COLORS), SHAPES, lambda c, s: f"{_article(c)} {c} {s}"
        )
        hazard = _embed_texts(model, tokenize, [HAZARD_PROMPT])[0]
        prompts = group_prompts()
        prompt_emb = _embed_texts(model, tokenize, [p[0] for p in prompts])
        scale = getattr(model, "logit_scale", None)
        # CLIP training clamps the scale at 100; a model without one gets that value.
        scale = min(float(scale.detach().exp()), 100.0) if scale is not None else 100.0
        prompt_logits = scale * (img @ prompt_emb.T)

    orig = np.array([r["_gt_duplicate_kind"] == "" for r in rows])
    gray = np.array([r["_gt_format"] == "grayscale" for r in rows])
    single = np.array([r["_gt_num_groups"] == 1 for r in rows]) & orig
    shape_pred = zero_shot_predict(
        prompt_logits, [SHAPES.index(p[1]) for p in prompts], len(SHAPES)
    )
    color_pred = zero_shot_predict(
        prompt_logits, [list(COLORS).index(p[2]) for p in prompts], len(COLORS)
    )
    shape_pred_mean = (img @ shape_cls.T).argmax(1).numpy()
    color_pred_mean = (img @ color_cls.T).argmax(1).numpy()
    shape_true = np.array([SHAPES.index(r["_gt_shape"]) for r in rows])
    color_true = np.array([list(COLORS).index(r["_gt_color"]) for r in rows])
    color_rows = single & ~gray
    # describe() starts with the count word, then the size: "two small red stars ...".
    group_kind = np.array(
        [
            f"{_COUNT_OF[r['_gt_description'].split()[0]]} {r['_gt_description'].split()[1]}"
            for r in rows
        ]
    )
    by_group = {
        kind: float((shape_pred[sel] == shape_true[sel]).mean())
        for kind in sorted(set(group_kind[single]))
        for sel in [single & (group_kind == kind)]
    }

    clip_score = (img * cap).sum(1).numpy()
    matched = np.array([r["_gt_caption_matches"] for r in rows])
    match_rows = orig & ~gray
    scores = {
        "clip_score": clip_score[match_rows], "matched": matched[match_rows],
        # per item, in world order, for paired comparisons of two models (paired_sign_test)
        "shape_correct": shape_pred[single] == shape_true[single],
        "color_correct": color_pred[color_rows] == color_true[color_rows],
    }  # fmt: skip
    by_language = {}
    if rows and "_gt_language" in rows[0]:
        lang = np.array([r["_gt_language"] for r in rows])
        for code in sorted(set(lang)):
            sel = match_rows & (lang == code)
            by_language[code] = roc_auc(clip_score[sel], matched[sel])

    hazard_score = (img @ hazard).numpy()
    unsafe = np.array([r["_gt_unsafe"] for r in rows])
    mentioned = np.array([r["_gt_hazard_in_caption"] for r in rows])
    unmentioned_rows = orig & (~unsafe | ~mentioned)

    sim = (img @ img.T).numpy()
    near = [
        (i, r["_gt_duplicate_of"]) for i, r in enumerate(rows) if r["_gt_duplicate_kind"] == "near"
    ]
    pos = [sim[i, j] for i, j in near]
    orig_idx = np.flatnonzero(orig)
    desc = [rows[i]["_gt_description"] for i in orig_idx]
    neg = [
        sim[orig_idx[a], orig_idx[b]]
        for a in range(len(orig_idx))
        for b in range(a + 1, len(orig_idx))
        if desc[a] != desc[b]
    ]
    return {
        "shape_acc": float((shape_pred[single] == shape_true[single]).mean()),
        "color_acc": float((color_pred[color_rows] == color_true[color_rows]).mean()),
        "shape_acc_mean_prompt": float((shape_pred_mean[single] == shape_true[single]).mean()),
        "color_acc_mean_prompt": float(
            (color_pred_mean[color_rows] == color_true[color_rows]).mean()
        ),
        "match_auc": roc_auc(clip_score[match_rows], matched[match_rows]),
        "hazard_auc": roc_auc(hazard_score[orig], unsafe[orig]),
        "hazard_auc_unmentioned": roc_auc(hazard_score[unmentioned_rows], unsafe[unmentioned_rows]),
        "neardup_auc": roc_auc(pos + neg, [True] * len(pos) + [False] * len(neg)),
        "shape_acc_by_group": by_group,
        **({"match_auc_by_language": by_language} if by_language else {}),
        "_scores": scores,
        "counts": {
            "rows": len(rows),
            "single_group": int(single.sum()),
            "single_group_by_group": {
                kind: int((single & (group_kind == kind)).sum()) for kind in by_group
            },
            "mismatched": int((~matched & match_rows).sum()),
            "hazard": int((unsafe & orig).sum()),
            "hazard_unmentioned": int((unsafe & unmentioned_rows).sum()),
            "near_dup_pairs": len(pos),
            "different_pairs": len(neg),
        },
    }


def paired_sign_test(a_correct: Sequence[bool] | np.ndarray, b_correct: Sequence[bool] | np.ndarray) -> dict:
    """Exact McNemar test of two classifiers scored on the same items.

    a_correct, b_correct: per-item correctness (same items, same order).
    Returns ``b_only`` (items b gets right and a wrong), ``a_only`` and ``p``: the two-sided
    exact binomial p-value of the discordant items under "a and b are equally accurate"
    (1.0 when there are none).
    """
    a, b = np.asarray(a_correct, dtype=bool), np.asarray(b_correct, dtype=bool)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"need two equal-length 1-D arrays, got {a.shape} and {b.shape}")
    b_only, a_only = int((b & ~a).sum()), int((a & ~b).sum())
    n = b_only + a_only
    tail = sum(math.comb(n, k) for k in range(min(b_only, a_only) + 1)) / 2**n
    return {"b_only": b_only, "a_only": a_only, "p": min(1.0, 2 * tail)}


def evaluate(
    model: torch.nn.Module,
    preprocess: Callable,
    tokenize: Callable[[list[str]], torch.Tensor],
    *,
    rows: int,
    seed: int,
    workdir: str | Path | None = None,
    languages: dict[str, float] | str | None = None,
) -> dict:
    """Generate a world of ``rows`` rows from ``seed`` (with :data:`EVAL_KNOBS`, captions in
    ``languages``) in ``workdir`` (a temporary folder by default) and return
    :func:`evaluate_world`'s metrics."""
    with tempfile.TemporaryDirectory(prefix="clipcurate-eval-") as tmp:
        root = Path(workdir) if workdir is not None else Path(tmp)
        table = generate_world(root, rows, seed, "http://127.0.0.1/", languages=languages, **EVAL_KNOBS)
        model.eval()
        return evaluate_world(model, preprocess, tokenize, table, root)


def clip_score_threshold(
    scores: np.ndarray, matched: np.ndarray, target_recall: float = 0.95
) -> dict:
    """The clip_score below which a caption counts as a mismatch, chosen so that
    ``target_recall`` of the mismatched captions fall below it: the smallest score above the
    ``target_recall`` quantile of mismatched scores. Returns the threshold (rounded up to 3
    decimals), the recall it reaches and the share of matched captions it would drop."""
    s = np.asarray(scores, np.float64)
    m = np.asarray(matched, bool)
    bad = np.sort(s[~m])
    if bad.size == 0 or m.sum() == 0:
        raise ValueError("calibration needs matched and mismatched captions")
    k = min(bad.size - 1, int(np.ceil(target_recall * bad.size)) - 1)
    threshold = float(np.ceil((bad[k] + 1e-9) * 1000) / 1000)
    return {
        "threshold": threshold,
        "mismatch_recall": float((bad < threshold).mean()),
        "matched_dropped": float((s[m] < threshold).mean()),
        "mismatched": int(bad.size),
        "matched": int(m.sum()),
    }


def main(argv: Sequence[str] | None = None) -> int:
    import clip_model

    p = argparse.ArgumentParser(
        prog="python -m testkit.evaluate_model",
        description="Score a CLIP model on a fresh synthetic world; prints one JSON object.",
    )
    p.add_argument("--model", required=True, help="architecture, e.g. tiny-synthetic")
    p.add_argument("--pretrained", help="weights tag or path (tiny-synthetic: 'synthetic')")
    p.add_argument("--rows", type=int, default=400)
    p.add_argument("--seed", type=int, default=12345)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--calibrate", action="store_true",
                   help="also report the clip_score threshold reaching --target-recall of mismatches")
    p.add_argument("--target-recall", type=float, default=0.95)
    p.add_argument("--languages", default=None,
                   help="caption languages of the world, e.g. 'en=1,zh=1,ru=1,hi=1' (default English)")  # fmt: skip
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    pretrained = a.pretrained
    if pretrained is None and a.model in ("tiny-synthetic", "multilingual-synthetic"):
        pretrained = "synthetic"
    languages = None
    if a.languages:
        languages = {k: float(v) for k, _, v in (x.partition("=") for x in a.languages.split(","))}
    start = time.perf_counter()
    model, preprocess = clip_model.create_model_and_transforms(a.model, pretrained=pretrained)
    metrics = evaluate(
        model, preprocess, model.tokenizer, rows=a.rows, seed=a.seed, languages=languages
    )
    scores = metrics.pop("_scores")
    if a.calibrate:
        metrics["clip_score_calibration"] = clip_score_threshold(
            scores["clip_score"], scores["matched"], a.target_recall
        )
    metrics.update(
        model=a.model,
        pretrained=pretrained,
        rows=a.rows,
        seed=a.seed,
        seconds=round(time.perf_counter() - start, 1),
    )
    print(json.dumps(metrics, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
