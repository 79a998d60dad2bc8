"""Image preprocessing that reproduces open_clip's eval transform with PIL, numpy and torch.

The OpenAI / OpenCLIP weights were evaluated with torchvision's
``Resize(S, bicubic) -> CenterCrop(S) -> convert("RGB") -> ToTensor -> Normalize`` applied to
PIL images. The runtime has no torchvision, so the same arithmetic is written out here:

- Resize ("shortest"): the shorter side becomes S, the longer ``int(S * long / short)``
  (truncated, as torchvision computes it); PIL does the resampling with the configured
  filter, which always antialiases when shrinking. An image already at that size is left
  untouched. ("squash": both sides become S, no crop.)
- CenterCrop: offsets ``int(round((side - S) / 2))`` -- Python's round, so an odd excess
  of 1 crops at 0 and of 3 at 2 (``crop_rounding="floor"``: ``(side - S) // 2``, as
  transformers' image processors crop).
- Conversion to RGB happens after resize and crop, in the image's own mode, because
  resampling RGBA/CMYK/L/P before converting gives (slightly) different pixels than
  converting first and the weights were evaluated with this order. Alpha is dropped, not
  composited; EXIF orientation is not applied (the decode stage does that).
- ``/ 255`` then ``(x - mean) / std`` in float32, the same operations in the same order as
  torchvision, so on CPU the result equals open_clip's to the last bit.

The work is split in two so the pipeline can run the PIL part on CPU workers and the
normalisation batched on the model's device: ``resize_crop_uint8`` (PIL, one image) and
``normalize_uint8`` (torch, a batch). ``image_transform`` chains them for one image.

``pixels_tensor`` + ``resize_crop_tensor_uint8`` compute the resize and crop with torch's
antialiased uint8 kernels instead of PIL's (the decode task's path, which has torch): the
same filters and sizes at a fraction of the CPU (SIMD; PIL's resampling is scalar C). The
two passes run in another order, each rounding to uint8, so a few pixels differ from PIL's
by 1-3 levels (tests/clip_model/test_transform.py), and a real-size ViT's embedding by
cosine < 1e-4 (tests/pipeline/test_embed.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from clip_model.config import PreprocessConfig

if TYPE_CHECKING:  # torch is imported where it is used: resize_crop_uint8 runs without it
    import torch

_RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
}


def resize_size(width: int, height: int, cfg: PreprocessConfig) -> tuple[int, int]:
    """(width, height) in pixels an image of ``width`` x ``height`` is resized to before cropping."""
    size = cfg.image_size
    if cfg.resize_mode == "squash":
        return size, size
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def _crop_offsets(resized: tuple[int, int], cfg: PreprocessConfig) -> tuple[int, int]:
    """(left, top) of the centre crop in the resized image, rounded as ``cfg`` says."""
    (w, h), size = resized, cfg.image_size
    if cfg.crop_rounding == "floor":
        return (w - size) // 2, (h - size) // 2
    return int(round((w - size) / 2.0)), int(round((h - size) / 2.0))


def resize_crop_uint8(img: Image.Image, cfg: PreprocessConfig) -> np.ndarray:
    """Resize, center-crop and convert one image to RGB, as the weights expect.

    Args:
        img: a PIL image of any mode Pillow can convert to RGB (RGB, RGBA, L, LA, P, CMYK,
            ...); a lazily opened file is decoded here.
        cfg: the weights' preprocessing (image_size S, interpolation, resize_mode).
    Returns:
        numpy uint8 array [S, S, 3] (height, width, RGB), C-contiguous and writable.
    Raises:
        TypeError: ``img`` is not a PIL image.
        ValueError: the image has zero width or height.
        OSError: Pillow cannot decode the image data (truncated or corrupt file).
    """
    if not isinstance(img, Image.Image):
        raise TypeError(f"expected a PIL.Image.Image, got {type(img).__name__}")
    width, height = img.size
    if width <= 0 or height <= 0:
        raise ValueError(f"image has no pixels: size {width}x{height}")
    size = cfg.image_size
    new_size = resize_size(width, height, cfg)
    if new_size != (width, height):
        img = img.resize(new_size, resample=_RESAMPLE[cfg.interpolation])
    if cfg.resize_mode == "shortest":
        # After a shortest-side resize both sides are >= S, so the crop never needs padding.
        new_width, new_height = new_size
        left, top = _crop_offsets(new_size, cfg)
        if (new_width, new_height) != (size, size):
            img = img.crop((left, top, left + size, top + size))
    rgb = img.convert("RGB")
    # np.array copies: np.asarray on a PIL image is read-only, which torch.from_numpy warns about.
    return np.array(rgb, dtype=np.uint8)


def pixels_tensor(img: Image.Image) -> torch.Tensor:
    """An RGB image's pixels as a uint8 tensor [1, C, H, W] in channels-last memory, the layout
    torch's SIMD resampling kernels take.

    C = 4 (R, G, B and Pillow's padding byte, which resampling ignores) when the image's rows
    lie in one block: a view of Pillow's own memory through its Arrow export (Pillow >= 11.2),
    no copy (a copy to RGB costs ~0.35 ms for a 600 x 450 photo). Else C = 3, a copy. Read the tensor only
    while ``img`` is alive and do not write to it.
    Raises ValueError when ``img.mode`` is not "RGB".
    """
    import warnings

    import pyarrow as pa
    import torch

    if img.mode != "RGB":
        raise ValueError(f"pixels_tensor needs an RGB image, got mode {img.mode!r}")
    width, height = img.size
    hwc = None
    if hasattr(img, "__arrow_c_array__"):  # Pillow >= 11.2
        try:
            exported = pa.array(img)
            if exported.type.list_size == 4:  # RGB travels as four bytes a pixel
                hwc = exported.values.to_numpy(zero_copy_only=True).reshape(1, height, width, 4)
        except (ValueError, TypeError, pa.ArrowException):  # rows in several blocks (large images)
            hwc = None
    if hwc is None:
        hwc = np.asarray(img)[None]
    with warnings.catch_warnings():
        # Arrow memory is read-only and torch warns about that; these tensors are only read.
        warnings.filterwarnings("ignore", "The given NumPy array is not writable", UserWarning)
        return torch.from_numpy(hwc).permute(0, 3, 1, 2)


def resize_tensor_uint8(x: torch.Tensor, size: tuple[int, int], interpolation: str) -> torch.Tensor:
    """Antialiased resize of uint8 [1, C, H, W] (as :func:`pixels_tensor` gives) to ``size``
    (width, height) with ``interpolation`` ("bicubic" or "bilinear", PIL's filters); returns
    uint8 [1, C, height, width], channels-last."""
    import torch.nn.functional as F

    if interpolation not in _RESAMPLE:
        raise ValueError(f"interpolation must be bicubic or bilinear, got {interpolation!r}")
    width, height = size
    if (x.shape[-1], x.shape[-2]) == (width, height):
        return x
    return F.interpolate(x, size=(height, width), mode=interpolation, antialias=True)


def resize_crop_tensor_uint8(x: torch.Tensor, cfg: PreprocessConfig) -> np.ndarray:
    """:func:`resize_crop_uint8` of the image that :func:`pixels_tensor` made ``x`` from, by
    torch's kernels: the same sizes, filter and crop; a few pixels 1-3 levels off (see the
    module docstring).

    Returns numpy uint8 [S, S, 3] (height, width, RGB), C-contiguous and writable.
    """
    height, width = int(x.shape[-2]), int(x.shape[-1])
    if width <= 0 or height <= 0:
        raise ValueError(f"image has no pixels: size {width}x{height}")
    size = cfg.image_size
    new_size = resize_size(width, height, cfg)
    x = resize_tensor_uint8(x, new_size, cfg.interpolation)
    if cfg.resize_mode == "shortest" and new_size != (size, size):
        left, top = _crop_offsets(new_size, cfg)
        x = x[..., top : top + size, left : left + size]
    return x[0, :3].permute(1, 2, 0).contiguous().numpy()


def normalize_uint8(
    batch: torch.Tensor | np.ndarray,
    cfg: PreprocessConfig,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Turn a batch of RGB uint8 images into normalised model input.

    Moves the uint8 batch to ``device`` first (a quarter of the bytes of float32), then
    computes ``(x / 255 - mean) / std`` for the whole batch at once, in float32 (float64
    when ``dtype`` is float64), and casts to ``dtype`` last.

    Args:
        batch: uint8 [N, S, S, 3] (as stacked from ``resize_crop_uint8``), numpy or torch.
        cfg: the weights' preprocessing (image_size S, mean, std).
        device: where the result lives; None keeps the input's device (CPU for numpy).
        dtype: floating dtype of the result (float32, float16, bfloat16, float64); None:
            float32.
    Returns:
        torch tensor [N, 3, S, S] of ``dtype`` on ``device``, contiguous (channels first).
    Raises:
        TypeError: ``batch`` is not uint8 numpy/torch, or ``dtype`` is not floating.
        ValueError: ``batch`` is not shaped [N, S, S, 3].
    """
    import torch

    if dtype is None:
        dtype = torch.float32
    if isinstance(batch, np.ndarray):
        if batch.dtype != np.uint8:
            raise TypeError(f"batch must be uint8, got numpy {batch.dtype}")
        if not batch.flags.writeable:
            batch = batch.copy()
        batch = torch.from_numpy(np.ascontiguousarray(batch))
    elif isinstance(batch, torch.Tensor):
        if batch.dtype != torch.uint8:
            raise TypeError(f"batch must be uint8, got torch {batch.dtype}")
    else:
        raise TypeError(f"batch must be a numpy array or torch tensor, got {type(batch).__name__}")
    if not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating dtype, got {dtype}")
    size = cfg.image_size
    if batch.ndim != 4 or tuple(batch.shape[1:]) != (size, size, 3):
        raise ValueError(
            f"batch must be uint8 [N, {size}, {size}, 3] for image_size {size}, "
            f"got shape {tuple(batch.shape)}"
        )
    if device is not None:
        batch = batch.to(device, non_blocking=True)
    compute_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    x = batch.permute(0, 3, 1, 2).to(dtype=compute_dtype, memory_format=torch.contiguous_format)
    mean = torch.tensor(cfg.mean, dtype=compute_dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std, dtype=compute_dtype, device=x.device).view(1, 3, 1, 1)
    x = x.div_(255).sub_(mean).div_(std)
    return x.to(dtype)


class ImageTransform:
    """Callable PIL image -> float32 tensor [3, S, S]; see :func:`image_transform`."""

    def __init__(self, cfg: PreprocessConfig) -> None:
        self.cfg = cfg

    def __call__(self, img: Image.Image) -> torch.Tensor:
        pixels = resize_crop_uint8(img, self.cfg)
        return normalize_uint8(pixels[None], self.cfg)[0]

    def __repr__(self) -> str:
        return f"ImageTransform({self.cfg!r})"


def image_transform(cfg: PreprocessConfig) -> ImageTransform:
    """The eval transform for weights preprocessed with ``cfg``.

    Returns:
        a picklable callable: PIL image (any mode) -> torch.float32 [3, S, S], normalised.
        Matches open_clip's eval ``preprocess`` for the same settings.
    """
    return ImageTransform(cfg)
