"""The bundled multilingual-synthetic model (ResNet + BERT towers) meets its acceptance on a
fresh multilingual synthetic world: matched vs mismatched captions in each language, and the
hazard sign from the image alone."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest
import torch

import clip_model
from clip_model import pretrained
from testkit.evaluate_model import evaluate

pytest.importorskip("transformers")

WEIGHTS = Path(clip_model.__file__).parent / "weights"
# Never used by training: its scenes are seeded "multi-<seed>-<step>".
HELD_OUT_SEED = 20261205
LANGUAGES = {"en": 1.0, "zh": 1.0, "ru": 1.0, "hi": 1.0}


@pytest.fixture(scope="module")
def metrics():
    torch.set_num_threads(1)
    model, preprocess = clip_model.create_model_and_transforms(
        "multilingual-synthetic", pretrained="synthetic", device="cpu"
    )
    return evaluate(model, preprocess, model.tokenizer, rows=600, seed=HELD_OUT_SEED, languages=LANGUAGES)


def test_weights_are_bundled_small_pinned_and_carded():
    path = WEIGHTS / "multilingual-synthetic.safetensors"
    assert path.stat().st_size <= 30 * 1000 * 1000
    assert hashlib.sha256(path.read_bytes()).hexdigest() == pretrained.MULTILINGUAL_SYNTHETIC_SHA256
    card = (WEIGHTS / "multilingual-synthetic.md").read_text()
    assert "python -m testkit.train_tiny --recipe multilingual-synthetic" in card
    assert re.search(r"--seed \d+", card) and pretrained.MULTILINGUAL_SYNTHETIC_SHA256 in card
    entry = pretrained.get_pretrained_entry("multilingual-synthetic", "synthetic")
    assert entry.defaults is not None and str(entry.defaults.clip_score_threshold) in card


def test_matched_captions_separate_from_mismatched_in_every_language(metrics):
    by_lang = metrics["match_auc_by_language"]
    assert set(by_lang) == set(LANGUAGES)
    assert min(by_lang.values()) >= 0.97, by_lang


def test_image_side_hazard_detection(metrics):
    assert metrics["counts"]["hazard_unmentioned"] >= 15
    assert metrics["hazard_auc"] >= 0.97
    assert metrics["hazard_auc_unmentioned"] >= 0.97
