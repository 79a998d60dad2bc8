"""PreprocessStage and EmbedStage called directly (no Ray), against open_clip as the reference.

The reference model is open_clip's own CLIP built from the tiny-synthetic architecture and
loaded with the very weights the stage's actor loads, fed by open_clip's preprocess and
tokenizer (full 77-token padding, one image at a time): an implementation that shares no code
with the stage's batching, length-sorted text chunks or uint8 -> device normalisation.
"""

from __future__ import annotations

import io
import json

import numpy as np
import open_clip
import pyarrow as pa
import pytest
import torch
from PIL import Image

import clip_model
from pipeline import schema as S
from pipeline.config import EmbedConfig
from pipeline.stages.embed import (
    EmbedStage,
    PreprocessStage,
    load_model,
    model_id,
    resolve_preprocess,
)
from pipeline.stages.shard import build_shard

ARCH = "tiny-synthetic"
CAPTIONS = [
    "a red circle",
    "two large blue squares in the top left and a hazard sign on a white background",
    "x",
    "a picture of three small green stars, gray background " * 8,  # long: truncated at 77
    "",
]


def _jpeg(size: tuple[int, int], seed: int, fmt: str = "JPEG", mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    img = Image.fromarray(arr, "RGB").convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def stage() -> EmbedStage:
    torch.manual_seed(0)
    s = EmbedStage(cfg=EmbedConfig(model=ARCH, inference_batch=2), preprocess=resolve_preprocess(ARCH, None))
    s.setup()
    return s


@pytest.fixture(scope="module")
def reference(stage: EmbedStage):
    """(open_clip model with the stage's weights, open_clip preprocess, open_clip tokenizer)."""
    cfg = json.loads((clip_model.factory._CONFIG_DIR / f"{ARCH}.json").read_text())
    ref = open_clip.model.CLIP(**cfg)
    ref.load_state_dict(stage._model.state_dict())
    pp = stage.preprocess
    preprocess = open_clip.transform.image_transform(pp.image_size, is_train=False, mean=pp.mean, std=pp.std)
    return ref.eval(), preprocess, open_clip.get_tokenizer("ViT-B-32")


def _rows(images: list[bytes | None], statuses: list[str], captions: list[str | None]) -> pa.Table:
    n = len(images)
    return pa.table(
        {
            S.KEY: [f"{i:09d}" for i in range(n)],
            S.SHARD: ["00000"] * n,
            S.CAPTION: captions,
            S.STATUS: statuses,
            S.ERROR: [None if s == S.OK else "upstream" for s in statuses],
            S.IMAGE: pa.array(images, pa.binary()),
        }
    )


def test_preprocess_pixels_and_tokens_match_open_clip(reference) -> None:
    _, ref_pp, ref_tok = reference
    pp = resolve_preprocess(ARCH, None)
    images = [
        _jpeg((120, 90), 1),
        _jpeg((33, 200), 2, "PNG", "RGBA"),
        _jpeg((64, 64), 3, "PNG", "L"),
        _jpeg((500, 301), 4, "WEBP"),
        None,
    ]
    batch = _rows(images, [S.OK] * 4 + ["http_404"], CAPTIONS)
    out = PreprocessStage(preprocess=pp).process_batch(batch)
    assert S.IMAGE not in out.column_names
    assert out.column(S.STATUS).to_pylist() == [S.OK] * 4 + ["http_404"]
    pixels = out.column(S.PIXELS).to_pylist()
    assert pixels[4] is None
    for data, px in zip(images[:4], pixels[:4], strict=True):
        arr = np.frombuffer(px, np.uint8).reshape(pp.image_size, pp.image_size, 3)
        ours = clip_model.transform.normalize_uint8(arr[None].copy(), pp)[0]
        ref = ref_pp(Image.open(io.BytesIO(data)))
        assert torch.allclose(ours, ref, atol=1e-5)
    full = ref_tok(CAPTIONS).numpy()
    for tokens, row in zip(out.column(S.TOKENS).to_pylist(), full, strict=True):
        end = int(row.argmax()) + 1
        assert tokens == row[:end].tolist()  # same ids, no padding
    assert len(out.column(S.TOKENS)[3].as_py()) == 77  # long caption truncated at the context


def test_preprocess_thumbnails_for_the_pixel_check() -> None:
    pp = resolve_preprocess(ARCH, None)
    images = [_jpeg((120, 90), 1), b"not an image", _jpeg((64, 64), 3, "PNG", "RGBA"), None]
    batch = _rows(images, [S.OK, S.OK, S.OK, "http_404"], ["a", "b", "c", "d"])
    assert S.IMAGE_THUMB not in PreprocessStage(preprocess=pp).process_batch(batch).column_names
    out = PreprocessStage(preprocess=pp, thumbnails=True).process_batch(batch)
    thumbs = out.column(S.IMAGE_THUMB).to_pylist()
    assert thumbs[1] is None and thumbs[3] is None  # undecodable, failed upstream
    assert out.column(S.STATUS).to_pylist()[1] == "preprocess_error"
    for i in (0, 2):
        ref = Image.open(io.BytesIO(images[i])).convert("RGB").resize((32, 32), Image.Resampling.BILINEAR)
        assert thumbs[i] == ref.tobytes() and len(thumbs[i]) == 32 * 32 * 3


def test_preprocess_records_bad_rows_and_reads_tars(tmp_path) -> None:
    pp = resolve_preprocess(ARCH, None)
    good = _jpeg((80, 60), 5)
    rows = pa.table(
        {
            S.KEY: ["000000000", "000000001", "000000002"],
            S.SHARD_ID: [0, 0, 0],
            S.CAPTION: ["a", "b", None],
            S.STATUS: [S.OK, S.OK, "timeout"],
            S.ERROR: [None, None, "deadline"],
            S.IMAGE: pa.array([good, b"not an image at all", None], pa.binary()),
            S.IMAGE_FORMAT: ["jpg", "jpg", None],
        }
    )
    files = build_shard(0, rows)
    (tmp_path / "00000.tar").write_bytes(files.tar)
    # What the shard stage passes on: no image bytes, a shard column. Row 3 claims ok but its
    # key is not in the tar.
    flowing = pa.table(
        {
            S.KEY: ["000000000", "000000001", "000000002", "000000003"],
            S.SHARD: ["00000"] * 4,
            S.CAPTION: ["a", "b", None, "d"],
            S.STATUS: [S.OK, S.OK, "timeout", S.OK],
            S.ERROR: [None, None, "deadline", None],
        }
    )
    out = PreprocessStage(preprocess=pp, shard_folder=str(tmp_path)).process_batch(flowing)
    status = out.column(S.STATUS).to_pylist()
    assert status == [S.OK, "preprocess_error", "timeout", "image_missing"]
    assert out.column(S.ERROR).to_pylist()[2] == "deadline"
    px = out.column(S.PIXELS).to_pylist()
    assert px[1:] == [None, None, None]
    want = clip_model.transform.resize_crop_uint8(Image.open(io.BytesIO(good)), pp)
    assert px[0] == want.tobytes()
    assert out.column(S.TOKENS).to_pylist()[2] is None  # no caption, no tokens
    assert out.column(S.TOKENS).to_pylist()[3] is not None  # failed rows keep their tokens

    missing = PreprocessStage(preprocess=pp, shard_folder=str(tmp_path / "nowhere"))
    out = missing.process_batch(flowing)
    assert out.column(S.STATUS).to_pylist() == ["image_missing"] * 2 + ["timeout", "image_missing"]
    assert "unreadable" in out.column(S.ERROR).to_pylist()[0]


def test_embed_matches_open_clip_reference(stage, reference) -> None:
    ref, ref_pp, ref_tok = reference
    images = [_jpeg((90 + 7 * i, 70 + 3 * i), 10 + i) for i in range(5)]
    statuses = [S.OK, S.OK, "http_500", S.OK, S.OK]
    captions = list(CAPTIONS[:4]) + [None]
    batch = _rows([im if s == S.OK else None for im, s in zip(images, statuses, strict=True)], statuses, captions)
    pre = PreprocessStage(preprocess=stage.preprocess).process_batch(batch)
    out = stage.process_batch(pre)
    assert out.num_rows == 5
    assert S.PIXELS not in out.column_names and S.TOKENS not in out.column_names
    assert out.column(S.STATUS).to_pylist() == statuses
    dim = clip_model.get_model_config(ARCH).embed_dim
    assert out.schema.field(S.IMAGE_EMBEDDING).type == pa.list_(pa.float16(), dim)
    img = out.column(S.IMAGE_EMBEDDING).to_pylist()
    txt = out.column(S.TEXT_EMBEDDING).to_pylist()
    assert img[2] is None and txt[2] is not None  # failed image: text still embedded
    assert txt[4] is None and img[4] is not None  # no caption: no text embedding
    score = out.column(S.CLIP_SCORE).to_pylist()
    assert score[2] is None and score[4] is None
    with torch.inference_mode():
        for i in (0, 1, 3, 4):
            want = ref.encode_image(ref_pp(Image.open(io.BytesIO(images[i])))[None], normalize=True)[0].numpy()
            got = np.asarray(img[i], np.float64)
            assert np.abs(got - want).max() <= 2e-3
            assert abs(np.linalg.norm(got) - 1) <= 1e-3
        for i in range(4):
            want = ref.encode_text(ref_tok([captions[i]]), normalize=True)[0].numpy()
            got = np.asarray(txt[i], np.float64)
            assert np.abs(got - want).max() <= 2e-3
            assert abs(np.linalg.norm(got) - 1) <= 1e-3
        for i in (0, 1, 3):
            cos = float(np.dot(np.asarray(img[i], np.float64), np.asarray(txt[i], np.float64)))
            assert abs(score[i] - cos) <= 2e-3
    assert out.column(S.MODEL).to_pylist() == [f"{ARCH}@random-init"] * 5


def test_inference_batch_does_not_change_results(stage) -> None:
    images = [_jpeg((64, 64), 30 + i) for i in range(7)]
    batch = _rows(images, [S.OK] * 7, [CAPTIONS[i % 4] + str(i) for i in range(7)])
    pre = PreprocessStage(preprocess=stage.preprocess).process_batch(batch)
    one = EmbedStage(cfg=EmbedConfig(model=ARCH, inference_batch=1), preprocess=stage.preprocess)
    one._model, one._device, one._autocast, one._model_id = stage._model, stage._device, None, "m"
    a = stage.process_batch(pre)
    b = one.process_batch(pre)
    for col in (S.IMAGE_EMBEDDING, S.TEXT_EMBEDDING):
        x = np.asarray(a.column(col).to_pylist(), np.float32)
        y = np.asarray(b.column(col).to_pylist(), np.float32)
        assert np.abs(x - y).max() <= 1e-3


def test_debug_worker_column_and_model_id(tmp_path) -> None:
    s = EmbedStage(cfg=EmbedConfig(model=ARCH, debug_worker_column=True))
    s.setup()
    out = s.process_batch(_rows([None], ["http_404"], ["a"]))
    import os

    assert out.column(S.EMBED_WORKER).to_pylist()[0].endswith(f":{os.getpid()}")
    m, _ = clip_model.create_model(ARCH)
    m.weights_sha256 = "ab" * 32
    assert model_id(m) == f"{ARCH}@sha256:{'ab' * 32}"


def test_random_init_is_the_same_in_every_process() -> None:
    # Actors load their own copy; without weights they must still agree with each other.
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a, _ = load_model(ARCH, None)
    b, _ = load_model(ARCH, None)
    assert torch.equal(torch.rand(3), expected)  # the caller's random stream is untouched
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), name


def test_mismatched_preprocess_fails_at_setup() -> None:
    wrong = clip_model.PreprocessConfig(image_size=224)
    s = EmbedStage(cfg=EmbedConfig(model=ARCH), preprocess=wrong)
    with pytest.raises(ValueError, match="expects preprocessing"):
        s.setup()


def test_gpu_actor_without_cuda_fails_clearly(monkeypatch) -> None:
    from pipeline.stages.base import Resources

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    s = EmbedStage(cfg=EmbedConfig(model=ARCH, num_gpus=1), resources=Resources(num_gpus=1))
    with pytest.raises(RuntimeError, match="no CUDA device"):
        s.setup()
