"""clip_model.transform against open_clip's eval preprocess (torchvision on PIL images)."""

from __future__ import annotations

import functools
import io
import pickle

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from clip_model.config import OPENAI_MEAN, OPENAI_STD, PreprocessConfig
from clip_model.transform import (
    image_transform,
    normalize_uint8,
    pixels_tensor,
    resize_crop_tensor_uint8,
    resize_crop_uint8,
    resize_size,
    resize_tensor_uint8,
)
from testkit.testdata import photos

PHOTOS = photos()

# (width, height): square, one pixel off 224 either way, much smaller, much larger, extreme
# aspect ratios, odd sizes.
SIZES = [(224, 224), (225, 224), (223, 301), (1, 1), (31, 17), (5, 90), (90, 5), (640, 480),
         (333, 1001), (801, 599)]  # fmt: skip
MODES = [("RGB", "JPEG"), ("RGB", "PNG"), ("RGBA", "PNG"), ("L", "JPEG"), ("L", "PNG"),
         ("CMYK", "JPEG"), ("P", "PNG"), ("LA", "PNG")]  # fmt: skip


@functools.cache
def _pixels(width: int, height: int, seed: int) -> np.ndarray:
    """uint8 [height, width, 4]: smooth gradients plus noise, so every filter tap matters."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    channels = []
    for c in range(4):
        wave = 127 + 100 * np.sin(xx / (3 + 5 * c) + yy / (4 + 3 * c) + c)
        channels.append(wave + rng.normal(0, 25, size=(height, width)))
    return np.clip(np.stack(channels, axis=-1), 0, 255).astype(np.uint8)


@functools.cache
def _encoded(width: int, height: int, mode: str, fmt: str, seed: int) -> bytes:
    """A synthetic image of ``mode`` encoded as ``fmt`` (JPEG or PNG)."""
    arr = _pixels(width, height, seed)
    if mode == "RGB":
        img = Image.fromarray(arr[..., :3], "RGB")
    elif mode == "P":
        img = Image.fromarray(arr[..., 0] // 4, "P")  # 64 palette entries
        palette = np.random.default_rng(seed).integers(0, 256, size=64 * 3, dtype=np.uint8)
        img.putpalette(palette.tobytes())
    elif mode == "RGBA":
        img = Image.fromarray(arr, "RGBA")
    elif mode == "CMYK":
        img = Image.frombytes("CMYK", (width, height), arr.tobytes())
    elif mode == "L":
        img = Image.fromarray(arr[..., 0], "L")
    elif mode == "LA":
        img = Image.fromarray(arr[..., :2].copy(), "LA")
    else:
        raise AssertionError(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _synthetic(width: int, height: int, mode: str, fmt: str, seed: int) -> Image.Image:
    """A fresh, lazily decoded image from :func:`_encoded`."""
    reopened = Image.open(io.BytesIO(_encoded(width, height, mode, fmt, seed)))
    assert reopened.mode == mode
    return reopened


def _assert_matches(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert ours.dtype == torch.float32
    assert ours.shape == ref.shape
    # numpy rather than torch.testing: cheaper on a loaded CI box, same check.
    worst = float(np.abs(ours.numpy() - ref.numpy()).max())
    assert worst <= 1e-6, f"max abs difference {worst}"


@pytest.fixture(scope="module")
def openai_preprocess():
    """open_clip's eval preprocess of ViT-B-32 (the OpenAI weights' settings)."""
    _, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32", pretrained=None)
    return preprocess


def _oc_transform(cfg: PreprocessConfig):
    return open_clip.image_transform(
        cfg.image_size,
        is_train=False,
        mean=cfg.mean,
        std=cfg.std,
        interpolation=cfg.interpolation,
        resize_mode=cfg.resize_mode,
    )


def test_real_photos_match_open_clip(openai_preprocess):
    assert len(PHOTOS) >= 5
    ours = image_transform(PreprocessConfig())
    direct = open_clip.image_transform(224, is_train=False, mean=OPENAI_MEAN, std=OPENAI_STD)
    for path in PHOTOS:
        with Image.open(path) as img:
            got = ours(img)
        with Image.open(path) as img:
            ref = openai_preprocess(img)
        _assert_matches(got, ref)
        # Same float32 operations in the same order as torchvision: equal to the last bit.
        assert torch.equal(got, ref)
        with Image.open(path) as img:
            _assert_matches(got, direct(img))
        assert got.shape == (3, 224, 224)


@pytest.mark.parametrize("mode,fmt", MODES)
def test_modes_and_sizes_match_open_clip(openai_preprocess, mode, fmt):
    ours = image_transform(PreprocessConfig())
    for i, (w, h) in enumerate(SIZES):
        got = ours(_synthetic(w, h, mode, fmt, seed=i))
        _assert_matches(got, openai_preprocess(_synthetic(w, h, mode, fmt, seed=i)))


@pytest.mark.parametrize(
    "cfg",
    [
        PreprocessConfig(interpolation="bilinear"),
        PreprocessConfig(image_size=336),
        PreprocessConfig(image_size=97, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
        PreprocessConfig(resize_mode="squash"),
        PreprocessConfig(image_size=250, interpolation="bilinear", resize_mode="squash"),
    ],
    ids=["bilinear", "size336", "size97-halfnorm", "squash", "squash-bilinear-250"],
)
def test_other_configs_match_open_clip(cfg):
    ours = image_transform(cfg)
    ref = _oc_transform(cfg)
    cases = [(640, 480, "RGB", "JPEG"), (97, 333, "RGBA", "PNG"), (336, 336, "L", "PNG"),
             (1001, 98, "CMYK", "JPEG")]  # fmt: skip
    for seed, (w, h, mode, fmt) in enumerate(cases):
        got = ours(_synthetic(w, h, mode, fmt, seed))
        assert got.shape == (3, cfg.image_size, cfg.image_size)
        _assert_matches(got, ref(_synthetic(w, h, mode, fmt, seed)))
    with Image.open(PHOTOS[0]) as img:
        got = ours(img)
    with Image.open(PHOTOS[0]) as img:
        _assert_matches(got, ref(img))


@pytest.mark.parametrize(
    "cfg",
    [PreprocessConfig(), PreprocessConfig(image_size=64), PreprocessConfig(interpolation="bilinear"),
     PreprocessConfig(image_size=97, resize_mode="squash"), PreprocessConfig(crop_rounding="floor")],
    ids=["224", "64", "bilinear", "squash-97", "floor"],
)  # fmt: skip
def test_torch_kernels_give_the_pil_transform_within_a_few_levels(cfg):
    """The decode task's path (torch's antialiased uint8 kernels on a view of Pillow's
    memory) against the reference PIL path: the same filters and sizes, but the two passes
    run in another order, each rounding to uint8. On the synthetic sizes (noise, shrinks by
    up to 26x, enlargements from 1 px) and the real photos: at most 3 levels apart, 0.25 on
    average in the worst case (333 x 1001 at 224 px), most images under 0.01."""
    images = [_synthetic(w, h, "RGB", "JPEG", seed).convert("RGB") for seed, (w, h) in enumerate(SIZES)]
    images += [Image.open(p).convert("RGB") for p in PHOTOS]
    means = []
    for img in images:
        want = resize_crop_uint8(img, cfg)
        got = resize_crop_tensor_uint8(pixels_tensor(img), cfg)
        assert got.dtype == np.uint8 and got.shape == want.shape and got.flags.writeable
        diff = np.abs(got.astype(np.int16) - want)
        assert diff.max() <= 3 and diff.mean() <= 0.3, (img.size, diff.max(), diff.mean())
        means.append(diff.mean())
    assert np.median(means) <= 0.01


def test_pixels_tensor_views_pillow_memory_and_copies_when_it_must(monkeypatch):
    small = _synthetic(640, 480, "RGB", "PNG", 1).convert("RGB")
    view = pixels_tensor(small)
    # Pillow keeps RGB as four bytes a pixel; the view shows all four, RGB first.
    assert view.dtype == torch.uint8 and tuple(view.shape) == (1, 4, 480, 640)
    assert np.array_equal(view[0, :3].permute(1, 2, 0).numpy(), np.asarray(small))
    # Rows spread over several memory blocks (a large image) cannot be viewed: a 3-channel copy.
    big = Image.fromarray(np.tile(_pixels(300, 300, 2)[..., :3], (8, 8, 1)), "RGB")
    copied = pixels_tensor(big)
    assert tuple(copied.shape) == (1, 3, 2400, 2400)
    assert np.array_equal(copied[0].permute(1, 2, 0).numpy(), np.asarray(big))
    out = resize_tensor_uint8(copied, (300, 200), "bicubic")
    assert tuple(out.shape) == (1, 3, 200, 300)
    want = np.asarray(big.resize((300, 200), Image.Resampling.BICUBIC)).astype(np.int16)
    assert np.abs(out[0].permute(1, 2, 0).numpy() - want).max() <= 1
    # A Pillow without the Arrow export (before 11.2): a 3-channel copy, the same pixels.
    monkeypatch.delattr(Image.Image, "__arrow_c_array__", raising=False)
    old = pixels_tensor(small)
    assert tuple(old.shape) == (1, 3, 480, 640) and torch.equal(old, view[:, :3])
    with pytest.raises(ValueError, match="RGB image"):
        pixels_tensor(Image.new("L", (4, 4)))
    with pytest.raises(ValueError, match="bicubic or bilinear"):
        resize_tensor_uint8(view, (10, 10), "lanczos")


def test_transform_equals_split_path_and_batching():
    cfg = PreprocessConfig()
    ours = image_transform(cfg)
    images = [_synthetic(w, h, "RGB", "JPEG", seed) for seed, (w, h) in enumerate(SIZES[:6])]
    pixels = np.stack([resize_crop_uint8(img, cfg) for img in images])
    assert pixels.dtype == np.uint8 and pixels.shape == (6, 224, 224, 3)
    batch = normalize_uint8(pixels, cfg)
    assert batch.shape == (6, 3, 224, 224) and batch.dtype == torch.float32
    assert batch.is_contiguous()
    for i, img in enumerate(images):
        torch.testing.assert_close(ours(img), batch[i], atol=1e-6, rtol=0)
    torch.testing.assert_close(
        normalize_uint8(torch.from_numpy(pixels), cfg), batch, atol=0, rtol=0
    )


def test_normalize_against_float64_reference():
    cfg = PreprocessConfig(image_size=8)
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(5, 8, 8, 3), dtype=np.uint8)
    expected = (pixels.astype(np.float64) / 255.0 - np.array(cfg.mean)) / np.array(cfg.std)
    expected = torch.from_numpy(expected.transpose(0, 3, 1, 2).copy())
    got32 = normalize_uint8(pixels, cfg, device="cpu")
    torch.testing.assert_close(got32.double(), expected, atol=1e-6, rtol=0)
    got64 = normalize_uint8(pixels, cfg, dtype=torch.float64)
    assert got64.dtype == torch.float64
    torch.testing.assert_close(got64, expected, atol=1e-12, rtol=0)
    got16 = normalize_uint8(pixels, cfg, dtype=torch.float16)
    assert got16.dtype == torch.float16
    torch.testing.assert_close(got16.double(), expected, atol=2e-3, rtol=1e-3)
    # Read-only input (np.asarray of a PIL image is) works without copying warnings.
    pixels.flags.writeable = False
    torch.testing.assert_close(normalize_uint8(pixels, cfg), got32, atol=0, rtol=0)


def test_resize_and_crop_arithmetic_by_hand():
    cfg = PreprocessConfig()
    assert resize_size(640, 480, cfg) == (298, 224)  # int(224 * 640 / 480) = int(298.67)
    assert resize_size(480, 640, cfg) == (224, 298)
    assert resize_size(7, 300, cfg) == (224, 9600)
    assert resize_size(100, 100, cfg) == (224, 224)
    assert resize_size(640, 480, PreprocessConfig(resize_mode="squash")) == (224, 224)
    # Height already 224, so no resize; the pixel value is the source column, which shows the
    # crop offset: round(excess / 2) with Python's round-half-to-even.
    for width, left in [(225, 0), (226, 1), (227, 2), (229, 2), (231, 4)]:
        cols = np.tile(np.arange(width, dtype=np.uint8), (224, 1))
        out = resize_crop_uint8(Image.fromarray(cols, "L"), cfg)
        assert out.shape == (224, 224, 3)
        assert out[0, 0].tolist() == [left] * 3
        assert out[0, -1, 0] == left + 223


def test_alpha_is_dropped_not_composited():
    cfg = PreprocessConfig(image_size=4)
    img = Image.new("RGBA", (4, 4), (200, 100, 50, 0))
    assert resize_crop_uint8(img, cfg)[0, 0].tolist() == [200, 100, 50]


def test_bad_input_raises_clear_errors():
    cfg = PreprocessConfig()
    with pytest.raises(TypeError, match="PIL.Image.Image"):
        resize_crop_uint8(np.zeros((4, 4, 3), np.uint8), cfg)
    with pytest.raises(ValueError, match="no pixels"):
        resize_crop_uint8(Image.new("RGB", (0, 5)), cfg)
    with pytest.raises(ValueError, match=r"\[N, 224, 224, 3\]"):
        normalize_uint8(np.zeros((2, 224, 224), np.uint8), cfg)
    with pytest.raises(ValueError, match=r"\[N, 224, 224, 3\]"):
        normalize_uint8(np.zeros((2, 3, 224, 224), np.uint8), cfg)
    with pytest.raises(TypeError, match="uint8"):
        normalize_uint8(np.zeros((1, 224, 224, 3), np.float32), cfg)
    with pytest.raises(TypeError, match="floating"):
        normalize_uint8(np.zeros((1, 224, 224, 3), np.uint8), cfg, dtype=torch.int32)
    truncated = io.BytesIO(PHOTOS[0].read_bytes()[:2000])
    with pytest.raises(OSError), Image.open(truncated) as img:
        resize_crop_uint8(img, cfg)


def test_transform_pickles():
    cfg = PreprocessConfig(image_size=64, interpolation="bilinear")
    clone = pickle.loads(pickle.dumps(image_transform(cfg)))
    img = _synthetic(100, 80, "RGB", "PNG", 0)
    torch.testing.assert_close(clone(img), image_transform(cfg)(img), atol=0, rtol=0)
