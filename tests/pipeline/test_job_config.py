"""JobConfig loading: YAML, flags, --set typing, and errors that name the field."""

from __future__ import annotations

import math

import pytest

from pipeline import job_config as J
from pipeline.config import ConfigError, JobConfig

BASE = ["--input", "s3://lists/part-*.parquet", "--output", "s3://out/run/"]


def test_defaults_use_the_bundled_tiny_model_and_derive_the_output_layout() -> None:
    cfg = J.from_args(BASE)
    assert (cfg.embed.model, cfg.embed.pretrained) == ("tiny-synthetic", "synthetic")
    assert cfg.read.url_list == "s3://lists/part-*.parquet"
    assert cfg.shard.output_folder == "s3://out/run/shards"
    assert cfg.write.output_folder == "s3://out/run/embeddings"


def test_yaml_then_flags_then_set(tmp_path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(
        "input: /data/urls.parquet\n"
        "output: /data/out\n"
        "decode:\n  image_size: 128\n  resize_mode: center_crop\n"
        "embed:\n  model: ViT-B-32\n  pretrained: openai\n  concurrency: [1, 3]\n"
        "moderate:\n  concepts:\n    hazard: [a hazard sign, a warning sign]\n"
        "filter:\n  clip_score_threshold: 0.28\n"
    )
    cfg = J.from_args(
        ["--config", str(path), "--image-size", "224", "--set", "decode.image_size=64",
         "--set", "dedup.against=s3://old/run"]
    )
    assert cfg.decode.image_size == 64  # --set wins over the flag, the flag over the YAML
    assert cfg.decode.resize_mode == "center_crop"  # a section given in part keeps the rest
    assert cfg.decode.encode_format == "jpg"
    assert cfg.embed.model == "ViT-B-32" and cfg.embed.pretrained == "openai"
    assert cfg.embed.concurrency == (1, 3)
    assert cfg.moderate.concepts == {"hazard": ("a hazard sign", "a warning sign")}
    assert cfg.filter.clip_score_threshold == 0.28
    assert cfg.dedup.against == "s3://old/run"
    assert cfg.shard.output_folder == "/data/out/shards"


@pytest.mark.parametrize(
    ("assignment", "path", "expected"),
    [
        ("embed.concurrency=1,2", ("embed", "concurrency"), (1, 2)),
        ("embed.concurrency=[2, 4]", ("embed", "concurrency"), (2, 4)),
        ("embed.concurrency=3", ("embed", "concurrency"), (3, 3)),
        ("embed.num_gpus=1", ("embed", "num_gpus"), 1.0),
        ("embed.pretrained=none", ("embed", "pretrained"), None),
        ("embed.pretrained=2023", ("embed", "pretrained"), "2023"),
        ("decode.max_aspect_ratio=.inf", ("decode", "max_aspect_ratio"), math.inf),
        ("decode.resize_only_if_bigger=yes", ("decode", "resize_only_if_bigger"), True),
        ("filter.unsafe=off", ("filter", "unsafe"), False),
        ("filter.clip_score_threshold=null", ("filter", "clip_score_threshold"), None),
        ("download.allowed_networks=127.0.0.1/32,127.0.0.2/32", ("download", "allowed_networks"),
         ("127.0.0.1/32", "127.0.0.2/32")),
        ("download.allowed_networks=", ("download", "allowed_networks"), ()),
        ("read.caption_col=TEXT", ("read", "caption_col"), "TEXT"),
        ("moderate.concepts={gore: [a gory photo]}", ("moderate", "concepts"), {"gore": ("a gory photo",)}),
        ("moderate.image_thresholds={gore: 0.1, nudity: null}", ("moderate", "image_thresholds"),
         {"gore": 0.1, "nudity": None}),
        ("dedup.n_clusters=16", ("dedup", "n_clusters"), 16),
        ("output=s3://b/other", ("output",), "s3://b/other"),
    ],
)
def test_set_is_typed_by_the_field(assignment, path, expected) -> None:
    cfg = J.apply_set(JobConfig(), assignment)
    value = cfg
    for part in path:
        value = getattr(value, part)
    assert value == expected
    assert type(value) is type(expected)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--set", "embed.inference_batch=many"], "embed.inference_batch: expected an integer, got 'many'"),
        (["--set", "execution.scheduler=yarn"], "execution.scheduler: must be one of auto, local, ray"),
        (["--scheduler", "local", "--ray-address", "127.0.0.1:6379"], "execution.ray_address: is only used with scheduler ray"),
        (["--processes", "0"], "execution.processes: must be >= 1"),
        (["--set", "execution.progress_interval_s=-5"], "execution.progress_interval_s: must be >= 0 (0: off)"),
        (["--set", "execution.idle_workers=-1"], "execution.idle_workers: must be >= 0 or unset"),
        (["--set", "embed.concurrency=1,2,3"], "embed.concurrency: expected 2 values"),
        (["--set", "filter.unsafe=perhaps"], "filter.unsafe: must be true, false, or 'auto'"),
        (["--set", "decode.image_size=1.5"], "decode.image_size: expected an integer"),
        (["--set", "moderate.concepts=[a, b]"], "moderate.concepts: expected a mapping"),
        (["--set", "embedding.model=x"], "embedding: unknown section"),
        (["--set", "embed.modle=x"], "embed.modle: unknown field"),
        (["--set", "embed.model.name=x"], "embed.model: is a value, not a section"),
        (["--set", "embed.model"], "expected section.field=value"),
        # Values of the right type that a section's validation refuses.
        (["--image-size", "0"], "decode.image_size: must be > 0"),
        (["--concurrency", "3,1"], "embed.concurrency: must be (min, max)"),
        # Another model without its weights would try to load the tiny model's file.
        (["--model", "ViT-B-32"], "embed.pretrained: 'synthetic' names the bundled synthetic-world weights"),
        (["--clip-score-threshold", "2"], "filter.clip_score_threshold: must be a cosine in [-1, 1]"),
        (["--dedup-threshold", "0"], "dedup.threshold: must be in (0, 1]"),
        (["--dedup-pixel-check", "maybe"], "dedup.pixel_check"),
        (["--allowed-networks", "not-a-net"], "download.allowed_networks: 'not-a-net' is not a CIDR"),
        (["--set", "shard.output_folder=/elsewhere"], "shard.output_folder: follows from output"),
    ],
)
def test_bad_values_name_the_field(argv, message) -> None:
    with pytest.raises(ConfigError) as e:
        J.from_args(BASE + argv)
    assert message in str(e.value)


