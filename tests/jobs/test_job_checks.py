"""Checks the job makes before any work: GPUs it cannot get, an output written differently."""

from __future__ import annotations

import pytest

from pipeline import job
from pipeline import job_config as J
from pipeline.config import ConfigError
from pipeline.storage import Storage


@pytest.mark.parametrize("scheduler", ["local", "ray"])
def test_gpus_the_machine_lacks_fail_before_any_work(monkeypatch, scheduler) -> None:
    from pipeline.schedulers.local import LocalScheduler
    from pipeline.schedulers.ray_data import RayDataScheduler

    # No cluster is started or joined: the schedulers report no GPUs.
    monkeypatch.setattr(RayDataScheduler, "gpus", lambda self: 0)
    monkeypatch.setattr(LocalScheduler, "gpus", lambda self: 0)
    cfg = J.from_args(["--input", "x", "--output", "y", "--num-gpus-per-actor", "1", "--scheduler", scheduler])
    with pytest.raises(ConfigError, match=r"embed.num_gpus=1.*needs 1 GPU\(s\), but there are 0"):
        job.stream(cfg, [], [], {}, lambda line: None)


def test_unset_num_gpus_uses_a_gpu_where_there_is_one() -> None:
    cfg = J.from_args(["--input", "x", "--output", "y"])
    assert cfg.embed.num_gpus is None
    assert cfg.embed.with_gpus(0).num_gpus == 0.0
    assert cfg.embed.with_gpus(4).num_gpus == 1.0
    set_ = J.from_args(["--input", "x", "--output", "y", "--num-gpus-per-actor", "0.5"])
    assert set_.embed.with_gpus(4).num_gpus == 0.5


def test_an_output_refuses_a_config_that_would_change_its_rows(tmp_path) -> None:
    out = Storage(str(tmp_path))
    first = J.from_args(["--input", "in.parquet", "--output", str(tmp_path), "--image-size", "64"])
    assert job._check_same_output(first, out) is False  # nothing written yet
    out.write_atomic(job.CONFIG_NAME, J.to_yaml(first).encode())
    assert job._check_same_output(first, out) is True
    # Filters, dedup and execution may change: only the decisions are recomputed.
    looser = J.apply_set(J.apply_set(first, "filter.clip_score_threshold=0.1"), "dedup.threshold=0.9")
    assert job._check_same_output(looser, out) is False
    base = ["--input", "in.parquet", "--output", str(tmp_path), "--image-size", "64"]
    for extra, field in (
        (["--image-size", "128"], "decode.image_size"),
        (["--model", "ViT-B-32", "--set", "embed.pretrained=null"], "embed.model"),
        (["--number-sample-per-shard", "10"], "shard.number_sample_per_shard"),
        (["--unsafe-threshold", "0.3"], "moderate.default_threshold"),
        (["--input", "other.parquet"], "input"),
        # The bundled model's dedup stores thumbnails for the pixel check; without it, rows
        # written later would lack them.
        (["--set", "dedup.pixel_check=false"], "dedup.pixel_check"),
    ):
        with pytest.raises(ConfigError, match=rf"^{field}: .* was written with"):
            job._check_same_output(J.from_args(base + extra), out)
