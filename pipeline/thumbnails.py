"""Row thumbnails for dedup's pixel check: 32 x 32 RGB, uint8, 3 KiB per row.

Made by the decode task from the model's input pixels (a centre square of the decoded image),
so they do not depend on how the stored copy was resized; compared by pipeline/pixel_check.py.
No torch here: decode workers import this module.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

THUMB_SIDE = 32
THUMB_BYTES = THUMB_SIDE * THUMB_SIDE * 3


def thumbnail(img: Image.Image, side: int = THUMB_SIDE) -> bytes:
    """``side`` x ``side`` RGB thumbnail of a PIL image (the whole image, squashed; bilinear
    with antialiasing), as ``side * side * 3`` uint8 bytes in row-major (y, x, RGB) order."""
    rgb = img.convert("RGB")
    return rgb.resize((side, side), Image.Resampling.BILINEAR).tobytes()


def thumbs_array(
    values: Sequence[bytes | None], side: int = THUMB_SIDE
) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [N, side, side, 3] from thumbnail bytes, and bool [N]: False where a value is
    null or not ``side * side * 3`` bytes long (that row's slot is zero)."""
    n = len(values)
    out = np.zeros((n, side, side, 3), dtype=np.uint8)
    ok = np.zeros(n, dtype=bool)
    size = side * side * 3
    for i, v in enumerate(values):
        if v is not None and len(v) == size:
            out[i] = np.frombuffer(v, dtype=np.uint8).reshape(side, side, 3)
            ok[i] = True
    return out, ok


