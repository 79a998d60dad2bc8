"""The parts of clip_model that CPU workers use (config, token ids, resize + crop) import no
torch, and token_ids gives exactly the ids tokenize() puts before its padding."""

from __future__ import annotations

import pickle
import subprocess
import sys

import numpy as np
import pytest

from clip_model.tokenizer import default_tokenizer


def test_worker_side_imports_do_not_import_torch():
    code = (
        "import sys, clip_model, clip_model.config\n"
        "from clip_model.tokenizer import default_tokenizer\n"
        "from clip_model.transform import resize_crop_uint8\n"
        "from PIL import Image\n"
        "cfg = clip_model.PreprocessConfig(image_size=32)\n"
        "assert resize_crop_uint8(Image.new('RGB', (50, 40)), cfg).shape == (32, 32, 3)\n"
        "assert default_tokenizer().token_ids(['a cat'])[0][0] == 49406\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] == 'torch')\n"
        "assert not bad, bad[:5]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("context_length", [5, 16, 77])
def test_token_ids_are_tokenize_rows_without_padding(context_length):
    tok = default_tokenizer()
    texts = ["", "a photo of a cat", "Ünïcödé  text &amp; more", "word " * 100, "猫の写真", "a"]
    rows = tok(texts, context_length=context_length).numpy()
    ids = tok.with_context_length(context_length).token_ids(texts)
    for row, got in zip(rows, ids, strict=True):
        eot = int(np.argmax(row))
        assert got == row[: eot + 1].tolist()
        assert len(got) <= context_length
        assert not row[eot + 1 :].any()  # the rest is padding with pad_id
    assert tok.pad_id == 0


def test_token_ids_names_a_non_string():
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        default_tokenizer().token_ids(["ok", None])  # type: ignore[list-item]


def test_tokenizer_pickles_by_reference_and_keeps_its_context_length():
    tok = default_tokenizer().with_context_length(12)
    blob = pickle.dumps(tok)
    assert len(blob) < 500  # not the merge tables
    back = pickle.loads(blob)
    assert back.context_length == 12
    assert back.token_ids(["a red circle on a blue square"]) == tok.token_ids(["a red circle on a blue square"])


def test_model_tokenizer_matches_its_context_length():
    import clip_model

    model, _ = clip_model.create_model("tiny-synthetic", "synthetic")
    assert model.tokenizer.context_length == model.context_length


def test_hf_tokenizer_is_torch_free_picklable_and_cached_per_process():
    """The HF towers' tokenizer (the bundled multilingual model's here) runs in a worker that
    never imports torch, and unpickling it again in the same process reuses the parsed one."""
    code = (
        "import sys, pickle\n"
        "from pathlib import Path\n"
        "import clip_model\n"
        "from clip_model.hf_tokenizer import HFTokenizer\n"
        "vocab = Path(clip_model.__file__).parent / 'vocab' / 'multilingual-synthetic-tokenizer.json'\n"
        "tok = HFTokenizer(vocab.read_text(), 64, 0)\n"
        "ids = tok.token_ids(['两个红色圆形', 'два красных круга', 'दो लाल वृत्त', '', 'x ' * 200])\n"
        "assert ids[0][0] == 2 and ids[0][-1] == 3 and len(ids[4]) == 64, ids\n"
        "blob = pickle.dumps(tok)\n"
        "assert len(blob) < 20000, len(blob)\n"
        "a, b = pickle.loads(blob), pickle.loads(blob)\n"
        "assert a is b and a.token_ids(['два красных круга']) == ids[1:2]\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers'))\n"
        "assert not bad, bad[:5]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_tower_model_tokenizer_pads_with_its_own_pad_id():
    import clip_model

    model, _ = clip_model.create_model("multilingual-synthetic", device="cpu")
    tok = model.tokenizer
    assert tok.context_length == model.context_length == 64
    rows = tok(["两个红色圆形", "a hazard sign on a blue background"])
    assert rows.shape == (2, 64) and rows.dtype.is_floating_point is False
    lengths = [len(r) for r in tok.token_ids(["两个红色圆形", "a hazard sign on a blue background"])]
    assert (rows[0, lengths[0]:] == tok.pad_id).all() and (rows[0, : lengths[0]] != tok.pad_id).all()
    back = pickle.loads(pickle.dumps(tok))
    assert back.token_ids(["два красных круга"]) == tok.token_ids(["два красных круга"])
