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
from pipeline.testing.evaluate_model import evaluate, roc_auc


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


def test_cli_prints_one_json_object_for_the_bundled_model():
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.testing.evaluate_model",
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
    )
    out = json.loads(proc.stdout)
    assert out["pretrained"] == "synthetic" and out["rows"] == 60
    for key in ("shape_acc", "color_acc", "match_auc", "hazard_auc", "neardup_auc"):
        assert 0.0 <= out[key] <= 1.0
