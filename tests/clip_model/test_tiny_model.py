"""The bundled tiny-synthetic CLIP meets its acceptance on a fresh, held-out synthetic world."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest
import torch

import clip_model
from clip_model import pretrained
from testkit.evaluate_model import evaluate

WEIGHTS = Path(clip_model.__file__).parent / "weights"
# Never used by training: clip_model.train's synthetic data is seeded "train-<seed>-<step>".
HELD_OUT_SEED = 20261125


@pytest.fixture(scope="module")
def metrics():
    torch.set_num_threads(1)
    model, preprocess = clip_model.create_model_and_transforms(
        "tiny-synthetic", pretrained="synthetic"
    )
    return evaluate(model, preprocess, clip_model.tokenize, rows=320, seed=HELD_OUT_SEED)


def test_weights_are_bundled_small_and_pinned():
    path = WEIGHTS / "tiny-synthetic.safetensors"
    assert path.stat().st_size <= 20 * 1024 * 1024
    assert hashlib.sha256(path.read_bytes()).hexdigest() == pretrained.TINY_SYNTHETIC_SHA256


def test_card_states_the_reproducing_command_and_seed():
    card = (WEIGHTS / "tiny-synthetic.md").read_text()
    assert "python -m testkit.train_tiny --recipe tiny-synthetic" in card
    assert re.search(r"--seed \d+", card)
    assert pretrained.TINY_SYNTHETIC_SHA256 in card


def test_zero_shot_colour(metrics):
    assert metrics["counts"]["single_group"] >= 100
    assert metrics["color_acc"] >= 0.95


def test_zero_shot_shape(metrics):
    assert metrics["shape_acc"] >= 0.95


def test_clip_score_separates_matched_from_mismatched_captions(metrics):
    assert metrics["counts"]["mismatched"] >= 50
    assert metrics["match_auc"] >= 0.97


def test_hazard_cases_are_present(metrics):
    assert metrics["counts"]["hazard_unmentioned"] >= 15


def test_image_side_hazard_detection(metrics):
    assert metrics["hazard_auc"] >= 0.97
    assert metrics["hazard_auc_unmentioned"] >= 0.97


def test_near_duplicates_embed_closer_than_different_scenes(metrics):
    assert metrics["counts"]["near_dup_pairs"] >= 30
    assert metrics["neardup_auc"] >= 0.99
