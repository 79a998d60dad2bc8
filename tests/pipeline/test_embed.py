"""The decode task's model input, TokenizeStage, RereadStage and EmbedStage called directly (no
scheduler), against open_clip as the reference.

The reference model is open_clip's own CLIP built from the tiny-synthetic architecture and
loaded with the very weights the stage's worker loads, fed by open_clip's preprocess and
tokenizer (full 77-token padding, one image at a time): an implementation that shares no code
with the stage's batching, length-sorted text chunks or uint8 -> device normalisation.
"""

from __future__ import annotations

import io
import json
from dataclasses import replace

import numpy as np
import open_clip
import pyarrow as pa
import pytest
import torch
from PIL import Image

import clip_model
from clip_model.tokenizer import default_tokenizer
from pipeline import schema as S
from pipeline.config import DecodeConfig, EmbedConfig
from pipeline.stages.decode import DecodeStage
from pipeline.stages.embed import (
    EmbedStage,
    binary_views,
    load_model,
    model_id,
    stacked_pixels,
    token_chunks,
)
from pipeline.stages.tokenize import TokenizeStage

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


def resolve_preprocess(arch: str) -> clip_model.PreprocessConfig:
    """The preprocessing of ``arch`` with random weights (its configured image size)."""
    return clip_model.PreprocessConfig(image_size=clip_model.get_model_config(arch).vision.image_size)


@pytest.fixture(scope="module")
def stage() -> EmbedStage:
    torch.manual_seed(0)
    # fp32: these tests compare with open_clip's fp32 reference at float16-storage tolerance.
    s = EmbedStage(cfg=EmbedConfig(model=ARCH, pretrained=None, inference_batch=2, precision="fp32"),
                   preprocess=resolve_preprocess(ARCH))
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
    """Rows as the download stage leaves them (image bytes), decoded and tokenized as the
    fresh-shard task does: DecodeStage with the model's input, then TokenizeStage."""
    n = len(images)
    rows = pa.table(
        {
            S.KEY: [f"{i:09d}" for i in range(n)],
            S.SHARD: ["00000"] * n,
            S.CAPTION: captions,
            S.STATUS: statuses,
            S.ERROR: [None if s == S.OK else "upstream" for s in statuses],
            S.IMAGE_BYTES: pa.array(images, pa.binary()),
        }
    )
    pp = resolve_preprocess(ARCH)
    decoded = DecodeStage(cfg=DecodeConfig(image_size=64), model_input=pp, isolate=False).process_batch(rows)
    return TokenizeStage(tokenizer=default_tokenizer()).process_batch(decoded)


def test_model_input_and_tokens_match_open_clip(reference) -> None:
    """The decode task's model input is open_clip's preprocessing of the same decoded image
    (these files are too small for a JPEG draft, so the decoded image is the whole file), to
    one uint8 level: torch's antialiased kernels use PIL's filters, and their fixed-point
    weights round differently in the last bit. The files are random noise, the worst case;
    the 500 x 301 one is shrunk by more than 4x."""
    _, ref_pp, ref_tok = reference
    pp = resolve_preprocess(ARCH)
    images = [
        _jpeg((120, 90), 1),
        _jpeg((33, 200), 2, "PNG", "RGBA"),
        _jpeg((64, 64), 3, "PNG", "L"),
        _jpeg((500, 301), 4, "WEBP"),
        None,
    ]
    out = _rows(images, [S.OK] * 4 + ["http_404"], CAPTIONS)
    assert out.column(S.STATUS).to_pylist() == [S.OK] * 4 + ["http_404"]
    pixels = out.column(S.PIXELS).to_pylist()
    assert pixels[4] is None
    assert out.column(S.EMBEDDED_FROM).to_pylist() == ["original"] * 4 + [None]
    for i, (data, px) in enumerate(zip(images[:4], pixels[:4], strict=True)):
        arr = np.frombuffer(px, np.uint8).reshape(pp.image_size, pp.image_size, 3)
        ours = clip_model.transform.normalize_uint8(arr[None].copy(), pp)[0]
        img = Image.open(io.BytesIO(data))
        if img.mode == "RGBA":  # the decode stage flattens alpha onto white, as it stores it
            flat = Image.new("RGB", img.size, (255, 255, 255))
            flat.paste(img.convert("RGB"), mask=img.getchannel("A"))
            img = flat
        ref = ref_pp(img)
        diff = (ours - ref).abs() / (1 / 255 / torch.tensor(pp.std)[:, None, None])  # uint8 levels
        # One level at most, and only here and there (noise is the worst case for rounding).
        assert diff.max() <= 1.01 and diff.mean() <= 0.02, i
    full = ref_tok(CAPTIONS).numpy()
    for tokens, row in zip(out.column(S.TOKENS).to_pylist(), full, strict=True):
        end = int(row.argmax()) + 1
        assert tokens == row[:end].tolist()  # same ids, no padding
    assert len(out.column(S.TOKENS)[3].as_py()) == 77  # long caption truncated at the context