def test_unknown_yaml_section_and_field_are_named(tmp_path) -> None:
    bad_section = tmp_path / "a.yaml"
    bad_section.write_text("input: x\noutput: y\nembedd:\n  model: ViT-B-32\n")
    with pytest.raises(ConfigError, match=r"^embedd: unknown section"):
        J.from_args(["--config", str(bad_section)])
    bad_field = tmp_path / "b.yaml"
    bad_field.write_text("input: x\noutput: y\ndecode:\n  image_sise: 64\n")
    with pytest.raises(ConfigError, match=r"^decode.image_sise: unknown field"):
        J.from_args(["--config", str(bad_field)])
    bad_type = tmp_path / "c.yaml"
    bad_type.write_text("input: x\noutput: y\ndecode: 64\n")
    with pytest.raises(ConfigError, match=r"^decode: expected a mapping"):
        J.from_args(["--config", str(bad_type)])


def test_missing_input_or_output_is_named() -> None:
    with pytest.raises(ConfigError, match=r"^input: is required"):
        J.from_args(["--output", "/tmp/x"])
    with pytest.raises(ConfigError, match=r"^output: is required"):
        J.from_args(["--input", "/tmp/x"])


def test_flags_map_to_their_fields() -> None:
    cfg = J.from_args(
        BASE
        + ["--model", "ViT-L-14", "--pretrained", "openai", "--s3-endpoint-url", "http://127.0.0.1:9000",
           "--allowed-networks", "127.0.0.1/32", "--allowed-networks", "127.0.0.3/32",
           "--image-size", "224", "--number-sample-per-shard", "500", "--batch-size", "512",
           "--concurrency", "1,4", "--num-gpus-per-actor", "1", "--clip-score-threshold", "0.3",
           "--unsafe-threshold", "0.02", "--dedup-threshold", "0.9", "--dedup-against", "s3://old",
           "--dedup-pixel-check", "yes"]
    )
    assert (cfg.embed.model, cfg.embed.pretrained) == ("ViT-L-14", "openai")
    assert cfg.storage.s3_endpoint_url == "http://127.0.0.1:9000"
    assert cfg.download.allowed_networks == ("127.0.0.1/32", "127.0.0.3/32")
    assert cfg.decode.image_size == 224 and cfg.shard.number_sample_per_shard == 500
    assert cfg.embed.inference_batch == 512
    assert cfg.embed.concurrency == (1, 4) and cfg.embed.num_gpus == 1.0
    assert cfg.filter.clip_score_threshold == 0.3
    assert cfg.moderate.default_threshold == 0.02
    assert cfg.dedup.threshold == 0.9 and cfg.dedup.against == "s3://old"
    assert cfg.dedup.pixel_check is True


