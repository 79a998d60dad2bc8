"""clip_model.train: the loss, the schedule, a short run that learns, reproducibility, saving."""

from __future__ import annotations

import math
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors import safe_open

import clip_model
from clip_model import train as tr
from clip_model.config import CLIPConfig
from clip_model.model import CLIP

# A model small enough to train for a few dozen steps inside a test (32 px, 16 patches).
SMALL = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def _small_model(seed: int = 0) -> CLIP:
    torch.manual_seed(seed)
    return CLIP(CLIPConfig.from_dict(SMALL))


def _reference_loss(img: np.ndarray, txt: np.ndarray, scale: float) -> float:
    """Symmetric InfoNCE written out in float64: -mean log softmax of the diagonal, both ways."""
    logits = scale * img @ txt.T
    n = logits.shape[0]

    def diag_log_softmax(m: np.ndarray) -> np.ndarray:
        out = np.empty(n)
        for i in range(n):
            row = m[i]
            out[i] = row[i] - (row.max() + math.log(np.exp(row - row.max()).sum()))
        return out

    return float(-(diag_log_softmax(logits).mean() + diag_log_softmax(logits.T).mean()) / 2)


def test_contrastive_loss_matches_float64_reference():
    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(9, 16, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(9, 16, generator=g), dim=-1)
    log_scale = torch.tensor(math.log(20.0))
    got = tr.contrastive_loss(img, txt, log_scale).item()
    assert got == pytest.approx(
        _reference_loss(img.double().numpy(), txt.double().numpy(), 20.0), abs=1e-5
    )
    # Perfectly aligned pairs at a high temperature cost almost nothing; a swap costs a lot.
    assert tr.contrastive_loss(img, img, torch.tensor(math.log(100.0))).item() < 0.05
    assert tr.contrastive_loss(img, img.flip(0), torch.tensor(math.log(100.0))).item() > 5
    with pytest.raises(ValueError, match="feature matrices"):
        tr.contrastive_loss(img, txt[:3], log_scale)


def test_learning_rate_schedule():
    r = replace(tr.RECIPES["tiny-synthetic-base"], steps=110, warmup_steps=10, lr=1e-3, min_lr=1e-5)
    assert tr.learning_rate(r, 0) == pytest.approx(1e-4)
    assert tr.learning_rate(r, 9) == pytest.approx(1e-3)
    assert tr.learning_rate(r, 10) == pytest.approx(1e-3)
    assert tr.learning_rate(r, 60) == pytest.approx((1e-3 + 1e-5) / 2)
    assert tr.learning_rate(r, 110) == pytest.approx(1e-5)
    lrs = [tr.learning_rate(r, s) for s in range(10, 110)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))


def test_weight_decay_spares_gains_biases_positions_and_temperature():
    model = _small_model()
    decay, no_decay = tr._param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    spared = {names[id(p)] for p in no_decay["params"]}
    assert "logit_scale" in spared and "positional_embedding" in spared
    assert "visual.class_embedding" in spared and "ln_final.weight" in spared
    assert all(p.ndim >= 2 for p in decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def _recipe(steps: int, workers: int = 0) -> tr.Recipe:
    return replace(
        tr.RECIPES["tiny-synthetic-base"], steps=steps, batch_size=32, warmup_steps=min(5, steps - 1), lr=2e-3,
        data_workers=workers,
    )  # fmt: skip


def test_short_training_run_lowers_the_loss():
    from testkit.train_tiny import synthetic_batches

    torch.set_num_threads(1)
    # Three fixed batches of 24 synthetic pairs, cycled: 30 steps are enough to fit them.
    make = synthetic_batches(32, 24, seed=3)
    fixed = [make(i) for i in range(3)]
    model = _small_model()
    result = tr.train(model, lambda step: fixed[step % 3], replace(_recipe(30), lr=3e-3))
    chance = math.log(24)
    early, late = np.mean(result.losses[1:6]), np.mean(result.losses[-5:])
    assert early > chance - 0.3, result.losses
    assert late < chance - 1.0, result.losses
    assert not model.training


def test_runs_are_reproducible_with_and_without_worker_processes():
    from testkit.train_tiny import synthetic_batches

    torch.set_num_threads(1)
    runs = []
    for workers in (0, 1, 1):
        model = _small_model(seed=5)
        res = tr.train(model, synthetic_batches(32, 16, seed=9), _recipe(4, workers))
        runs.append((res.losses, model.state_dict()))
    for losses, state in runs[1:]:
        assert losses == runs[0][0]
        assert all(torch.equal(state[k], runs[0][1][k]) for k in state)


def test_save_weights_fp16_roundtrip_and_metadata(tmp_path):
    model = _small_model()
    path = tr.save_weights(model, tmp_path / "w.safetensors", metadata={"seed": "4"})
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"seed": "4"}
        keys = set(f.keys())
        assert keys == set(model.state_dict())
        for k in keys:
            t = f.get_tensor(k)
            assert t.dtype == torch.float16
            assert torch.equal(t, model.state_dict()[k].half())
    assert not (tmp_path / "w.safetensors.tmp").exists()