def test_model_input_never_sees_the_border_padding() -> None:
    """A wide image stored with border padding: the model input is the centre square of the
    original pixels, not of the padded stored copy (decode once)."""
    pp = resolve_preprocess(ARCH)
    arr = np.zeros((100, 400, 3), np.uint8)
    arr[:, :, 0] = 200  # a red strip, nothing white anywhere
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    rows = pa.table({S.KEY: ["000000000"], S.STATUS: [S.OK], S.ERROR: pa.nulls(1, pa.string()),
                     S.IMAGE_BYTES: pa.array([buf.getvalue()], pa.binary())})
    out = DecodeStage(cfg=DecodeConfig(image_size=128, resize_mode="border"), model_input=pp,
                      isolate=False).process_batch(rows)
    stored = np.asarray(Image.open(io.BytesIO(out.column(S.IMAGE)[0].as_py())).convert("RGB"))
    assert stored.shape == (128, 128, 3) and stored[0, 64].min() > 240  # the stored copy is padded white
    px = np.frombuffer(out.column(S.PIXELS)[0].as_py(), np.uint8).reshape(pp.image_size, pp.image_size, 3)
    assert px[..., 0].min() >= 190 and px[..., 1].max() <= 10  # all red: no padding reached the model
    want = clip_model.transform.resize_crop_uint8(Image.fromarray(arr), pp)
    assert np.array_equal(px, want)


