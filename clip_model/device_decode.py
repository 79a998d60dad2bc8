"""Stored JPEGs -> the model's uint8 input on the model's own device.

The re-embed path (a shard committed by an earlier run, read back from its tar) can hand the
embedding worker the stored JPEG bytes instead of decoded pixels: TorchCodec's ``decode_jpeg``
(or torchvision.io's where only torchvision is installed: the same decoder, deprecated there
since torchvision 0.29) decodes them where the model runs (nvJPEG on a CUDA device, in one call
per batch; libjpeg-turbo on the CPU), and the
resize and centre crop of :func:`clip_model.transform.resize_crop_uint8` are computed there in
float32 and rounded to uint8, so :func:`clip_model.transform.normalize_uint8` takes the result
as it takes the CPU workers' pixels. Only the stored copies of this project's own shards come
this way (baseline RGB JPEGs that Pillow wrote, checked by the reread stage before it sends
them); anything else is decoded on the CPU as before.

TorchCodec is needed here and only here (the ``gpu-decode`` extra); it is imported when a
function below runs, never at import time.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from clip_model.config import PreprocessConfig
from clip_model.transform import _crop_offsets, resize_size

if TYPE_CHECKING:
    import torch


BACKENDS = ("torchcodec", "torchvision")


def available() -> str | None:
    """The first of :data:`BACKENDS` that can be imported here, or None."""
    for name in BACKENDS:
        try:
            _decoder(name)
        except ImportError:
            continue
        return name
    return None


def _decoder(backend: str) -> Callable[[Any, Any], Any]:
    """``decode(source or list of sources, device)`` -> RGB uint8 [3, H, W] tensor(s)."""
    if backend == "torchcodec":
        from torchcodec.decoders import decode_jpeg as codec_jpeg

        return lambda src, device: codec_jpeg(src, mode="RGB", device=device)
    if backend == "torchvision":
        from torchvision.io import ImageReadMode, decode_jpeg

        def decode(src: Any, device: Any) -> Any:
            with warnings.catch_warnings():  # deprecated in favour of TorchCodec, tried first
                warnings.simplefilter("ignore", DeprecationWarning)
                return decode_jpeg(src, mode=ImageReadMode.RGB, device=device)

        return decode
    raise ValueError(f"unknown JPEG decoder backend {backend!r}; one of {', '.join(BACKENDS)}")


def decode_jpegs(datas: Sequence[np.ndarray], device: torch.device | str,
                 backend: str | None = None) -> list[torch.Tensor | str]:
    """Decode JPEG files on ``device``, all in one call where every file decodes.

    Args:
        datas: each file's bytes as a 1-D uint8 numpy array (a read-only view of an Arrow
            buffer is fine: it is only read).
        device: where to decode and keep the pixels ("cuda" uses nvJPEG).
        backend: one of :data:`BACKENDS`; None: :func:`available`'s.
    Returns:
        per file, uint8 [3, H, W] RGB on ``device``, or a one-line reason it did not decode.
        One bad file costs only itself: when the batched call fails, each file is decoded
        alone to find which.
    Raises:
        ImportError: no backend is installed.
    """
    import torch

    backend = backend or available()
    if backend is None:
        raise ImportError("decoding JPEGs on a device needs TorchCodec: pip install 'clipcurate[gpu-decode]'")
    decode = _decoder(backend)
    with warnings.catch_warnings():
        # Views of Arrow memory are read-only; torch warns about that, and the decoders only read.
        warnings.filterwarnings("ignore", "The given NumPy array is not writable", UserWarning)
        tensors = [torch.from_numpy(d) for d in datas]
    if not tensors:
        return []
    try:
        return list(decode(tensors, device))
    except RuntimeError:
        pass
    out: list[torch.Tensor | str] = []
    for t in tensors:
        try:
            out.append(decode(t, device))
        except RuntimeError as e:
            out.append(_reason(e))
    return out


def _reason(e: Exception) -> str:
    # torchvision's messages start with the C++ source location: keep what follows it.
    text = (str(e).splitlines() or ["decode failed"])[0]
    if ".cpp:" in text:
        return text.rpartition(".cpp:")[2].partition(", ")[2] or text
    return text


def resize_crop_images(images: Sequence[torch.Tensor], cfg: PreprocessConfig) -> torch.Tensor:
    """:func:`clip_model.transform.resize_crop_uint8` of decoded images, on their device.

    Args:
        images: uint8 [3, H, W] RGB tensors on one device (sizes may differ; images of one size
            are resized together).
        cfg: the weights' preprocessing (image_size S, interpolation, resize_mode, crop_rounding).
    Returns:
        uint8 [N, S, S, 3] (height, width, RGB) on the images' device, in input order. The
        antialiased resize runs in float32 and is rounded once, where the CPU path rounds
        after each of its two passes: pixels differ from it by a few levels at most
        (tests/clip_model/test_device_decode.py).
    """
    import torch
    import torch.nn.functional as F

    if not images:
        raise ValueError("resize_crop_images needs at least one image")
    size = cfg.image_size
    out = torch.empty((len(images), size, size, 3), dtype=torch.uint8, device=images[0].device)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, im in enumerate(images):
        if im.ndim != 3 or im.shape[0] != 3 or im.dtype != torch.uint8:
            raise ValueError(f"image {i} must be uint8 [3, H, W], got {im.dtype} {tuple(im.shape)}")
        groups.setdefault((int(im.shape[-1]), int(im.shape[-2])), []).append(i)
    for (width, height), idx in groups.items():
        if width <= 0 or height <= 0:
            raise ValueError(f"image has no pixels: size {width}x{height}")
        x = torch.stack([images[i] for i in idx]).float()
        new_w, new_h = resize_size(width, height, cfg)
        if (new_w, new_h) != (width, height):
            x = F.interpolate(x, size=(new_h, new_w), mode=cfg.interpolation, antialias=True)
        if cfg.resize_mode == "shortest" and (new_w, new_h) != (size, size):
            left, top = _crop_offsets((new_w, new_h), cfg)
            x = x[..., top : top + size, left : left + size]
        out[idx] = x.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    return out


def thumbnails(pixels: torch.Tensor, side: int) -> torch.Tensor:
    """``side`` x ``side`` thumbnails of model inputs, made as the dedup pixel check's are made
    from the same pixels on the CPU (the whole square, Pillow's bilinear with antialiasing).

    Args:
        pixels: uint8 [N, S, S, 3] on any device.
        side: the thumbnail's side, pixels.
    Returns:
        uint8 [N, side, side, 3] on the same device (within a level or two of Pillow's).
    """
    import torch.nn.functional as F

    x = pixels.permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(side, side), mode="bilinear", antialias=True, align_corners=False)
    return x.round_().clamp_(0, 255).to(pixels.dtype).permute(0, 2, 3, 1).contiguous()