def test_clip_model_names_neither_the_test_rig_nor_the_pipeline():
    """Not even as a string: data providers are handed in, never looked up by module name
    ("testkit.train_tiny:..."); prose that cites a file (provenance notes) is fine."""
    import re
    from pathlib import Path

    module_ref = re.compile(r"(import|from)\s+(testkit|pipeline)\b|[\"'](testkit|pipeline)\.\w+")
    root = Path(clip_model.__file__).parent
    for path in root.rglob("*.py"):
        assert not module_ref.search(path.read_text()), path
    assert module_ref.search('data="testkit.train_tiny:synthetic_batches"')


def test_clip_model_train_without_data_says_what_to_pass(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "clip_model.train", "--recipe", "towers-small", "--out",
         str(tmp_path / "w.safetensors")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "no --data given" in proc.stderr and not (tmp_path / "w.safetensors").exists()


def test_resumed_run_ends_where_an_uninterrupted_run_does(tmp_path):
    """A run killed after a checkpoint and started again ends with the same weights and losses
    as one that never stopped (batches are a pure function of the step; RNG state is saved)."""
    from testkit.train_tiny import synthetic_batches

    torch.set_num_threads(1)
    recipe = _recipe(6)
    make = synthetic_batches(32, 8, seed=2)
    whole = _small_model(seed=4)
    full = tr.train(whole, make, recipe, checkpoint_dir=tmp_path / "a", checkpoint_every=2, run_id="r")

    def crashing(step: int):
        if step == 3:
            raise KeyboardInterrupt  # the process dies during step 3, after the step-2 checkpoint
        return make(step)

    with pytest.raises(KeyboardInterrupt):
        tr.train(_small_model(seed=4), crashing, recipe, checkpoint_dir=tmp_path / "b",
                 checkpoint_every=2, run_id="r")  # fmt: skip
    lines: list[str] = []
    resumed = _small_model(seed=99)  # whatever it starts from, the checkpoint replaces it
    res = tr.train(resumed, make, recipe, checkpoint_dir=tmp_path / "b", checkpoint_every=2,
                   run_id="r", log=lines.append)  # fmt: skip
    assert "resumed from" in lines[0] and "at step 2/6" in lines[0]
    assert res.losses == full.losses and len(res.losses) == 6
    a, b = whole.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="another run"):
        tr.train(_small_model(), make, recipe, checkpoint_dir=tmp_path / "b", run_id="other")


def test_clip_model_train_does_not_import_pipeline():
    code = (
        "import sys, clip_model, clip_model.train; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('pipeline', 'ray')]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cli_trains_the_recipe_and_writes_loadable_weights(tmp_path):
    out = tmp_path / "tiny.safetensors"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "testkit.train_tiny",
            "--recipe",
            "tiny-synthetic-base",
            "--steps",
            "2",
            "--seed",
            "1",
            "--out",
            str(out),
        ],  # fmt: skip
        capture_output=True,
        text=True,
        check=True,
    )
    assert "step 2/2" in proc.stderr
    model, preprocess = clip_model.create_model_and_transforms(
        "tiny-synthetic", pretrained=str(out)
    )
    with safe_open(str(out), framework="pt") as f:
        assert f.metadata()["seed"] == "1"
        ref = f.get_tensor("text_projection")
    assert torch.equal(model.text_projection.detach().half(), ref)


