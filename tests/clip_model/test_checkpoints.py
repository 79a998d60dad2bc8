"""Weight formats (HF folders, TorchScript archives, wrapped state dicts), architecture
inference, the factory's errors for bad input, and encoder behaviour users rely on."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from safetensors.torch import load_file, save_file

import clip_model
from clip_model.checkpoints import CheckpointError, read_checkpoint, read_torchscript

CONFIG_DIR = Path(clip_model.__file__).parent / "configs"
CAPTIONS = ["a photo of a cat", "", "two dogs playing in the snow next to a red barn"]
TOL = 1e-4


def _features(out) -> torch.Tensor:
    # transformers 5 returns an output object whose pooler_output is the projected feature.
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _tokens() -> torch.Tensor:
    return clip_model.tokenize(CAPTIONS)


def _open_clip_tiny(name: str, seed: int) -> torch.nn.Module:
    """A small open_clip model from our config file (same JSON schema), seeded random weights."""
    base = name.removesuffix("-quickgelu")
    open_clip.add_model_config(CONFIG_DIR / f"{base}.json")
    torch.manual_seed(seed)
    model = open_clip.create_model(base, force_quick_gelu=name.endswith("-quickgelu")).eval()
    with torch.no_grad():
        # open_clip zero-inits biases and BN gains; perturb everything so each weight matters.
        for n, p in model.named_parameters():
            if n != "logit_scale":
                p.add_(torch.randn_like(p) * 0.05)
        for n, b in model.named_buffers():
            if n.endswith("running_var"):
                b.uniform_(0.5, 1.5)
            elif n.endswith("running_mean"):
                b.normal_(0, 0.1)
    return model


def _assert_close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape
    assert b.abs().max() > 0.01  # a non-degenerate reference
    assert (a - b).abs().max().item() <= TOL


# ---------------------------------------------------------------- Hugging Face folders


def _hf_model(hidden_act: str):
    from transformers import CLIPConfig as HFCLIPConfig
    from transformers import CLIPModel

    cfg = HFCLIPConfig(
        text_config=dict(
            hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            hidden_act=hidden_act,
        ),
        vision_config=dict(
            hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            image_size=32, patch_size=8, hidden_act=hidden_act,
        ),
        projection_dim=32,
    )  # fmt: skip
    torch.manual_seed(5)
    model = CLIPModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.mark.parametrize(("hidden_act", "weights_file"), [
    ("quick_gelu", "model.safetensors"), ("gelu", "pytorch_model.bin")])  # fmt: skip
def test_hf_folder_alone_matches_transformers(tmp_path, hidden_act, weights_file):
    from transformers import CLIPImageProcessor

    hf = _hf_model(hidden_act)
    hf.save_pretrained(tmp_path)
    if weights_file == "pytorch_model.bin":
        torch.save(load_file(tmp_path / "model.safetensors"), tmp_path / weights_file)
        (tmp_path / "model.safetensors").unlink()
    CLIPImageProcessor(
        crop_size={"height": 32, "width": 32}, size={"shortest_edge": 32},
        image_mean=[0.5, 0.5, 0.5], image_std=[0.25, 0.25, 0.25],
    ).save_pretrained(tmp_path)  # fmt: skip

    ours, preprocess = clip_model.create_model_and_transforms(str(tmp_path))
    assert ours.cfg.quick_gelu == (hidden_act == "quick_gelu")
    assert ours.cfg.text.heads == 4 and ours.cfg.vision.heads == 4
    assert ours.preprocess_cfg.image_size == 32 and ours.preprocess_cfg.mean == (0.5, 0.5, 0.5)
    assert ours.weights_sha256 == clip_model.pretrained.file_sha256(tmp_path / weights_file)

    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    tokens = _tokens()
    with torch.inference_mode():
        ref_img = _features(hf.get_image_features(pixel_values=images))
        ref_txt = _features(hf.get_text_features(input_ids=tokens))
        _assert_close(ours.encode_image(images), ref_img)
        _assert_close(ours.encode_text(tokens), ref_txt)
        assert torch.allclose(ours.logit_scale, hf.logit_scale)


def test_hf_folder_preprocess_matches_clip_image_processor(tmp_path):
    """An odd excess over the crop (45x33 -> 43x32, offset 5.5) is where the crop's rounding
    shows: transformers floors it. Pixel values may differ by one uint8 level (its resize
    round-trips through float)."""
    from PIL import Image
    from transformers import CLIPImageProcessor

    _hf_model("quick_gelu").save_pretrained(tmp_path)
    proc = CLIPImageProcessor(
        crop_size={"height": 32, "width": 32}, size={"shortest_edge": 32},
        image_mean=[0.5, 0.5, 0.5], image_std=[0.25, 0.25, 0.25],
    )  # fmt: skip
    proc.save_pretrained(tmp_path)
    _, preprocess = clip_model.create_model_and_transforms(str(tmp_path))
    rng = np.random.default_rng(0)
    for w, h in [(45, 33), (33, 46), (64, 40)]:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        want = proc(img, return_tensors="np")["pixel_values"][0]
        got = preprocess(img).numpy()
        assert got.shape == want.shape == (3, 32, 32)
        assert np.abs(got - want).max() <= 1.01 / 255 / 0.25, (w, h)


def test_hf_folder_without_weights_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "clip"}))
    with pytest.raises(CheckpointError, match="model.safetensors"):
        clip_model.create_model(str(tmp_path))


def test_hf_folder_of_another_model_type_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "siglip"}))
    with pytest.raises(CheckpointError, match="siglip"):
        read_checkpoint(tmp_path)


# ---------------------------------------------------------------- TorchScript archives


@pytest.mark.parametrize(("name", "half"), [("ViT-tiny-test-quickgelu", False),
                                            ("RN-tiny-test-quickgelu", True)])  # fmt: skip
def test_torchscript_archive_matches_open_clip(tmp_path, name, half):
    ref = _open_clip_tiny(name, seed=11)
    size = clip_model.get_model_config(name).vision.image_size
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(2))
    tokens = _tokens()
    path = tmp_path / "model.pt"
    with warnings.catch_warnings():
        # Building the fixture needs TorchScript, which torch now flags as deprecated; the
        # tracer also warns about shape-dependent branches that are constant here.
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace_module(
            ref, {"encode_image": (images,), "encode_text": (tokens,)}, check_trace=False
        )
        if half:
            # OpenAI's released archives hold float16 weights.
            traced = traced.half()
            ref = ref.half().float()
        torch.jit.save(traced, path)

    ckpt = read_checkpoint(path)
    assert ckpt.format == "torchscript"
    # Every weight, and nothing else (open_clip's causal mask is not a weight).
    assert set(ckpt.state_dict) == set(ref.state_dict())
    ours, _ = clip_model.create_model_and_transforms(str(path))
    assert ours.name == name and ours.cfg.quick_gelu
    with torch.inference_mode():
        _assert_close(ours.encode_image(images), ref.encode_image(images))
        _assert_close(ours.encode_text(tokens), ref.encode_text(tokens))


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_torchscript_with_foreign_global_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("evil/data.pkl", pickle.dumps({"w": _RunsCode(marker)}, protocol=2))
        z.writestr("evil/constants.pkl", pickle.dumps((), protocol=2))
    with pytest.raises(CheckpointError, match="refused.*system"):
        read_torchscript(path)
    with pytest.raises(CheckpointError):
        clip_model.create_model(str(path))
    assert not marker.exists()


def test_pickled_code_in_state_dict_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"token_embedding.weight": _RunsCode(marker)}, path)
    with pytest.raises(CheckpointError, match="refused to unpickle"):
        clip_model.create_model("ViT-tiny-test", pretrained=str(path))
    assert not marker.exists()


# ---------------------------------------------------------------- state dicts and inference


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    ref = _open_clip_tiny("ViT-tiny-test", seed=3)
    path = tmp_path_factory.mktemp("tiny") / "tiny.safetensors"
    save_file(ref.state_dict(), str(path))
    return ref, path


def test_training_checkpoint_wrapper_is_unwrapped(tiny, tmp_path):
    ref, _ = tiny
    path = tmp_path / "epoch_3.pt"
    sd = {f"module.{k}": v for k, v in ref.state_dict().items()}
    torch.save({"epoch": 3, "state_dict": sd, "optimizer": {"lr": torch.tensor(1e-4)}}, path)
    ours, _ = clip_model.create_model("ViT-tiny-test", pretrained=str(path))
    with torch.inference_mode():
        _assert_close(ours.encode_text(_tokens()), ref.encode_text(_tokens()))


def test_path_alone_picks_registered_head_count(tiny):
    # Shapes alone would suggest width // 64 = 1 head; the matching registered config says 4.
    _, path = tiny
    ours, _ = clip_model.create_model(str(path), quick_gelu=False)
    assert ours.name == "ViT-tiny-test" and ours.cfg.vision.heads == 4


def test_safetensors_metadata_states_the_architecture(tiny, tmp_path):
    # A GELU model saved with its config needs no quick_gelu hint when loaded by path alone.
    ref, _ = tiny
    cfg = clip_model.get_model_config("ViT-tiny-test")
    path = tmp_path / "with-config.safetensors"
    save_file(ref.state_dict(), str(path), metadata={"clip_config": json.dumps(cfg.to_dict())})
    ours, _ = clip_model.create_model(str(path))
    assert ours.name == "ViT-tiny-test" and not ours.cfg.quick_gelu
    with torch.inference_mode():
        _assert_close(ours.encode_text(_tokens()), ref.encode_text(_tokens()))
    bad = tmp_path / "bad-config.safetensors"
    save_file(ref.state_dict(), str(bad), metadata={"clip_config": "{not json"})
    with pytest.raises(CheckpointError, match="bad clip_config metadata"):
        clip_model.create_model(str(bad))


def test_weights_of_another_architecture_are_a_clear_error(tiny):
    _, path = tiny
    with pytest.raises(CheckpointError, match="do not fit architecture RN-tiny-test"):
        clip_model.create_model("RN-tiny-test", pretrained=str(path))


def test_non_clip_and_corrupt_files_are_clear_errors(tmp_path):
    other = tmp_path / "resnet.safetensors"
    save_file({"fc.weight": torch.zeros(2, 2)}, str(other))
    with pytest.raises(CheckpointError, match="not a CLIP state dict"):
        clip_model.create_model(str(other))
    truncated = tmp_path / "truncated.pt"
    torch.save({"token_embedding.weight": torch.zeros(8, 4)}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:40])
    with pytest.raises(CheckpointError):
        clip_model.create_model(str(truncated))
    with pytest.raises(FileNotFoundError):
        clip_model.create_model("ViT-B-32", pretrained=str(tmp_path / "missing.pt"))


def test_unknown_names_and_tags_are_clear_errors():
    with pytest.raises(ValueError, match="unknown model 'ViT-Q-99'"):
        clip_model.create_model("ViT-Q-99")
    with pytest.raises(ValueError, match="unknown pretrained tag 'nonesuch'.*openai"):
        clip_model.create_model("ViT-B-32", pretrained="nonesuch")
    with pytest.raises(ValueError, match="precision"):
        clip_model.create_model("ViT-tiny-test", precision="fp8")


def test_list_models_names_every_openai_architecture():
    names = set(clip_model.list_models())
    for arch in ("ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-L-14-336", "RN50", "RN101", "RN50x4"):
        assert {arch, f"{arch}-quickgelu"} <= names
        assert clip_model.get_model_config(f"{arch}-quickgelu").quick_gelu


def test_random_init_model_has_identity_and_unit_norm_features():
    model, pp = clip_model.create_model("RN-tiny-test")
    assert model.name == "RN-tiny-test" and model.weights_sha256 is None
    assert pp.image_size == 64 and not model.training
    with torch.inference_mode():
        img = model.encode_image(torch.randn(3, 3, 64, 64), normalize=True)
        txt = model.encode_text(_tokens(), normalize=True)
    assert img.shape == (3, 32) and txt.shape == (3, 32)
    assert torch.allclose(img.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(txt.norm(dim=-1), torch.ones(3), atol=1e-5)


def test_loading_weights_leaves_torch_dynamo_unimported():
    # Building on the meta device once ran nn.Embedding's normal_ there, whose decomposition
    # imports torch._dynamo: ~150 MiB and ~0.9 s in every process that loads a model.
    code = (
        "import sys, torch, clip_model\n"
        "model, _ = clip_model.create_model('tiny-synthetic', pretrained='synthetic')\n"
        "assert not model.token_embedding.weight.is_meta\n"
        "with torch.inference_mode(), torch.autocast('cpu', dtype=torch.bfloat16):\n"
        "    model.encode_image(torch.zeros(2, 3, 64, 64))\n"
        "    model.encode_text(torch.zeros(2, 77, dtype=torch.long))\n"
        "assert 'torch._dynamo' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_seeded_random_init_of_the_token_embedding_is_nn_embeddings():
    from clip_model.model import _Embedding

    torch.manual_seed(5)
    ours = _Embedding(50, 8).weight.detach()
    torch.manual_seed(5)
    ref = torch.nn.Embedding(50, 8).weight.detach()
    assert torch.equal(ours, ref) and ours.std() > 0.5
    with torch.device("meta"):
        assert _Embedding(50, 8).weight.is_meta


def test_text_features_do_not_depend_on_batch_companions(tiny):
    # The encoder stops at the batch's longest EOT; a short caption must get the same feature
    # alone (few positions) as next to a long one (many positions).
    ref, path = tiny
    ours, _ = clip_model.create_model("ViT-tiny-test", pretrained=str(path))
    long = "a very long caption " * 10
    tokens = clip_model.tokenize(["a cat", long])
    with torch.inference_mode():
        alone = ours.encode_text(tokens[:1])
        batched = ours.encode_text(tokens)
        _assert_close(alone[0], batched[0])
        _assert_close(batched, ref.encode_text(tokens))
        assert ours.encode_text(tokens[:0]).shape == (0, 32)
        # Large batches are encoded in length-sorted chunks; rows must come back in order.
        g = torch.Generator().manual_seed(8)
        lengths = torch.randint(1, 76, (100,), generator=g)
        many = torch.zeros(100, 77, dtype=torch.long)
        for i, n in enumerate(lengths.tolist()):
            many[i, 0], many[i, n + 1] = 49406, 49407
            many[i, 1 : n + 1] = torch.randint(1, 49406, (n,), generator=g)
        _assert_close(ours.encode_text(many), ref.encode_text(many))


def test_encoders_reject_wrong_shapes():
    model, _ = clip_model.create_model("ViT-tiny-test")
    with pytest.raises(ValueError, match=r"\[N, 3, 32, 32\]"):
        model.encode_image(torch.zeros(1, 3, 64, 64))
    with pytest.raises(ValueError, match="L<=77"):
        model.encode_text(torch.zeros(1, 78, dtype=torch.long))
    with pytest.raises(ValueError, match="integers"):
        model.encode_text(torch.zeros(1, 77))


@pytest.mark.parametrize("precision", ["fp16", "bf16", "amp"])
def test_precision_casts_weights(tiny, precision):
    _, path = tiny
    fp32, _ = clip_model.create_model("ViT-tiny-test", pretrained=str(path))
    model, _ = clip_model.create_model("ViT-tiny-test", pretrained=str(path), precision=precision)
    expected = {"fp16": torch.float16, "bf16": torch.bfloat16, "amp": torch.float32}[precision]
    assert all(p.dtype == expected for p in model.parameters())
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        low = model.encode_image(images, normalize=True)
        ref = fp32.encode_image(images, normalize=True)
    assert low.dtype == expected
    assert (low.float() - ref).abs().max().item() < 0.03


def test_bundled_synthetic_weights_load_by_tag():
    entry = clip_model.pretrained.get_pretrained_entry("tiny-synthetic", "synthetic")
    if not Path(clip_model.__file__).parent.joinpath("weights", "tiny-synthetic.safetensors").exists():
        pytest.fail("bundled tiny-synthetic weights missing from clip_model/weights/")
    model, _ = clip_model.create_model_and_transforms("tiny-synthetic", pretrained="synthetic")
    assert model.name == "tiny-synthetic"
    assert model.weights_sha256 == entry.sha256
    assert model.preprocess_cfg == entry.preprocess


def test_config_json_round_trips():
    for path in CONFIG_DIR.glob("*.json"):
        d = json.loads(path.read_text())
        cls = clip_model.TowersConfig if d.get("type") == "towers" else clip_model.CLIPConfig
        cfg = cls.from_dict(d)
        assert cls.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unsupported architecture config keys"):
        clip_model.CLIPConfig.from_dict({"embed_dim": 8, "vision_cfg": {"timm_model_name": "x"}})


def test_assign_state_dict_fills_counters_upcasts_and_names_what_does_not_fit() -> None:
    from clip_model.checkpoints import assign_state_dict

    def module() -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))

    src = module().half()
    sd = {k: v for k, v in src.state_dict().items() if not k.endswith("num_batches_tracked")}
    dst = module()
    assign_state_dict(dst, sd, "toy")
    assert dst[0].weight.dtype == torch.float32
    assert torch.equal(dst[0].weight, src[0].weight.float())
    assert int(dst[1].num_batches_tracked) == 0
    bad = dict(sd, extra=torch.zeros(1))
    bad["0.weight"] = torch.zeros(4, 3)
    del bad["0.bias"]
    with pytest.raises(CheckpointError) as err:
        assign_state_dict(module(), bad, "toy")
    msg = str(err.value)
    assert "architecture toy" in msg and "missing (1): 0.bias" in msg
    assert "unexpected (1): extra" in msg and "0.weight: file (4, 3) vs model (2, 3)" in msg
