"""HF text towers: Chinese-CLIP folders, open_clip's xlm-roberta-base-ViT-B-32 and an M-CLIP
pairing load through clip_model.create_model and match their reference implementations at
random weights in the published layer shapes (vocabularies sized to the tokenizers the tests
train, see testkit/hf_folders.py for why), and their tokenizers give the ids of each folder's
own processor on 2,000+ hostile multi-script strings."""

from __future__ import annotations

import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import clip_model
from testkit.multilingual import hostile_strings

pytest.importorskip("transformers")

N_STRINGS = 2048


def _strip_right(row: list[int], pad: int) -> list[int]:
    while row and row[-1] == pad:
        row = row[:-1]
    return row


@pytest.fixture(scope="module")
def strings() -> list[str]:
    texts = hostile_strings(N_STRINGS, seed=16)
    # The kinds the acceptance names are all there: CJK, kana, Hangul, Arabic, Devanagari,
    # Cyrillic, emoji, empty, and strings far past every max length.
    joined = "".join(texts)
    for lo, hi in ((0x4E00, 0x9FFF), (0x3041, 0x30FA), (0xAC00, 0xD7A3), (0x0621, 0x064A),
                   (0x0905, 0x0939), (0x0410, 0x044F), (0x1F300, 0x1F64F)):  # fmt: skip
        assert any(lo <= ord(c) <= hi for c in joined), hex(lo)
    assert "" in texts and max(len(t) for t in texts) > 1000
    return texts


@pytest.fixture(scope="module")
def parity_texts(strings) -> list[str]:
    return strings[:40] + ["两个红色圆形位于左上角", "два красных круга", "दो लाल वृत्त", ""]