def test_large_jpegs_are_drafted_with_headroom_for_the_model_input() -> None:
    """A 2400 px JPEG is decoded at a reduced DCT scale; the model input made from it stays
    within a few levels of the one made from the full decode."""
    from pipeline.stages.decode import DecodeOptions, decode_image

    pp = resolve_preprocess(ARCH)
    rng = np.random.default_rng(7)
    small = rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)
    big = Image.fromarray(small).resize((2400, 1800), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    big.save(buf, "JPEG", quality=92)
    got = decode_image(buf.getvalue(), DecodeOptions(DecodeConfig(image_size=256), pp))
    ours = np.frombuffer(got.pixels, np.uint8).reshape(pp.image_size, pp.image_size, 3).astype(np.int16)
    full = clip_model.transform.resize_crop_uint8(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"), pp)
    assert np.abs(ours - full.astype(np.int16)).mean() < 2.0


def test_thumbnails_for_the_pixel_check() -> None:
    pp = resolve_preprocess(ARCH)
    images = [_jpeg((120, 90), 1), b"not an image", _jpeg((64, 64), 3, "PNG", "RGBA"), None]
    rows = pa.table({
        S.KEY: [f"{i:09d}" for i in range(4)], S.STATUS: [S.OK, S.OK, S.OK, "http_404"],
        S.ERROR: pa.nulls(4, pa.string()), S.IMAGE_BYTES: pa.array(images, pa.binary()),
    })  # fmt: skip
    plain = DecodeStage(cfg=DecodeConfig(image_size=64), model_input=pp, isolate=False).process_batch(rows)
    assert S.IMAGE_THUMB not in plain.column_names
    out = DecodeStage(cfg=DecodeConfig(image_size=64), model_input=pp, thumbnails=True, isolate=False).process_batch(rows)
    thumbs = out.column(S.IMAGE_THUMB).to_pylist()
    assert thumbs[1] is None and thumbs[3] is None  # undecodable, failed upstream
    assert out.column(S.STATUS).to_pylist()[1] == "unsupported_format"
    for i in (0, 2):
        square = Image.fromarray(
            np.frombuffer(out.column(S.PIXELS)[i].as_py(), np.uint8).reshape(pp.image_size, pp.image_size, 3))
        ref = square.resize((32, 32), Image.Resampling.BILINEAR)
        assert thumbs[i] == ref.tobytes() and len(thumbs[i]) == 32 * 32 * 3


def test_reread_embeds_the_stored_images_and_records_bad_rows(tmp_path) -> None:
    from pipeline.shard_format import build_shard
    from pipeline.stages.read import ShardDescriptor
    from pipeline.stages.reread import RereadStage

    pp = resolve_preprocess(ARCH)
    good = _jpeg((80, 60), 5)
    rows = pa.table(
        {
            S.KEY: ["000000000", "000000001", "000000002", "000000003"],
            S.SHARD_ID: [0, 0, 0, 0],
            S.CAPTION: ["a", "b", None, "d"],
            S.STATUS: [S.OK, S.OK, "timeout", S.OK],
            S.ERROR: [None, None, "deadline", None],
            S.IMAGE: pa.array([good, b"not an image at all", None, good], pa.binary()),
            S.IMAGE_FORMAT: ["jpg", "jpg", None, "jpg"],
        }
    )
    files = build_shard(0, rows)
    (tmp_path / "00000.parquet").write_bytes(files.parquet)
    # Row 3 claims ok but the tar lost it.
    tar_without_3 = _drop_member(files.tar, "000000003.jpg")
    (tmp_path / "00000.tar").write_bytes(tar_without_3)
    desc = pa.Table.from_pylist([ShardDescriptor(0, "unused.parquet", 0, 4).as_row()])
    stage = RereadStage(shard_folder=str(tmp_path), number_sample_per_shard=10, model_input=pp)
    out = stage.process_batch(desc)
    assert out.column(S.STATUS).to_pylist() == [S.OK, "preprocess_error", "timeout", "image_missing"]
    assert out.column(S.ERROR).to_pylist()[2] == "deadline"
    assert out.column(S.EMBEDDED_FROM).to_pylist() == ["stored"] * 4
    assert out.column(S.SHARD_ROWS).to_pylist() == [4] * 4
    px = out.column(S.PIXELS).to_pylist()
    assert px[1:] == [None, None, None]
    want = clip_model.transform.resize_crop_uint8(Image.open(io.BytesIO(good)), pp)
    assert px[0] == want.tobytes()

    gone = RereadStage(shard_folder=str(tmp_path), number_sample_per_shard=10, model_input=pp)
    (tmp_path / "00000.tar").write_bytes(b"not a tar")
    out = gone.process_batch(desc)
    assert out.column(S.STATUS).to_pylist() == ["image_missing"] * 2 + ["timeout", "image_missing"]
    assert "unreadable" in out.column(S.ERROR).to_pylist()[0]


def _drop_member(tar_bytes: bytes, name: str) -> bytes:
    import tarfile

    src = tarfile.open(fileobj=io.BytesIO(tar_bytes))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as dst:
        for m in src.getmembers():
            if m.name != name:
                dst.addfile(m, src.extractfile(m))
    return buf.getvalue()


def test_embed_matches_open_clip_reference(stage, reference) -> None:
    ref, ref_pp, ref_tok = reference
    images = [_jpeg((90 + 7 * i, 70 + 3 * i), 10 + i) for i in range(5)]
    statuses = [S.OK, S.OK, "http_500", S.OK, S.OK]
    captions = list(CAPTIONS[:4]) + [None]
    pre = _rows([im if s == S.OK else None for im, s in zip(images, statuses, strict=True)], statuses, captions)
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
    pre = _rows(images, [S.OK] * 7, [CAPTIONS[i % 4] + str(i) for i in range(7)])
    one = EmbedStage(cfg=EmbedConfig(model=ARCH, pretrained=None, inference_batch=1), preprocess=stage.preprocess)
    one._model, one._device, one._autocast, one._model_id = stage._model, stage._device, None, "m"
    a = stage.process_batch(pre)
    b = one.process_batch(pre)
    for col in (S.IMAGE_EMBEDDING, S.TEXT_EMBEDDING):
        x = np.asarray(a.column(col).to_pylist(), np.float32)
        y = np.asarray(b.column(col).to_pylist(), np.float32)
        assert np.abs(x - y).max() <= 1e-3


def test_auto_precision_is_bf16_only_on_cpus_that_multiply_bf16(monkeypatch) -> None:
    from pipeline.stages import embed as E

    assert E.resolve_precision("auto", "cuda") == "fp16"
    assert E.resolve_precision("fp32", "cpu") == "fp32" and E.resolve_precision("bf16", "cuda") == "bf16"
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert E.resolve_precision("auto", "cpu") == "fp32"
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert E.resolve_precision("auto", "cpu") == "bf16"


def test_bf16_embeddings_stay_within_cosine_1e4_of_fp32() -> None:
    """What auto precision trades on a CPU with native bf16: the bundled model's image and
    text embeddings of real synthetic scenes and their clip_score, bf16 against fp32."""
    import random

    from testkit.synthetic import caption, render, sample_scenes

    rng = random.Random(5)
    scenes = sample_scenes(48, seed=77)
    images, captions = [], []
    for scene in scenes:
        buf = io.BytesIO()
        render(scene, (96, 80)).save(buf, "JPEG", quality=90)
        images.append(buf.getvalue())
        captions.append(caption(scene, rng))
    pp = clip_model.PreprocessConfig(image_size=64)
    rows = pa.table({S.KEY: [f"{i:09d}" for i in range(48)], S.SHARD: ["00000"] * 48, S.CAPTION: captions,
                     S.STATUS: [S.OK] * 48, S.ERROR: pa.nulls(48, pa.string()),
                     S.IMAGE_BYTES: pa.array(images, pa.binary())})  # fmt: skip
    rows = DecodeStage(cfg=DecodeConfig(image_size=64), model_input=pp, isolate=False).process_batch(rows)
    rows = TokenizeStage(tokenizer=default_tokenizer()).process_batch(rows)
    got = {}
    for precision in ("fp32", "bf16"):
        st = EmbedStage(cfg=EmbedConfig(precision=precision), preprocess=pp)
        st.setup()
        got[precision] = st.process_batch(rows)
    a, b = got["fp32"], got["bf16"]
    for col in (S.IMAGE_EMBEDDING, S.TEXT_EMBEDDING):
        x = np.asarray(a.column(col).to_pylist(), np.float64)
        y = np.asarray(b.column(col).to_pylist(), np.float64)
        cos = (x * y).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(y, axis=1)
        assert cos.min() >= 0.9999, (col, cos.min())
        assert not np.array_equal(x, y)  # bf16 did run
    sa = np.asarray(a.column(S.CLIP_SCORE).to_pylist())
    sb = np.asarray(b.column(S.CLIP_SCORE).to_pylist())
    assert np.abs(sa - sb).max() <= 2e-3 and sa.std() > 0.02


def test_debug_worker_column_and_model_id(tmp_path) -> None:
    s = EmbedStage(cfg=EmbedConfig(model=ARCH, pretrained=None, debug_worker_column=True))
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
    s = EmbedStage(cfg=EmbedConfig(model=ARCH, pretrained=None), preprocess=wrong)
    with pytest.raises(ValueError, match="expects preprocessing"):
        s.setup()


def test_gpu_actor_without_cuda_fails_clearly(monkeypatch) -> None:
    from pipeline.stages.base import Resources

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    s = EmbedStage(cfg=EmbedConfig(model=ARCH, pretrained=None, num_gpus=1), resources=Resources(num_gpus=1))
    with pytest.raises(RuntimeError, match="no CUDA device"):
        s.setup()


def test_stacked_pixels_is_a_zero_copy_view_per_chunk_and_skips_nulls() -> None:
    size = 4
    rng = np.random.default_rng(0)
    vals = [rng.integers(0, 256, size * size * 3, dtype=np.uint8).tobytes() for _ in range(5)]
    col = pa.chunked_array([pa.array([vals[0], None, vals[1]], pa.binary()),
                            pa.array([None, vals[2], vals[3], None, vals[4]], pa.binary())])
    rows, arr = stacked_pixels(col, size)
    assert rows.tolist() == [0, 2, 4, 5, 7]
    for r, v in zip(range(5), vals, strict=True):
        assert arr[r].tobytes() == v
    one = pa.array([None, vals[0], vals[1]], pa.binary()).slice(1)
    rows, arr = stacked_pixels(one, size)
    assert rows.tolist() == [0, 1] and arr[1].tobytes() == vals[1]
    assert not arr.flags.owndata  # a view of the Arrow buffer, not a copy
    with pytest.raises(ValueError, match="row 1 has 5 bytes"):
        stacked_pixels(pa.array([vals[0], b"12345"], pa.binary()), size)
    rows, arr = stacked_pixels(pa.array([None, None], pa.binary()), size)
    assert rows.size == 0 and arr.shape == (0, size, size, 3)


def test_binary_views_are_the_values_of_any_length_without_copies() -> None:
    col = pa.chunked_array([pa.array([b"abc", None, b""], pa.binary()),
                            pa.array([None, None], pa.binary()),
                            pa.array([None, b"x" * 70, b"defg"], pa.binary()).slice(1)])
    rows, views = binary_views(col)
    assert rows.dtype == np.int64 and rows.tolist() == [0, 2, 5, 6]
    assert [v.tobytes() for v in views] == [b"abc", b"", b"x" * 70, b"defg"]
    assert not any(v.flags.owndata or v.flags.writeable for v in views)
    rows, views = binary_views(pa.array([None], pa.binary()))
    assert rows.size == 0 and views == []


def test_token_chunks_pad_sorted_chunks_like_a_loop() -> None:
    rng = np.random.default_rng(1)
    lists = [None if i % 7 == 3 else [] if i % 11 == 5 else rng.integers(1, 99, rng.integers(1, 20)).tolist()
             for i in range(40)]
    col = pa.chunked_array([pa.array(lists[:13], pa.list_(pa.int32())), pa.array(lists[13:], pa.list_(pa.int32()))])
    chunks = token_chunks(col, pad_id=-1, step=6)
    seen = []
    for idx, ids in chunks:
        assert len(idx) <= 6 and ids.dtype == np.int64
        assert ids.shape[1] == max(len(lists[i]) for i in idx)
        for r, i in enumerate(idx):
            want = lists[i] + [-1] * (ids.shape[1] - len(lists[i]))
            assert ids[r].tolist() == want
        seen += idx.tolist()
    assert sorted(seen) == [i for i, v in enumerate(lists) if v]
    lengths = [len(lists[i]) for i in seen]
    assert lengths == sorted(lengths)  # chunks cut from length-sorted rows


def test_decode_task_embedding_equals_the_model_transform_on_a_real_size_vit() -> None:
    """Acceptance (issue 14.5): a ViT-B-32 (random weights, 224 px) embeds the decode task's
    uint8 input as it embeds clip_model's own transform of the same decoded image."""
    from pipeline.stages.decode import DecodeOptions, decode_image

    torch.manual_seed(5)
    model, pp = clip_model.create_model("ViT-B-32")
    stage = EmbedStage(cfg=EmbedConfig(model="ViT-B-32", pretrained=None, inference_batch=4), preprocess=pp)
    stage._model, stage._device, stage._autocast, stage.preprocess = model.eval(), torch.device("cpu"), None, pp
    transform = clip_model.image_transform(pp)
    rng = np.random.default_rng(3)
    files = []
    # Large and small, shrunk and enlarged, by torch's kernels where the transform uses PIL.
    for w, h in ((300, 200), (180, 640), (224, 224), (500, 500), (1800, 1350), (700, 2100)):
        arr = rng.integers(0, 256, (h // 10, w // 10, 3), dtype=np.uint8)
        img = Image.fromarray(arr).resize((w, h), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, "PNG")
        files.append(buf.getvalue())
    decoded = [decode_image(f, DecodeOptions(DecodeConfig(image_size=256), pp)) for f in files]
    pixels = np.stack([np.frombuffer(d.pixels, np.uint8).reshape(224, 224, 3) for d in decoded])
    ours = stage.encode_pixels(pixels)
    with torch.inference_mode():
        ref = model.encode_image(torch.stack([transform(Image.open(io.BytesIO(f)).convert("RGB")) for f in files]),
                                 normalize=True).numpy()
    cos = (ours * ref).sum(axis=1)
    assert cos.min() >= 0.9999, cos


def test_the_model_input_does_not_depend_on_how_the_copy_is_stored() -> None:
    """Acceptance (issue 14.5): with decode once, border (the default) and center_crop storage
    hand the model the same pixels (for JPEGs large enough to be drafted, the draft scale
    follows the larger of the two targets and may differ by mode, never below 3x the model's
    size), so clip_score separates captions equally in both modes (bench/clip_score_modes.py:
    0.9979 AUC in both, against 0.9536 when border-padded stored copies were embedded)."""
    pp = resolve_preprocess(ARCH)
    images = [_jpeg((300, 120), 40), _jpeg((90, 400), 41, "PNG"), _jpeg((256, 256), 42)]
    rows = pa.table({S.KEY: ["a", "b", "c"], S.STATUS: [S.OK] * 3, S.ERROR: pa.nulls(3, pa.string()),
                     S.IMAGE_BYTES: pa.array(images, pa.binary())})
    got = {}
    for mode in ("border", "center_crop", "keep_ratio", "no"):
        out = DecodeStage(cfg=DecodeConfig(image_size=128, resize_mode=mode), model_input=pp,
                          isolate=False).process_batch(rows)
        got[mode] = out.column(S.PIXELS).to_pylist()
        assert out.column(S.IMAGE).to_pylist() != got[mode]  # the stored copies differ by mode
    assert got["border"] == got["center_crop"] == got["keep_ratio"] == got["no"]


def test_text_model_flag_pairs_an_mclip_text_tower_with_the_image_tower(tmp_path) -> None:
    """``--text-model`` reaches every place the job loads its model: the driver's ModelSpec
    (tokenizer, id) and the embedding workers, whose text embeddings are then the
    sentence-transformers model's and whose image embeddings are the image tower's."""
    from clip_model.model import CLIP
    from pipeline import job_config as J
    from pipeline.job import prepare_model
    from testkit.hf_folders import mclip_folder

    folder, ref = mclip_folder(tmp_path / "mclip")
    torch.manual_seed(1)
    image_clip = CLIP(clip_model.get_model_config("ViT-B-32")).eval()
    torch.save(image_clip.state_dict(), tmp_path / "ViT-B-32.pt")
    cfg = J.from_args(["--input", "in.parquet", "--output", str(tmp_path / "out"), "--model", "ViT-B-32",
                       "--pretrained", str(tmp_path / "ViT-B-32.pt"), "--text-model", str(folder),
                       "--set", "moderate.enabled=false"])  # fmt: skip
    assert cfg.embed.text_model == str(folder)
    spec = prepare_model(cfg, lambda _: None)
    assert spec.model_id.startswith(f"ViT-B-32+{folder.name}@sha256:") and spec.dim == 512

    captions = ["a red square", "ein blaues Quadrat", "un cercle vert sur fond noir"]
    images = [_jpeg((250 + 9 * i, 230), 40 + i) for i in range(3)]
    rows = pa.table({S.KEY: ["0", "1", "2"], S.SHARD: ["00000"] * 3, S.CAPTION: captions,
                     S.STATUS: [S.OK] * 3, S.ERROR: [None] * 3, S.IMAGE_BYTES: pa.array(images, pa.binary())})  # fmt: skip
    rows = DecodeStage(cfg=DecodeConfig(image_size=64), model_input=spec.preprocess, isolate=False).process_batch(rows)
    rows = TokenizeStage(tokenizer=spec.tokenizer).process_batch(rows)
    out = EmbedStage(cfg=cfg.embed, preprocess=spec.preprocess).process_batch(rows)
    transform = clip_model.image_transform(spec.preprocess)
    with torch.inference_mode():
        want_txt = torch.nn.functional.normalize(ref.encode(captions, convert_to_tensor=True), dim=-1)
        x = torch.stack([transform(Image.open(io.BytesIO(b))) for b in images])
        want_img = torch.nn.functional.normalize(image_clip.encode_image(x), dim=-1)
    got_txt = np.asarray(out.column(S.TEXT_EMBEDDING).to_pylist(), np.float64)
    got_img = np.asarray(out.column(S.IMAGE_EMBEDDING).to_pylist(), np.float64)
    assert np.abs(got_txt - want_txt.double().numpy()).max() <= 2e-3
    assert np.abs(got_img - want_img.double().numpy()).max() <= 2e-3


def _stored_copies() -> list[bytes]:
    """The real photos as the decode stage stores them by default: 256 px squares, q95 JPEG."""
    from testkit.testdata import photos

    out = []
    for path in photos():
        img = Image.open(path).convert("RGB")
        img.thumbnail((256, 256))
        canvas = Image.new("RGB", (256, 256), (255, 255, 255))
        canvas.paste(img, ((256 - img.width) // 2, (256 - img.height) // 2))
        buf = io.BytesIO()
        canvas.save(buf, "JPEG", quality=95)
        out.append(buf.getvalue())
    return out


def test_stored_jpegs_decoded_on_the_device_embed_as_the_cpu_path_on_a_real_size_vit() -> None:
    """embed.stored_decode "device": a ViT-B-32 (random weights, 224 px) embeds stored JPEGs
    decoded, resized and cropped by the embed stage as it embeds the reread stage's CPU input
    (Pillow + resize_crop_uint8) of the same files."""
    torch.manual_seed(6)
    model, pp = clip_model.create_model("ViT-B-32")
    stage = EmbedStage(cfg=EmbedConfig(model="ViT-B-32", pretrained=None, inference_batch=3,
                                       stored_decode="device"), preprocess=pp)
    stage._model, stage._device, stage._autocast, stage.preprocess = model.eval(), torch.device("cpu"), None, pp
    files = _stored_copies()
    assert len(files) >= 5
    ours, reasons, thumbs = stage.encode_jpegs([np.frombuffer(f, np.uint8) for f in files])
    assert reasons == [None] * len(files) and thumbs is None
    cpu = np.stack([clip_model.transform.resize_crop_uint8(Image.open(io.BytesIO(f)), pp) for f in files])
    ref = stage.encode_pixels(cpu)
    cos = (ours * ref).sum(axis=1)
    assert cos.min() >= 0.9999, cos


def test_reread_with_device_decode_sends_jpegs_and_the_embed_stage_records_bad_ones(tmp_path, caplog) -> None:
    from pipeline.shard_format import build_shard
    from pipeline.stages.read import ShardDescriptor
    from pipeline.stages.reread import RereadStage
    from pipeline.thumbnails import THUMB_SIDE

    pp = resolve_preprocess(ARCH)
    good = _stored_copies()[:2]
    png = _jpeg((90, 70), 8, "PNG")
    truncated = good[1][: len(good[1]) // 2]  # its header reads, its scan data ends early
    rows = pa.table({
        S.KEY: [f"00000000{i}" for i in range(5)],
        S.SHARD_ID: [0] * 5,
        S.CAPTION: ["a red circle", "b", "c", None, "e"],
        S.STATUS: [S.OK, S.OK, S.OK, S.OK, "timeout"],
        S.ERROR: [None, None, None, None, "deadline"],
        S.IMAGE: pa.array([good[0], png, truncated, good[1], None], pa.binary()),
        S.IMAGE_FORMAT: ["jpg", "png", "jpg", "jpg", None],
    })
    files = build_shard(0, rows)
    (tmp_path / "00000.parquet").write_bytes(files.parquet)
    (tmp_path / "00000.tar").write_bytes(files.tar)
    desc = pa.Table.from_pylist([ShardDescriptor(0, "unused.parquet", 0, 5).as_row()])
    common = dict(shard_folder=str(tmp_path), number_sample_per_shard=10, model_input=pp, thumbnails=True)
    on_cpu = RereadStage(**common).process_batch(desc)
    on_dev = RereadStage(**common, stored_decode="device").process_batch(desc)
    # The JPEGs travel as bytes; the PNG is decoded here as before; a failed row has neither.
    assert on_dev.column(S.JPEG).to_pylist() == [good[0], None, truncated, good[1], None]
    assert [v is not None for v in on_dev.column(S.PIXELS).to_pylist()] == [False, True, False, False, False]
    assert on_dev.column(S.PIXELS)[1] == on_cpu.column(S.PIXELS)[1]

    cfg = EmbedConfig(model=ARCH, pretrained=None, precision="fp32")
    tok = TokenizeStage(tokenizer=default_tokenizer())
    out_cpu = EmbedStage(cfg=cfg, preprocess=pp).process_batch(tok.process_batch(on_cpu))
    with caplog.at_level("WARNING", logger="clipcurate.embed"):
        out_dev = EmbedStage(cfg=replace(cfg, stored_decode="device"), preprocess=pp,
                             thumbnails=True).process_batch(tok.process_batch(on_dev))
    # Allowed on a CPU worker (how this test runs it), but the user is told it is for GPUs.
    assert any("meant for GPUs" in r.getMessage() for r in caplog.records)
    assert S.JPEG not in out_dev.column_names and S.PIXELS not in out_dev.column_names
    st = out_dev.column(S.STATUS).to_pylist()
    assert st == [S.OK, S.OK, S.PREPROCESS_ERROR, S.OK, "timeout"]
    # Pillow decodes the truncated file (grey below the cut); the device decoder refuses it.
    assert out_cpu.column(S.STATUS).to_pylist()[2] in (S.OK, S.PREPROCESS_ERROR)
    err = out_dev.column(S.ERROR).to_pylist()[2]
    assert err.startswith("stored JPEG did not decode on cpu: ") and ".cpp" not in err
    a = np.asarray([out_dev.column(S.IMAGE_EMBEDDING)[i].as_py() for i in (0, 1, 3)], np.float64)
    b = np.asarray([out_cpu.column(S.IMAGE_EMBEDDING)[i].as_py() for i in (0, 1, 3)], np.float64)
    assert ((a * b).sum(axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min() >= 0.9999
    assert out_dev.column(S.IMAGE_EMBEDDING)[2].as_py() is None
    assert out_dev.column(S.TEXT_EMBEDDING)[2].as_py() is not None  # the caption is still embedded
    th_dev, th_cpu = out_dev.column(S.IMAGE_THUMB).to_pylist(), out_cpu.column(S.IMAGE_THUMB).to_pylist()
    assert th_dev[1] == th_cpu[1] and th_dev[2] is None and th_dev[4] is None
    for i in (0, 3):
        d = np.frombuffer(th_dev[i], np.uint8).astype(int) - np.frombuffer(th_cpu[i], np.uint8).astype(int)
        assert len(th_dev[i]) == THUMB_SIDE * THUMB_SIDE * 3 and np.abs(d).max() <= 6


def test_device_decode_that_cannot_run_fails_at_setup(monkeypatch) -> None:
    import clip_model.device_decode as dd

    monkeypatch.setattr(dd, "available", lambda: None)
    stage = EmbedStage(cfg=EmbedConfig(model=ARCH, pretrained=None, stored_decode="device"))
    with pytest.raises(RuntimeError, match="stored_decode is 'device', but .*gpu-decode"):
        stage.setup()
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match=r"embed\.stored_decode: 'device' decodes with TorchCodec"):
        EmbedConfig(stored_decode="device").validate()
    with pytest.raises(ConfigError, match=r"embed\.stored_decode: must be cpu or device, got 'gpu'"):
        EmbedConfig(stored_decode="gpu").validate()
