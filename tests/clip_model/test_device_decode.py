"""clip_model.device_decode (TorchCodec's or torchvision's decode_jpeg + resize/crop on the
model's device), here on the CPU, against clip_model.transform's Pillow path on the same files:
the reference the re-embed path uses when its CPU workers decode."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from clip_model.config import PreprocessConfig
from clip_model.device_decode import (
    BACKENDS,
    available,
    decode_jpegs,
    resize_crop_images,
    thumbnails,
)
from clip_model.transform import resize_crop_uint8
from pipeline.thumbnails import THUMB_SIDE, thumbnail
from testkit.testdata import photos


def _stored(img: Image.Image, size: tuple[int, int], quality: int = 95) -> bytes:
    """A stored copy as the decode stage writes one: RGB, resized, baseline JPEG."""
    buf = io.BytesIO()
    img.convert("RGB").resize(size, Image.Resampling.BICUBIC).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _files() -> list[bytes]:
    # The real photos as 256 px squares (border/center_crop storage) and as keep_ratio copies
    # of odd sizes, both orientations (the resize then crops one side, rounding the offset).
    out = []
    for i, path in enumerate(photos()):
        img = Image.open(path)
        out.append(_stored(img, (256, 256)))
        out.append(_stored(img, (256 + 37 * i, 256) if i % 2 else (256, 301 + 9 * i)))
    return out


def _arrays(files: list[bytes]) -> list[np.ndarray]:
    return [np.frombuffer(f, np.uint8) for f in files]


def test_torchcodec_is_preferred_and_both_backends_decode_alike() -> None:
    assert available() == "torchcodec"
    files = _files()
    a = decode_jpegs(_arrays(files), "cpu", backend="torchcodec")
    b = decode_jpegs(_arrays(files), "cpu", backend="torchvision")
    assert len(a) == len(b) == len(files)
    assert all(isinstance(x, torch.Tensor) and torch.equal(x, y) for x, y in zip(a, b, strict=True))
    with pytest.raises(ValueError, match="unknown JPEG decoder backend"):
        decode_jpegs(_arrays(files), "cpu", backend="pillow")


@pytest.mark.parametrize(
    "pp",
    [PreprocessConfig(image_size=224), PreprocessConfig(image_size=64),
     PreprocessConfig(image_size=224, interpolation="bilinear", crop_rounding="floor"),
     PreprocessConfig(image_size=96, resize_mode="squash")],
    ids=["224-bicubic", "64-bicubic", "224-bilinear-floor", "96-squash"],
)
def test_model_input_is_within_a_few_levels_of_the_pillow_path(pp: PreprocessConfig) -> None:
    files = _files()
    want = np.stack([resize_crop_uint8(Image.open(io.BytesIO(f)), pp) for f in files]).astype(np.int16)
    decoded = decode_jpegs(_arrays(files), "cpu")
    got = resize_crop_images(decoded, pp)  # type: ignore[arg-type]
    assert got.dtype == torch.uint8 and tuple(got.shape) == (len(files), pp.image_size, pp.image_size, 3)
    diff = np.abs(got.numpy().astype(np.int16) - want)
    # One rounding (float32) against Pillow's two fixed-point passes: measured at most 5
    # levels, mean ~0.1, on these files; a wrong size, crop offset or channel order would
    # differ by tens of levels almost everywhere.
    assert diff.max() <= 8 and diff.mean() <= 0.3, (diff.max(), diff.mean())


def test_thumbnails_are_within_a_level_of_pillows() -> None:
    pp = PreprocessConfig(image_size=224)
    files = _files()
    px = resize_crop_images(decode_jpegs(_arrays(files), "cpu"), pp)  # type: ignore[arg-type]
    got = thumbnails(px, THUMB_SIDE).numpy().astype(np.int16)
    want = np.stack([np.frombuffer(thumbnail(Image.fromarray(p)), np.uint8).reshape(THUMB_SIDE, THUMB_SIDE, 3)
                     for p in px.numpy()]).astype(np.int16)
    assert got.shape == want.shape and np.abs(got - want).max() <= 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_bad_file_costs_only_itself(backend: str) -> None:
    files = _files()[:3]
    truncated = files[1][: len(files[1]) // 3]
    batch = [files[0], b"\xff\xd8\xff\xe0 not a jpeg", truncated, files[2]]
    got = decode_jpegs(_arrays(batch), "cpu", backend=backend)
    assert isinstance(got[1], str) and isinstance(got[2], str)
    assert "truncated" in got[2] or "incomplete" in got[2], got[2]
    assert ".cpp" not in got[1] + got[2]  # the reason, not torchvision's source location
    for i, f in ((0, files[0]), (3, files[2])):
        alone = decode_jpegs(_arrays([f]), "cpu", backend=backend)[0]
        assert isinstance(got[i], torch.Tensor) and torch.equal(got[i], alone)
    # A grayscale JPEG decodes to three equal channels.
    buf = io.BytesIO()
    Image.open(photos()[0]).convert("L").resize((64, 48)).save(buf, "JPEG")
    (gray,) = decode_jpegs(_arrays([buf.getvalue()]), "cpu", backend=backend)
    assert isinstance(gray, torch.Tensor) and tuple(gray.shape) == (3, 48, 64)
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])


def test_resize_crop_images_refuses_what_is_not_an_image() -> None:
    with pytest.raises(ValueError, match="at least one"):
        resize_crop_images([], PreprocessConfig())
    with pytest.raises(ValueError, match=r"uint8 \[3, H, W\]"):
        resize_crop_images([torch.zeros((4, 8, 8), dtype=torch.uint8)], PreprocessConfig())