def _images(n: int, size: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(n)
    return torch.randn(n, 3, size, size, generator=g)


# ---------------------------------------------------------------- Chinese-CLIP


@pytest.fixture(scope="module")
def chinese_clip(tmp_path_factory):
    from transformers import AutoProcessor, ChineseCLIPModel

    from testkit.hf_folders import chinese_clip_folder

    folder = chinese_clip_folder(tmp_path_factory.mktemp("hf") / "chinese-clip")
    ref = ChineseCLIPModel.from_pretrained(folder).eval()
    ours, pp = clip_model.create_model(str(folder), device="cpu")
    return folder, ref, AutoProcessor.from_pretrained(folder), ours, pp


def test_chinese_clip_folder_loads_by_itself_and_matches_transformers(chinese_clip, parity_texts):
    folder, ref, processor, ours, pp = chinese_clip
    assert ours.name == folder.name and ours.embed_dim == 512 and ours.context_length == 52
    assert len(ours.weights_sha256) == 64
    assert (pp.image_size, pp.resize_mode, pp.interpolation) == (224, "shortest", "bicubic")
    x = _images(3, 224)
    enc = processor(text=parity_texts, truncation=True, padding=True, return_tensors="pt")
    with torch.inference_mode():
        want_img = ref.get_image_features(pixel_values=x).pooler_output
        want_txt = ref.get_text_features(**enc).pooler_output
        got_img = ours.encode_image(x)
        got_txt = ours.encode_text(ours.tokenizer(parity_texts))
    assert got_img.shape == want_img.shape == (3, 512)
    assert (got_img - want_img).abs().max() <= 1e-4
    assert (got_txt - want_txt).abs().max() <= 1e-4
    assert want_txt.abs().max() > 0.05  # not a vacuous comparison of zeros


def test_chinese_clip_tokenizer_matches_processor(chinese_clip, strings):
    _, _, processor, ours, _ = chinese_clip
    want = processor(text=strings, truncation=True)["input_ids"]
    got = ours.tokenizer.token_ids(strings)
    assert got == want
    assert max(len(r) for r in got) == 52  # the long strings were truncated, as the processor does


def test_chinese_clip_preprocess_cfg_reproduces_the_pil_image_processor(chinese_clip):
    from transformers.models.chinese_clip.image_processing_pil_chinese_clip import (
        ChineseCLIPImageProcessorPil,
    )

    from clip_model.transform import normalize_uint8, resize_crop_uint8

    folder, _, processor, _, pp = chinese_clip
    ip = processor.image_processor
    pil = ChineseCLIPImageProcessorPil(
        size=ip.size, crop_size=ip.crop_size, resample=ip.resample, image_mean=ip.image_mean,
        image_std=ip.image_std,
    )  # fmt: skip
    rng = np.random.default_rng(0)
    for w, h in ((300, 200), (224, 511), (97, 130)):
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        want = pil(images=img, return_tensors="pt")["pixel_values"][0]
        got = normalize_uint8(resize_crop_uint8(img, pp)[None], pp)[0]
        assert got.shape == want.shape
        assert (got - want).abs().max() <= 1e-4, (w, h)


# ---------------------------------------------------------------- open_clip xlm-roberta


@pytest.fixture(scope="module")
def xlmr(tmp_path_factory):
    from testkit.hf_folders import open_clip_xlmr_folder

    folder, ref, ref_tok = open_clip_xlmr_folder(tmp_path_factory.mktemp("hf") / "xlmr")
    weights = folder / "open_clip_model.safetensors"
    ours, pp = clip_model.create_model("xlm-roberta-base-ViT-B-32", pretrained=str(weights), device="cpu")
    return folder, ref, ref_tok, ours, pp


def test_open_clip_xlm_roberta_matches_open_clip(xlmr, parity_texts):
    _, ref, ref_tok, ours, pp = xlmr
    assert ours.name == "xlm-roberta-base-ViT-B-32" and ours.embed_dim == 512
    assert ours.tokenizer.pad_id == 1 and ours.context_length == 77 and pp.image_size == 224
    x = _images(2, 224)
    with torch.inference_mode():
        want_img, got_img = ref.encode_image(x), ours.encode_image(x)
        want_txt = ref.encode_text(ref_tok(parity_texts))
        got_txt = ours.encode_text(ours.tokenizer(parity_texts))
    assert (got_img - want_img).abs().max() <= 1e-4
    assert (got_txt - want_txt).abs().max() <= 1e-4
    assert want_txt.abs().max() > 0.05


def test_open_clip_xlm_roberta_tokenizer_matches_open_clip(xlmr, strings):
    _, _, ref_tok, ours, _ = xlmr
    want = [_strip_right(r, 1) for r in ref_tok(strings).tolist()]
    assert ours.tokenizer.token_ids(strings) == want


def test_open_clip_architecture_without_its_tokenizer_is_one_clear_error(xlmr, tmp_path):
    folder = xlmr[0]
    lonely = tmp_path / "w.safetensors"
    lonely.write_bytes((folder / "open_clip_model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="tokenizer.*text_model=FOLDER"):
        clip_model.create_model("xlm-roberta-base-ViT-B-32", pretrained=str(lonely), device="cpu")
    # Named separately, as open_clip's hf_model_name names a local folder, it loads.
    model, _ = clip_model.create_model(
        "xlm-roberta-base-ViT-B-32", pretrained=str(lonely), text_model=str(folder), device="cpu"
    )
    assert model.tokenizer.pad_id == 1


# ---------------------------------------------------------------- M-CLIP pairing


@pytest.fixture(scope="module")
def mclip(tmp_path_factory):
    from clip_model.model import CLIP
    from testkit.hf_folders import mclip_folder

    tmp = tmp_path_factory.mktemp("hf")
    folder, ref = mclip_folder(tmp / "mclip")
    torch.manual_seed(1)
    image_clip = CLIP(clip_model.get_model_config("ViT-B-32")).eval()
    torch.save(image_clip.state_dict(), tmp / "ViT-B-32.pt")
    ours, pp = clip_model.create_model(
        "ViT-B-32", pretrained=str(tmp / "ViT-B-32.pt"), text_model=str(folder), device="cpu"
    )
    return folder, ref, image_clip, ours, pp


def test_mclip_pairing_matches_sentence_transformers_and_the_image_tower(mclip, parity_texts):
    folder, ref, image_clip, ours, _ = mclip
    assert ours.name == f"ViT-B-32+{folder.name}" and ours.embed_dim == 512
    assert ours.context_length == 128  # sentence_bert_config.json max_seq_length
    with torch.inference_mode():
        want_txt = ref.encode(parity_texts, convert_to_tensor=True, batch_size=16)
        got_txt = ours.encode_text(ours.tokenizer(parity_texts))
        x = _images(2, 224)
        want_img, got_img = image_clip.encode_image(x), ours.encode_image(x)
    assert (got_txt - want_txt).abs().max() <= 1e-4
    assert want_txt.abs().max() > 0.05
    assert torch.equal(got_img, want_img)


def test_mclip_tokenizer_matches_sentence_transformers(mclip, strings):
    _, ref, _, ours, _ = mclip
    feats = ref.preprocess(strings)
    want = [
        [t for t, m in zip(row, mask, strict=True) if m]
        for row, mask in zip(feats["input_ids"].tolist(), feats["attention_mask"].tolist(), strict=True)
    ]
    assert ours.tokenizer.token_ids(strings) == want


def test_sentence_transformers_folder_alone_asks_for_an_image_tower(mclip):
    with pytest.raises(ValueError, match="pair it with an image tower"):
        clip_model.create_model(str(mclip[0]), device="cpu")


# ---------------------------------------------------------------- the contract


def test_every_tower_keeps_the_model_contract(chinese_clip, xlmr, mclip):
    for ours in (chinese_clip[3], xlmr[3], mclip[3]):
        tok = ours.tokenizer
        ids = tok.token_ids(["两个红色圆形", "a much longer caption about two red circles"])
        width = max(map(len, ids)) + 3  # extra padding columns change nothing
        rows = torch.full((2, width), tok.pad_id, dtype=torch.long)
        for i, r in enumerate(ids):
            rows[i, : len(r)] = torch.tensor(r)
        with torch.inference_mode():
            a = ours.encode_text(rows, normalize=True)
            b = ours.encode_text(rows[:1, : len(ids[0])], normalize=True)
        assert torch.allclose(a[0], b[0], atol=1e-5)
        assert torch.allclose(a.norm(dim=-1), torch.ones(2), atol=1e-5)
        assert isinstance(ours.embed_dim, int) and ours.logit_scale.ndim == 0
        back = pickle.loads(pickle.dumps(tok))
        assert back.token_ids(["два красных круга"]) == tok.token_ids(["два красных круга"])


def test_hf_model_without_transformers_is_one_clear_error():
    code = (
        "import sys\n"
        "sys.modules['transformers'] = None  # as if the extra were not installed\n"
        "import clip_model\n"
        "m, _ = clip_model.create_model('tiny-synthetic', 'synthetic', device='cpu')  # CLIP still loads\n"
        "try:\n"
        "    clip_model.create_model('multilingual-synthetic', device='cpu')\n"
        "except ImportError as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "pip install 'clipcurate[hf]'" in out.stdout
    assert out.stdout.count("\n") == 1  # one line


# ---------------------------------------------------------------- our own towers


def test_trained_tower_checkpoint_loads_back_by_path_and_by_name(tmp_path):
    """clip_model.train writes ResNet + BERT towers as one safetensors file that carries its
    architecture, tokenizer and preprocessing: it loads by its path alone or as the weights of
    the architecture's name, and gives the trained model's embeddings."""
    from dataclasses import replace

    from clip_model import train as tr
    from testkit.train_tiny import PROVIDERS

    recipe = replace(tr.RECIPES["towers-small"], steps=2, batch_size=8, warmup_steps=1, data_workers=0)
    model, result = tr.run_recipe(recipe, 0, PROVIDERS)
    path = tr.save_weights(model, tmp_path / "t.safetensors", dtype=torch.float32,
                           metadata=tr.weights_metadata(model, recipe, 0, result))  # fmt: skip
    by_path, pp = clip_model.create_model_and_transforms(str(path), device="cpu")
    by_name, _ = clip_model.create_model("multilingual-synthetic", pretrained=str(path), device="cpu")
    x = torch.randn(2, 3, 64, 64)
    texts = ["两个红色圆形", "две красные звезды"]
    with torch.inference_mode():
        want_img, want_txt = model.encode_image(x), model.encode_text(model.tokenizer(texts))
        for loaded in (by_path, by_name):
            assert loaded.weights_sha256 == clip_model.pretrained.file_sha256(path)
            assert torch.allclose(loaded.encode_image(x), want_img, atol=1e-6)
            assert torch.allclose(loaded.encode_text(loaded.tokenizer(texts)), want_txt, atol=1e-6)
    assert by_path.preprocess_cfg == model.preprocess_cfg and by_path.name == "t"
    assert pp(Image.new("RGB", (80, 64))).shape == (3, 64, 64)


def test_bf16_tower_agrees_with_fp32():
    """Reduced precision (what the job uses on a GPU) keeps the embeddings' direction."""
    torch.manual_seed(0)
    fp32, _ = clip_model.create_model("multilingual-synthetic", device="cpu")
    bf16, _ = clip_model.create_model("multilingual-synthetic", device="cpu")
    bf16.load_state_dict(fp32.state_dict())
    bf16 = bf16.to(torch.bfloat16)
    ids = fp32.tokenizer(["两个红色圆形位于左上角", "a hazard sign", "दो लाल वृत्त"])
    x = torch.randn(3, 3, 64, 64)
    with torch.inference_mode():
        for a, b in ((fp32.encode_text(ids, normalize=True), bf16.encode_text(ids, normalize=True)),
                     (fp32.encode_image(x, normalize=True), bf16.encode_image(x, normalize=True))):  # fmt: skip
            assert b.dtype == torch.bfloat16
            assert (a * b.float()).sum(-1).min() > 0.99


def test_towers_run_without_torchvision_or_timm():
    """The runtime ships without torchvision (and so without timm): the ResNet is our own."""
    code = (
        "import sys\n"
        "sys.modules['torchvision'] = None\n"
        "sys.modules['timm'] = None\n"
        "import torch, clip_model\n"
        "m, _ = clip_model.create_model('multilingual-synthetic', device='cpu')\n"
        "assert m.encode_image(torch.randn(1, 3, 64, 64)).shape == (1, 128)\n"
        "assert m.encode_text(m.tokenizer(['两个红色圆形'])).shape == (1, 128)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


@pytest.mark.parametrize(
    ("resnet", "text"),
    [
        ("resnet50", {"model_type": "distilbert", "dim": 64, "n_layers": 2, "n_heads": 2, "hidden_dim": 128}),
        ("resnet34", {"model_type": "bert", "hidden_size": 64, "num_hidden_layers": 2,
                      "num_attention_heads": 2, "intermediate_size": 128}),
    ],
)  # fmt: skip
def test_resnet_and_any_bert_config_train_a_step(resnet, text):
    """ResNet18/34/50 shapes beside a DistilBERT or BERT config, with projection heads and a
    learned temperature: one optimiser step moves both towers and the temperature."""
    from clip_model.config import HFTextConfig, ResNetConfig, TowersConfig
    from clip_model.hf_formats import load_config_tokenizer
    from clip_model.hf_model import TowerCLIP
    from clip_model.train import contrastive_loss

    tok_src = "package://clip_model/vocab/multilingual-synthetic-tokenizer.json"
    cfg = TowersConfig(
        embed_dim=32,
        vision=ResNetConfig.from_dict({"name": resnet, "image_size": 64, "width": 16}),
        text=HFTextConfig(hf_config=dict(text, vocab_size=853, max_position_embeddings=64),
                          context_length=64, proj="head", tokenizer=tok_src),
        vision_proj="head",
    )  # fmt: skip
    torch.manual_seed(0)
    model = TowerCLIP(cfg, load_config_tokenizer(cfg))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = model.tokenizer(["a red circle", "两个蓝色正方形", "две звезды", "दो लाल वृत्त"])
    loss = contrastive_loss(model.encode_image(torch.randn(4, 3, 64, 64), normalize=True),
                            model.encode_text(ids, normalize=True), model.logit_scale)  # fmt: skip
    loss.backward()
    opt.step()
    after = model.state_dict()
    for prefix in ("visual.trunk.", "visual.head.", "text.transformer.", "text.proj.", "logit_scale"):
        assert any(not torch.equal(before[k], after[k]) for k in after if k.startswith(prefix)), prefix