def test_yaml_round_trip_of_a_resolved_config(tmp_path) -> None:
    cfg = J.from_args(BASE + ["--set", "moderate.concepts={hazard: [a hazard sign]}", "--concurrency", "1,2"])
    path = tmp_path / "config.yaml"
    path.write_text(J.to_yaml(cfg))
    back = J.validate(J.from_yaml(path))
    assert back == cfg
    assert "max_aspect_ratio: .inf" in path.read_text()


def test_retired_fields_of_an_older_config_are_ignored_with_a_warning(caplog) -> None:
    """An output written by an earlier version records fields that are gone; reading its
    config.yaml back (resume, dedup against it) must still work."""
    old = "embed:\n  model: tiny-synthetic\n  rows_per_call: 256\n  preprocess_num_cpus: 1.0\nexecution:\n  download_concurrency: 2\n"
    with caplog.at_level("WARNING", logger="clipcurate.config"):
        cfg = J.from_yaml_text(old)
    assert cfg.embed.model == "tiny-synthetic"
    assert "embed.rows_per_call is ignored" in caplog.text
    assert "execution.download_concurrency is ignored" in caplog.text


def test_an_older_outputs_config_gets_the_models_per_channel_pixel_bounds() -> None:
    """Outputs written before the pixel check bounded each colour channel record only the
    averaged bounds; re-deciding one (jobs/dedup.py) keeps those and takes the model's
    per-channel bounds, so it never confirms a pair the averaged bounds reject."""
    old = (
        "input: urls.parquet\noutput: out\nembed:\n  model: tiny-synthetic\n  pretrained: synthetic\n"
        "dedup:\n  threshold: 0.9\n  pixel_check: true\n  pixel_mean_max: 4.0\n  pixel_blob_max: 20.0\n"
    )
    cfg = J.validate(J.from_yaml_text(old))
    d = cfg.dedup
    assert (d.pixel_mean_max, d.pixel_blob_max) == (4.0, 20.0)
    assert (d.pixel_channel_mean_max, d.pixel_channel_blob_max) == (7.0, 34.0)
    # A model without pixel defaults gets the generic ones.
    generic = J.validate(J.from_yaml_text(old.replace("tiny-synthetic\n  pretrained: synthetic", "ViT-B-32\n  pretrained: null")))
    assert (generic.dedup.pixel_channel_mean_max, generic.dedup.pixel_channel_blob_max) == (7.0, 34.0)
