"""Our CLIP reproduces open_clip's features for the same weights (fp32, CPU).

open_clip is the independent reference: each test builds an open_clip model with seeded random
weights, saves its state dict in one of the formats users have on disk, loads it through
clip_model.create_model_and_transforms and compares encode_image / encode_text.
"""

from __future__ import annotations

import math

import open_clip
import pytest
import torch

import clip_model

TOL = 1e-4
CAPTIONS = [
    "a photo of a cat",
    "",
    "an aerial photograph of a harbour at dusk with dozens of small fishing boats moored in "
    "rows, warehouses along the quay and a lighthouse on the breakwater",
    "DSC_0042.JPG",
]


def _fill_random(model: torch.nn.Module, seed: int, fp16_exact: bool = False) -> None:
    """Give every parameter and buffer seeded random values of a sensible scale.

    Drawing hundreds of millions of normals is slow on the CI box, so each tensor copies a
    window (at a random offset) of one 4M-value pool and is scaled by a power of two near
    1/sqrt(fan_in); with fp16_exact the values are rounded to fp16, so a float16 file of them
    holds exactly the fp32 model.
    """
    g = torch.Generator().manual_seed(seed)
    pool_size = 1 << 22
    pool = torch.randn(2 * pool_size, generator=g)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if not t.is_floating_point() or name.endswith("attn_mask"):
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
                continue
            if name == "logit_scale":
                t.fill_(4.0)
                continue
            flat = t.view(-1)
            for start in range(0, flat.numel(), pool_size):
                n = min(pool_size, flat.numel() - start)
                off = int(torch.randint(0, pool_size, (1,), generator=g))
                flat[start : start + n] = pool[off : off + n]
            if name.endswith(("text_projection", "proj")) and t.dim() == 2:
                fan_in = t.shape[0]  # used as x @ proj
            elif t.dim() >= 2:
                fan_in = t[0].numel()
            else:
                fan_in = 0
            if name.endswith(
                ("ln_1.weight", "ln_2.weight", "ln_pre.weight", "ln_post.weight", "ln_final.weight")
            ) or (".bn" in name and name.endswith("weight")):
                t.mul_(0.125).add_(1.0)  # norm gains near 1
            elif fan_in:
                t.mul_(2.0 ** round(math.log2(fan_in**-0.5)))
            else:
                t.mul_(2.0**-5)  # biases, embeddings of one vector
            if fp16_exact:
                # Tiny values become fp16 subnormals and lose bits; round through fp16 once.
                t.copy_(t.half().float())


def _random_openclip(name: str, seed: int, fp16_exact: bool = False) -> torch.nn.Module:
    # Built on the meta device: open_clip's own random init of ViT-L-14 alone takes ~15 s here.
    with torch.device("meta"):
        model = open_clip.create_model(name, device="meta")
    model = model.to_empty(device="cpu")
    # to_empty leaves the non-persistent causal mask uninitialised; rebuild it as open_clip does.
    if isinstance(getattr(model, "attn_mask", None), torch.Tensor):
        n = model.attn_mask.shape[0]
        model.attn_mask.copy_(torch.full((n, n), float("-inf")).triu_(1))
    _fill_random(model, seed, fp16_exact)
    return model.eval()


