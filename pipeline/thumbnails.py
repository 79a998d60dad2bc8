"""Row thumbnails for dedup's pixel check: 32 x 32 RGB, uint8, 3 KiB per row.

Made by the decode task from the model's input pixels (a centre square of the decoded image),
so they do not depend on how the stored copy was resized; compared by pipeline/pixel_check.py.
No torch here: decode workers import this module.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
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




class ThumbColumn:
    """Thumbnails of chosen rows of an Arrow binary column, gathered straight from its buffers.

    ``rows``: int64 [N], the table rows this view answers for (position p means table row
    ``rows[p]``). Memory: 13 bytes per position besides the column itself, however many
    lookups are made; nothing per row is kept between calls (dedup asks about the same rows
    thousands of times, and a per-row cache of small arrays fragments the heap). ``col`` None
    (no thumbnail column) makes every row missing."""

    def __init__(self, col: pa.ChunkedArray | None, rows: np.ndarray, side: int = THUMB_SIDE) -> None:
        self.side = side
        size = side * side * 3
        rows = np.asarray(rows, dtype=np.int64)
        n = len(rows)
        self.chunk = np.zeros(n, dtype=np.int32)
        self.start = np.zeros(n, dtype=np.int64)
        self.ok = np.zeros(n, dtype=bool)
        self.data: list[np.ndarray] = []
        if col is None:
            return
        bounds = np.cumsum([0] + [len(c) for c in col.chunks])
        which = np.searchsorted(bounds, rows, side="right") - 1
        for c, arr in enumerate(col.chunks):
            if not (pa.types.is_binary(arr.type) or pa.types.is_large_binary(arr.type)):
                arr = arr.cast(pa.large_binary())
            sel = np.flatnonzero(which == c)
            local = rows[sel] - bounds[c]
            _, offsets_buf, data_buf = arr.buffers()
            width = np.int64 if pa.types.is_large_binary(arr.type) else np.int32
            offsets = np.frombuffer(offsets_buf, dtype=width)[arr.offset : arr.offset + len(arr) + 1]
            valid = arr.is_valid().to_numpy(zero_copy_only=False)[local]
            begin = offsets[local].astype(np.int64)
            self.ok[sel] = valid & (offsets[local + 1] - begin == size)
            self.start[sel] = begin
            self.chunk[sel] = c
            empty = data_buf is None  # an all-null chunk may have no data buffer
            self.data.append(np.zeros(0, np.uint8) if empty else np.frombuffer(data_buf, np.uint8))

    def __len__(self) -> int:
        return len(self.ok)

    def gather(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 [K, side, side, 3] thumbnails of positions ``idx`` (int [K]) and bool [K]
        ok; a missing thumbnail's slot is zero."""
        idx = np.asarray(idx, dtype=np.int64)
        size = self.side * self.side * 3
        out = np.zeros((len(idx), size), dtype=np.uint8)
        ok = self.ok[idx]
        for c in np.unique(self.chunk[idx[ok]]).tolist():
            sel = np.flatnonzero(ok & (self.chunk[idx] == c))
            out[sel] = self.data[c][self.start[idx[sel], None] + np.arange(size)]
        return out.reshape(len(idx), self.side, self.side, 3), ok
