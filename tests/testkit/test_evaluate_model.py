"""ROC AUC (hand-worked and brute force) and the model scorecard on the synthetic world."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import clip_model
from testkit import subprocess_env
from testkit.evaluate_model import (
    evaluate,
    group_prompts,
    paired_sign_test,
    roc_auc,
    zero_shot_predict,
)
from testkit.synthetic import generate_world


def test_roc_auc_hand_worked_example_with_a_tie():
    # Positives 0.35, 0.8, 0.4; negatives 0.1, 0.4. Of the 6 (pos, neg) pairs the positive wins
    # (0.35,0.1) (0.8,0.1) (0.8,0.4) (0.4,0.1), loses (0.35,0.4), ties (0.4,0.4): 4.5 / 6.
    scores = [0.1, 0.4, 0.35, 0.8, 0.4]
    labels = [False, False, True, True, True]
    assert roc_auc(scores, labels) == pytest.approx(0.75, abs=1e-12)


def test_roc_auc_equals_brute_force_pair_count():
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = int(rng.integers(2, 60))
        scores = rng.integers(0, 8, n).astype(float)  # many ties
        labels = rng.random(n) < 0.4
        if labels.all() or not labels.any():
            continue
        pos, neg = scores[labels], scores[~labels]
        wins = sum(1.0 if p > q else 0.5 if p == q else 0.0 for p, q in itertools.product(pos, neg))
        assert roc_auc(scores, labels) == pytest.approx(wins / (len(pos) * len(neg)), abs=1e-12)


def test_roc_auc_extremes_and_errors():
    assert roc_auc([1, 2, 3, 4], [False, False, True, True]) == 1.0
    assert roc_auc([4, 3, 2, 1], [False, False, True, True]) == 0.0
    assert roc_auc([5, 5, 5], [True, False, True]) == 0.5
    with pytest.raises(ValueError, match="positives and negatives"):
        roc_auc([1, 2], [True, True])
    with pytest.raises(ValueError, match="NaN"):
        roc_auc([1, float("nan")], [True, False])
    with pytest.raises(ValueError, match="length"):
        roc_auc([1, 2, 3], [True, False])


def test_zero_shot_predict_sums_class_probabilities():
    # Hand-worked: class 0 has the single best prompt (4.0), but class 1's two prompts at 3.5
    # hold more probability (2 e^3.5 = 66.2 > e^4 = 54.6): the ensemble picks class 1, a max
    # over prompts would pick class 0.
    logits = torch.tensor([[4.0, 3.5, 3.5, 0.0], [1.0, 0.0, 0.0, 2.0]])
    assert zero_shot_predict(logits, [0, 1, 1, 2], 3).tolist() == [1, 2]


def test_zero_shot_predict_matches_float64_softmax_marginal():
    rng = np.random.default_rng(5)
    logits = rng.normal(0, 4, size=(50, 30))
    label = rng.integers(0, 4, size=30)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    expected = np.stack([p[:, label == c].sum(1) for c in range(4)], 1).argmax(1)
    got = zero_shot_predict(torch.tensor(logits, dtype=torch.float32), label.tolist(), 4)
    assert got.tolist() == expected.tolist()


def test_group_prompts_are_the_words_captions_use(tmp_path):
    prompts = group_prompts()
    assert len(prompts) == len({t for t, _, _ in prompts}) == 810
    table = generate_world(tmp_path, 120, 11, "http://127.0.0.1/")
    rows = [r for r in table.to_pylist() if r["_gt_num_groups"] == 1 and r["_gt_caption_matches"]]
    assert len(rows) > 40
    for r in rows:
        # Every single-group caption names its group with one of its own class's prompts.
        caption = " " + r["caption"] + " "
        own = [t for t, s, c in prompts if s == r["_gt_shape"] and c == r["_gt_color"]]
        assert any(f" {t} " in caption or f" {t}," in caption for t in own), r["caption"]


def test_an_untrained_model_scores_near_chance(tmp_path):
    # The scorecard must be able to fail: random weights know nothing about the world.
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model, preprocess = clip_model.create_model_and_transforms("tiny-synthetic")
    m = evaluate(model, preprocess, clip_model.tokenize, rows=150, seed=3, workdir=tmp_path)
    assert m["shape_acc"] < 0.5 and m["color_acc"] < 0.4
    assert 0.3 < m["match_auc"] < 0.7
    assert m["counts"]["rows"] == 150 and m["counts"]["near_dup_pairs"] > 10
    # The split by group covers every single-group scene once: its weighted mean is shape_acc.
    by = m["shape_acc_by_group"]
    assert set(by) <= {f"{c} {s}" for c in (1, 2, 3) for s in ("small", "large")} and len(by) >= 4
    n = m["counts"]["single_group_by_group"]
    assert sum(n.values()) == m["counts"]["single_group"]
    weighted = sum(by[k] * n[k] for k in by) / m["counts"]["single_group"]
    assert weighted == pytest.approx(m["shape_acc"])
    assert (tmp_path / "urls.parquet").is_file()
    # Per-item correctness for paired comparisons: one entry per scored scene.
    shape, colour = m["_scores"]["shape_correct"], m["_scores"]["color_correct"]
    assert len(shape) == m["counts"]["single_group"] and shape.mean() == pytest.approx(m["shape_acc"])
    assert colour.mean() == pytest.approx(m["color_acc"])


def test_paired_sign_test_hand_worked():
    # 8 items only b gets right, 2 only a, 5 both, 3 neither: p = 2 * P(X <= 2), X ~ Bin(10, 1/2)
    # = 2 * (1 + 10 + 45) / 1024.
    a = [False] * 8 + [True] * 2 + [True] * 5 + [False] * 3
    b = [True] * 8 + [False] * 2 + [True] * 5 + [False] * 3
    assert paired_sign_test(a, b) == {"b_only": 8, "a_only": 2, "p": pytest.approx(112 / 1024, abs=1e-15)}
    assert paired_sign_test(b, a)["p"] == pytest.approx(112 / 1024, abs=1e-15)
    assert paired_sign_test([True, False], [True, False]) == {"b_only": 0, "a_only": 0, "p": 1.0}
    assert paired_sign_test([False] * 3, [True] * 3)["p"] == pytest.approx(0.25)  # 2 * 1/8
    with pytest.raises(ValueError, match="equal-length"):
        paired_sign_test([True], [True, False])


def test_cli_prints_one_json_object_for_the_bundled_model():
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "testkit.evaluate_model",
            "--model",
            "tiny-synthetic",
            "--rows",
            "60",
            "--seed",
            "8",
            "--threads",
            "1",
        ],  # fmt: skip
        capture_output=True,
        text=True,
        check=True,
        env=subprocess_env(),
    )
    out = json.loads(proc.stdout)
    assert out["pretrained"] == "synthetic" and out["rows"] == 60
    for key in ("shape_acc", "color_acc", "match_auc", "hazard_auc", "neardup_auc"):
        assert 0.0 <= out[key] <= 1.0