def _inputs(image_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(2, 3, image_size, image_size, generator=g)
    return images, clip_model.tokenize(CAPTIONS)


def _assert_parity(ours: torch.nn.Module, ref: torch.nn.Module, image_size: int) -> None:
    images, tokens = _inputs(image_size, seed=7)
    with torch.inference_mode():
        ref_img, ref_txt = ref.encode_image(images), ref.encode_text(tokens)
        our_img, our_txt = ours.encode_image(images), ours.encode_text(tokens)
    # Features of magnitude ~1 make the absolute tolerance meaningful.
    assert 0.05 < ref_img.abs().max() < 100 and 0.05 < ref_txt.abs().max() < 100
    assert our_img.shape == ref_img.shape and our_txt.shape == ref_txt.shape
    assert (our_img - ref_img).abs().max().item() <= TOL
    assert (our_txt - ref_txt).abs().max().item() <= TOL


def _save(sd: dict[str, torch.Tensor], path, fmt: str) -> None:
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        torch.save(sd, path)


@pytest.fixture(scope="module")
def vit_b_32(tmp_path_factory):
    """Random ViT-B-32 weights as a plain state dict, and open_clip references (GELU and
    QuickGELU) holding them."""
    ref = _random_openclip("ViT-B-32", seed=1)
    path = tmp_path_factory.mktemp("vit-b-32") / "vit-b-32.pt"
    torch.save(ref.state_dict(), path)
    with torch.device("meta"):
        ref_quick = open_clip.create_model("ViT-B-32-quickgelu", device="meta")
    ref_quick.load_state_dict(ref.state_dict(), assign=True)
    ref_quick.attn_mask = ref.attn_mask
    return {"path": path, "gelu": ref, "quick": ref_quick.eval()}


def test_vit_b_32_by_name(vit_b_32):
    path = vit_b_32["path"]
    ours, preprocess = clip_model.create_model_and_transforms("ViT-B-32", pretrained=str(path))
    assert ours.name == "ViT-B-32" and not ours.cfg.quick_gelu
    assert callable(preprocess)
    assert ours.weights_sha256 == clip_model.pretrained.file_sha256(path)
    _assert_parity(ours, vit_b_32["gelu"], 224)


def test_rn50_from_safetensors(tmp_path):
    ref = _random_openclip("RN50", seed=4)
    path = tmp_path / "rn50.safetensors"
    _save(ref.state_dict(), path, "safetensors")
    ours, _ = clip_model.create_model_and_transforms("RN50", pretrained=str(path))
    assert ours.name == "RN50"
    _assert_parity(ours, ref, 224)


@pytest.mark.slow
def test_vit_l_14_from_float16_file(tmp_path):
    # OpenAI's releases store fp16; the values here are fp16-exact, so fp32 parity still holds.
    ref = _random_openclip("ViT-L-14", seed=2, fp16_exact=True)
    path = tmp_path / "vit-l-14-fp16.bin"
    torch.save({k: v.half() for k, v in ref.state_dict().items()}, path)
    ours, _ = clip_model.create_model_and_transforms("ViT-L-14", pretrained=str(path))
    assert next(ours.parameters()).dtype == torch.float32
    _assert_parity(ours, ref, 224)


def test_quickgelu_by_name(vit_b_32):
    path = vit_b_32["path"]
    ours, _ = clip_model.create_model_and_transforms("ViT-B-32-quickgelu", pretrained=str(path))
    assert ours.name == "ViT-B-32-quickgelu" and ours.cfg.quick_gelu
    _assert_parity(ours, vit_b_32["quick"], 224)


@pytest.fixture(scope="module")
def quick_from_path(vit_b_32):
    ours, _ = clip_model.create_model_and_transforms(str(vit_b_32["path"]))
    return ours


def test_quickgelu_from_path_alone(vit_b_32, quick_from_path):
    # Architecture inferred from shapes; OpenAI-layout files default to QuickGELU.
    assert quick_from_path.name == "ViT-B-32-quickgelu"
    assert quick_from_path.cfg == clip_model.get_model_config("ViT-B-32-quickgelu")
    _assert_parity(quick_from_path, vit_b_32["quick"], 224)


def test_path_alone_with_gelu_told(vit_b_32):
    # quick_gelu=False overrides the OpenAI default; the features then match GELU open_clip
    # and no longer the QuickGELU one, so the parity above really pins the activation.
    ours, _ = clip_model.create_model_and_transforms(str(vit_b_32["path"]), quick_gelu=False)
    assert ours.name == "ViT-B-32"
    _assert_parity(ours, vit_b_32["gelu"], 224)
    _, tokens = _inputs(224, seed=7)
    with torch.inference_mode():
        diff = ours.encode_text(tokens) - vit_b_32["quick"].encode_text(tokens)
    assert diff.abs().max().item() > 1e-3


def test_forward_logits_match_open_clip(vit_b_32, quick_from_path):
    ref = vit_b_32["quick"]
    images, tokens = _inputs(224, seed=9)
    with torch.inference_mode():
        per_image, per_text = quick_from_path(images, tokens)
        img = ref.encode_image(images, normalize=True)
        txt = ref.encode_text(tokens, normalize=True)
        expected = ref.logit_scale.exp() * img @ txt.t()
    assert per_image.shape == (2, len(CAPTIONS)) and per_text.shape == (len(CAPTIONS), 2)
    assert (per_image - expected).abs().max().item() <= 1e-3
    assert torch.equal(per_text, per_image.t())


def test_the_class_token_shortcut_equals_the_whole_last_block_in_float64() -> None:
    """The image tower computes only the class token in its last block; in float64 that is
    the full block's class token to rounding, and the tower's output is the full stack's."""
    from clip_model.transformer import ResidualAttentionBlock

    torch.manual_seed(11)
    block = ResidualAttentionBlock(64, 4, 4.0, quick_gelu=True).double().eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.2)
    x = torch.randn(3, 17, 64, dtype=torch.float64)
    with torch.inference_mode():
        assert torch.allclose(block.first_token(x), block(x)[:, :1], rtol=0, atol=1e-12)

    model, _ = clip_model.create_model("ViT-B-32")
    visual = model.visual.double()
    images = torch.randn(2, 3, 224, 224, dtype=torch.float64)
    with torch.inference_mode():
        t = visual.conv1(images).flatten(2).transpose(1, 2)
        t = torch.cat([visual.class_embedding.expand(2, 1, -1), t], dim=1) + visual.positional_embedding
        full = visual.ln_post(visual.transformer(visual.ln_pre(t))[:, 0]) @ visual.proj
        assert torch.allclose(visual(images), full, rtol=0, atol=1e-10)