def test_training_batches_are_deterministic_and_hold_minimal_twins():
    import random

    from testkit import synthetic as syn
    from testkit.train_tiny import synthetic_batches, variant

    make = synthetic_batches(32, 12, seed=4)
    a, b, c = make(3), make(3), make(4)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    assert a[0].shape == (12, 3, 32, 32) and a[0].dtype == torch.float32
    assert a[1].shape == (12, 77) and a[1].dtype == torch.int64

    rng = random.Random(0)
    kinds = set()
    for scene in syn.sample_scenes(300, 2, unsafe_rate=0.3):
        twin, kind = variant(scene, rng)
        kinds.add(kind)
        assert syn.describe(twin) != syn.describe(scene)
        assert twin.layout_seed == scene.layout_seed
        changed = [
            f
            for f in ("shape", "color", "count", "size", "position")
            for g, h in zip(scene.groups, twin.groups, strict=True)
            if getattr(g, f) != getattr(h, f)
        ]
        assert len(changed) + (twin.hazard != scene.hazard) == 1, (scene, twin)
        if kind == "shape":
            # Same layout, one group redrawn: most pixels are untouched.
            x = np.asarray(syn.render(scene, 96), int)
            y = np.asarray(syn.render(twin, 96), int)
            assert 0 < (np.abs(x - y).max(-1) > 0).mean() < 0.2
        positions = [g.position for g in twin.groups] + [twin.hazard_corner] * twin.hazard
        assert len(set(positions)) == len(positions)
    assert kinds == {"shape", "hazard", "color", "count", "size", "position"}


def _two_step(name: str, **kw) -> tr.Recipe:
    return replace(tr.RECIPES[name], steps=2, warmup_steps=1, data_workers=0, **kw)


def test_second_stage_from_its_base_file_equals_training_the_base_in_the_same_run(
    tmp_path, monkeypatch
):
    """The bundled recipe starts from its base recipe's weights; reading them from the base's
    saved (float16) file or training the base first in the same run must give the same model."""
    import testkit.train_tiny as tt

    monkeypatch.setattr(tt, "SHAPE_SETS_PER_BATCH", 1)
    base = _two_step("tiny-synthetic-base", batch_size=8)
    stage = _two_step("tiny-synthetic", batch_size=10)
    monkeypatch.setitem(tr.RECIPES, "tiny-synthetic-base", base)
    base_model, _ = tr.run_recipe(base, 3, tt.PROVIDERS)
    path = tr.save_weights(base_model, tmp_path / "base.safetensors")
    from_file, res_file = tr.run_recipe(stage, 3, tt.PROVIDERS, init=path)
    chained, res_chain = tr.run_recipe(stage, 3, tt.PROVIDERS)
    assert res_file.losses == res_chain.losses and len(res_file.losses) == 2
    a, b = from_file.state_dict(), chained.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # The stage trained: it moved away from the base's (float16) weights.
    start = base_model.state_dict()
    assert not torch.equal(a["text_projection"], start["text_projection"].half().float())
    with pytest.raises(ValueError, match="random init"):
        tr.run_recipe(base, 3, tt.PROVIDERS, init=path)


def test_shape_sets_differ_only_in_one_groups_shape():
    import random

    from testkit import synthetic as syn
    from testkit.train_tiny import shape_set

    nouns = {s: s for s in syn.SHAPES} | {p: s for s, p in syn.PLURALS.items()}
    for seed, scene in enumerate(syn.sample_scenes(40, 8, unsafe_rate=0.3)):
        images, texts = shape_set(scene, random.Random(seed), 64)
        assert len(images) == len(texts) == 5
        # One template: the captions differ in exactly one word, the shape of the changed group,
        # and between them name all five shapes.
        words = [t.split() for t in texts]
        assert len({len(w) for w in words}) == 1, texts
        differing = [k for k in range(len(words[0])) if len({w[k] for w in words}) > 1]
        assert len(differing) == 1, texts
        assert sorted(nouns[w[differing[0]].rstrip(",")] for w in words) == sorted(syn.SHAPES), (
            texts
        )
        # The five images are different pictures (each drawn with its own shape).
        pixels = [np.asarray(im.resize((64, 64)), int) for im in images]
        assert all(np.abs(pixels[i] - pixels[j]).max() > 0 for i in range(5) for j in range(i))


def test_shape_set_batches_shapes_determinism_and_batch_floor(monkeypatch):
    import testkit.train_tiny as tt

    monkeypatch.setattr(tt, "SHAPE_SETS_PER_BATCH", 2)
    make = tt.shape_set_batches(32, 14, seed=4)
    a, b, c = make(1), make(1), make(2)
    assert a[0].shape == (14, 3, 32, 32) and a[0].dtype == torch.float32
    assert a[1].shape == (14, 77) and a[1].dtype == torch.int64
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    # The first rows are a first-stage-style batch, but never the first stage's own scenes.
    first = tt.synthetic_batches(32, 4, seed=4)(1)
    assert not torch.equal(a[0][:4], first[0])
    with pytest.raises(ValueError, match="batch_size must exceed 11"):
        tt.shape_set_batches(32, 11, seed=4)
