"""Row thumbnails for dedup's pixel check: 32 x 32 RGB, uint8, 3 KiB per row.

Made by the decode task from the model's input pixels (a centre square of the decoded image),
so they do not depend on how the stored copy was resized; compared by pipeline/pixel_check.py.
No torch here: decode workers import this module.
"""

from __future__ import annotations

import os
import tempfile
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




class ThumbFile:
    """A table's thumbnails spilled to an unnamed temporary file, one fixed-size record per
    table row (``side * side * 3`` bytes on disk, 1 byte in memory), read back with ``pread``.

    The global pass holds one run's rows at once; their thumbnails (3 KiB a row) are most of
    that memory, while the pixel check reads only the rows in candidate pairs. The file is
    deleted when closed (or when the process dies: it has no name). ``folder``: where to put
    it (the system's temporary folder by default)."""

    def __init__(self, side: int = THUMB_SIDE, folder: str | None = None) -> None:
        self.side = side
        self.record = side * side * 3
        self._file = tempfile.TemporaryFile(prefix="clipcurate-thumbs-", dir=folder)
        self._ok: list[np.ndarray] = []
        self._ok_all: np.ndarray | None = np.zeros(0, dtype=bool)
        self.rows = 0

    def append(self, col: pa.ChunkedArray | pa.Array) -> None:
        """Add the thumbnails of ``col`` (binary, one value per table row, nulls allowed) as
        the next ``len(col)`` table rows."""
        if isinstance(col, pa.Array):
            col = pa.chunked_array([col], type=col.type)
        n = len(col)
        view = ThumbColumn(col, np.arange(n), self.side)
        # A shard at a time: ~1.5 MiB of temporaries for 500 rows.
        for s in range(0, n, 4096):
            arr, ok = view.gather(np.arange(s, min(n, s + 4096)))
            self._file.write(arr.tobytes())
            self._ok.append(ok)
        self.rows += n
        self._ok_all = None

    @property
    def ok(self) -> np.ndarray:
        """bool [rows]: which table rows have a thumbnail."""
        if self._ok_all is None:
            self._ok_all = np.concatenate(self._ok) if self._ok else np.zeros(0, dtype=bool)
            self._ok = [self._ok_all]
        return self._ok_all

    def gather(self, table_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 [K, side, side, 3] thumbnails of ``table_rows`` (int [K], any order, repeats
        allowed) and bool [K] ok; a missing thumbnail's slot is zero. One read per run of
        consecutive rows."""
        table_rows = np.asarray(table_rows, dtype=np.int64)
        if len(table_rows) and (table_rows.min() < 0 or table_rows.max() >= self.rows):
            raise IndexError(f"thumbnail rows out of range 0..{self.rows - 1}")
        self._file.flush()
        uniq, inv = np.unique(table_rows, return_inverse=True)
        got = np.zeros((len(uniq), self.record), dtype=np.uint8)
        breaks = np.flatnonzero(np.diff(uniq) != 1) + 1
        fd = self._file.fileno()
        for start, stop in zip(np.r_[0, breaks].tolist(), np.r_[breaks, len(uniq)].tolist(), strict=True):
            size = (stop - start) * self.record
            data = os.pread(fd, size, int(uniq[start]) * self.record)
            if len(data) != size:
                raise OSError(f"thumbnail spill file: short read ({len(data)} of {size} bytes)")
            got[start:stop] = np.frombuffer(data, dtype=np.uint8).reshape(stop - start, self.record)
        out = got[inv.reshape(-1)]
        return out.reshape(len(table_rows), self.side, self.side, 3), self.ok[table_rows]

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> ThumbFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ThumbColumn:
    """Thumbnails of chosen rows of an Arrow binary column, gathered straight from its buffers,
    or of a :class:`ThumbFile`.

    ``rows``: int64 [N], the table rows this view answers for (position p means table row
    ``rows[p]``). Memory: 13 bytes per position besides the column itself, however many
    lookups are made; nothing per row is kept between calls (dedup asks about the same rows
    thousands of times, and a per-row cache of small arrays fragments the heap). ``col`` None
    (no thumbnail column) makes every row missing."""

    def __init__(
        self, col: pa.ChunkedArray | ThumbFile | None, rows: np.ndarray, side: int = THUMB_SIDE
    ) -> None:
        self.side = side
        size = side * side * 3
        rows = np.asarray(rows, dtype=np.int64)
        n = len(rows)
        self.file: ThumbFile | None = None
        if isinstance(col, ThumbFile):
            if col.side != side:
                raise ValueError(f"thumbnail file holds {col.side} px thumbnails, not {side}")
            self.file, self.rows, self.ok = col, rows, col.ok[rows]
            return
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
        if self.file is not None:
            return self.file.gather(self.rows[idx])
        size = self.side * self.side * 3
        out = np.zeros((len(idx), size), dtype=np.uint8)
        ok = self.ok[idx]
        for c in np.unique(self.chunk[idx[ok]]).tolist():
            sel = np.flatnonzero(ok & (self.chunk[idx] == c))
            out[sel] = self.data[c][self.start[idx[sel], None] + np.arange(size)]
        return out.reshape(len(idx), self.side, self.side, 3), ok
