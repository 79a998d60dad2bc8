"""Cost of the decode stage's crash guard: rows/s with ``isolate=True`` (decoding in a child
process, pipeline/crashguard.py) against ``isolate=False`` (in the worker), same rows.

    python bench/decode_isolation.py --rows 280 --repeats 5

Two row sets: the shared small test photos (a few KB to 40 KB, where per-row overhead shows
most) and generated 1600x1200 JPEGs (a typical web photo; the decode itself dominates).
Each repeat times both modes back to back, alternating which goes first; the child is
started before timing (it starts once per worker process in a job). Prints best and median
rows/s per mode and the median overhead.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import schema as S  # noqa: E402
from pipeline.config import DecodeConfig  # noqa: E402
from pipeline.crashguard import close_shared  # noqa: E402
from pipeline.stages.decode import DecodeStage  # noqa: E402
from testkit.hostile_images import TESTDATA  # noqa: E402


def _rows(blobs: list[bytes]) -> pa.Table:
    n = len(blobs)
    return pa.table({
        S.KEY: [f"{i:09d}" for i in range(n)],
        S.URL: [f"http://127.0.0.1/{i}.jpg" for i in range(n)],
        S.STATUS: [S.OK] * n,
        S.ERROR: pa.nulls(n, pa.string()),
        S.IMAGE_BYTES: pa.array(blobs, pa.binary()),
    })


def _photo(seed: int, size: tuple[int, int]) -> bytes:
    rng = np.random.default_rng(seed)
    # Smooth gradients plus noise: compresses like a photo, not like flat colour or pure noise.
    y, x = np.mgrid[0 : size[1], 0 : size[0]]
    base = np.stack([(x * (r + 1) + y * (3 - r)) % 256 for r in range(3)], axis=-1).astype(np.float64)
    img = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img, "RGB").save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _measure(table: pa.Table, cfg: DecodeConfig, repeats: int) -> dict[bool, list[float]]:
    DecodeStage(cfg=cfg).process_batch(table.slice(0, 1))  # start the child outside the timing
    rates: dict[bool, list[float]] = {False: [], True: []}
    for rep in range(repeats):
        for isolate in ((False, True) if rep % 2 == 0 else (True, False)):
            t0 = time.perf_counter()
            out = DecodeStage(cfg=cfg, isolate=isolate).process_batch(table)
            rates[isolate].append(table.num_rows / (time.perf_counter() - t0))
            assert out.column(S.STATUS).to_pylist() == [S.OK] * table.num_rows
    return rates


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=280, help="rows of small test photos per timing")
    ap.add_argument("--large-rows", type=int, default=40, help="rows of 1600x1200 JPEGs per timing")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--image-size", type=int, default=256)
    args = ap.parse_args(argv)

    photos = [p.read_bytes() for p in sorted(TESTDATA.glob("*.jpg"))]
    large = [_photo(i, (1600, 1200)) for i in range(8)]
    sets = {
        f"test photos ({len(photos)} files, {min(map(len, photos)) // 1024}-{max(map(len, photos)) // 1024} KB)":
            _rows([photos[i % len(photos)] for i in range(args.rows)]),
        f"1600x1200 JPEG (~{sum(map(len, large)) // len(large) // 1024} KB)":
            _rows([large[i % len(large)] for i in range(args.large_rows)]),
    }
    cfg = DecodeConfig(image_size=args.image_size, resize_mode="border")
    print(f"decode to {args.image_size}px border, {args.repeats} repeats; rows/s (best / median)")
    for name, table in sets.items():
        rates = _measure(table, cfg, args.repeats)
        overhead = 1 - statistics.median(rates[True]) / statistics.median(rates[False])
        print(f"  {name}, {table.num_rows} rows")
        for isolate in (False, True):
            label = "isolated  " if isolate else "in-process"
            print(f"    {label} {max(rates[isolate]):8.1f} / {statistics.median(rates[isolate]):8.1f}")
        print(f"    overhead of isolation (median): {100 * overhead:.1f} %")
    close_shared()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
