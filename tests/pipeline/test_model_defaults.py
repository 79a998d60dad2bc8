"""Model-owned defaults (pipeline/model_defaults.py) and the start-up checks (pipeline/safety.py)."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import save_file

from pipeline import job_config as J
from pipeline.config import ConfigError
from pipeline.model_defaults import apply_model_defaults, notes
from pipeline.safety import preflight

BASE = ["--input", "in.parquet", "--output", "/tmp/never-written"]


def test_the_bundled_model_brings_its_calibrated_settings() -> None:
    cfg = J.from_args(BASE)
    assert cfg.filter.clip_score_threshold == 0.3 and cfg.filter.unsafe is True
    assert cfg.moderate.concepts == {"hazard": ("a hazard sign", "a warning sign", "a danger sign")}
    assert cfg.moderate.image_thresholds == {"hazard": 0.05}
    assert cfg.moderate.caption_thresholds == {"hazard": 0.1}
    assert (cfg.dedup.threshold, cfg.dedup.pixel_check) == (0.9, True)
    assert not [n for n in notes(cfg) if "no row is dropped" in n]


def test_user_settings_win_over_the_model() -> None:
    cfg = J.from_args([*BASE, "--clip-score-threshold", "0.25", "--dedup-threshold", "0.97",
                       "--set", "dedup.pixel_check=false", "--unsafe-filter", "false"])
    assert cfg.filter.clip_score_threshold == 0.25 and cfg.filter.unsafe is False
    assert cfg.dedup.threshold == 0.97 and cfg.dedup.pixel_check is False
    # null switches the filter off even though the model has a value.
    assert J.from_args([*BASE, "--clip-score-threshold", "null"]).filter.clip_score_threshold is None


def test_laion_vit_b32_gets_laion_clip_score_and_no_moderation_drops() -> None:
    cfg = J.from_args([*BASE, "--model", "ViT-B-32", "--pretrained", "openai"])
    assert cfg.filter.clip_score_threshold == 0.28
    assert cfg.filter.unsafe is False  # generic concepts are scored, never used to drop
    assert set(cfg.moderate.concepts) == {"nudity", "violence"}
    assert cfg.dedup.threshold == 0.95 and cfg.dedup.pixel_check is False
    lines = notes(cfg)
    assert any(line.startswith("moderation: no moderation thresholds are calibrated for ViT-B-32 (openai)") for line in lines)


def test_unregistered_weights_filter_nothing_by_model_scores() -> None:
    cfg = J.from_args([*BASE, "--model", "ViT-B-16", "--pretrained", "/weights/mine.safetensors"])
    assert cfg.filter.clip_score_threshold is None and cfg.filter.unsafe is False
    assert sum("no row is dropped" in n for n in notes(cfg)) == 2


def test_calibrated_moderation_switches_the_filter_on(tmp_path) -> None:
    explicit = J.from_args([*BASE, "--model", "ViT-B-32", "--pretrained", "openai",
                            "--set", "moderate.image_thresholds={nudity: 0.04}"])
    assert explicit.filter.unsafe is True
    head = tmp_path / "head.safetensors"
    save_file({"layers.0.weight": np.zeros((1, 512), np.float32)}, str(head))
    preset = J.from_args([*BASE, "--model", "ViT-B-32", "--pretrained", "openai", "--head", str(head),
                          "--head-preset", "re-laion-research-safe"])
    assert preset.filter.unsafe is True and preset.moderate.head_threshold == 0.45


def test_resolution_is_idempotent_and_survives_config_yaml() -> None:
    cfg = J.from_args(BASE)
    assert apply_model_defaults(cfg) == cfg
    again = J.validate(J.from_yaml_text(J.to_yaml(cfg)))
    assert again == cfg


def test_head_of_the_wrong_size_stops_the_job_with_one_line(tmp_path) -> None:
    head = tmp_path / "nsfw-head.safetensors"
    save_file({"layers.0.weight": np.zeros((8, 768), np.float32), "layers.1.weight": np.zeros((1, 8), np.float32)},
              str(head))
    cfg = J.from_args([*BASE, "--head", str(head)])  # the tiny model's embeddings are 64-d
    with pytest.raises(ConfigError) as e:
        preflight(cfg)
    msg = str(e.value)
    assert msg.startswith(f"moderate.head_path: {head}: head expects 768-d embeddings, the model gives 64")
    assert "\n" not in msg


def test_unreadable_head_names_the_file(tmp_path) -> None:
    cfg = J.from_args([*BASE, "--head", str(tmp_path / "missing.safetensors")])
    with pytest.raises(ConfigError, match=r"moderate.head_path: .*missing\.safetensors: cannot read"):
        preflight(cfg)
