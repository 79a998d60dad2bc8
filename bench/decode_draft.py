"""How far below full size a JPEG may be drafted (DCT-scaled) before the stored copy drifts from
img2dataset's, and what each headroom costs.

For photo-like JPEGs (``bench/job_cpu.py``'s world: synthetic scenes re-encoded with camera-like
grain, long side 300-1200 px) plus the real photos in ``../shared/testdata`` (each also upscaled
to a 1200 px long side), the stored copy (``image_size`` 256, ``border``) is made by
``pipeline.stages.decode.decode_image`` with the draft's storage headroom set to each value
(the model input is not made; 0 = no draft) and compared with img2dataset's ``Resizer`` (OpenCV
full decode, INTER_AREA), both encoded as PNG so that only decoding and resizing differ. Beside
it: the PSNR of encoding img2dataset's own copy as JPEG quality 95, which both tools then do,
i.e. the error every stored copy carries anyway; beside each headroom, the same figure for the
file the job stores (JPEG q95), which is the one to compare with img2dataset's. CPU time is ``decode_image`` per image as the
job runs it (decode, resize, JPEG q95 encode, sha256, PDQ; no model input), one process.

    python bench/decode_draft.py --rows 300 --append bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
from results_md import append  # noqa: E402

from pipeline.config import DecodeConfig  # noqa: E402
from pipeline.stages import decode as D  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "testdata"


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 99.0 if mse == 0 else 10 * np.log10(255.0**2 / mse)


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def inputs(rows: int, seed: int) -> list[bytes]:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from job_cpu import make_world

    world = make_world(Path("/tmp/clipcurate-bench-jobcpu"), max(rows, 300), seed)
    files = sorted((world / "images").rglob("*.jpg"))[:rows]
    out = [f.read_bytes() for f in files]
    for p in sorted(SHARED.rglob("*.jpg")):
        data = p.read_bytes()
        out.append(data)
        im = Image.open(io.BytesIO(data)).convert("RGB")
        k = 1200 / max(im.size)
        buf = io.BytesIO()
        im.resize((round(im.width * k), round(im.height * k)), Image.Resampling.BICUBIC).save(buf, "JPEG", quality=95)
        out.append(buf.getvalue())
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--headrooms", type=float, nargs="+", default=[0, 3, 2, 1.5, 1.25])
    p.add_argument("--append", default=None)
    a = p.parse_args(argv)
    from img2dataset.resizer import Resizer

    data = inputs(a.rows, a.seed)
    ref_resizer = Resizer(256, "border", False, encode_format="png", encode_quality=1)
    refs = []
    q95 = []
    for d in data:
        ref, *_rest, err = ref_resizer(io.BytesIO(d))
        assert err is None, err
        rp = pixels(ref)
        refs.append(rp)
        buf = io.BytesIO()
        Image.fromarray(rp).save(buf, "JPEG", quality=95)
        q95.append(psnr(pixels(buf.getvalue()), rp))
    cfg = DecodeConfig(image_size=256, resize_mode="border", encode_format="png")
    timed = DecodeConfig(image_size=256, resize_mode="border")  # the job's JPEG q95
    lines = [
        "| storage draft headroom | ms / image | PSNR vs img2dataset: median | 5th pct | worst "
        "| stored JPEG vs img2dataset's pixels: median | 5th pct | worst |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    saved = D._STORE_DRAFT_HEADROOM
    try:
        for h in a.headrooms:
            D._STORE_DRAFT_HEADROOM = h if h > 0 else 1e9  # 1e9: never draft
            t = time.process_time()
            for d in data:
                D.decode_image(d, timed)
            ms = 1000 * (time.process_time() - t) / len(data)
            outs = [D.decode_image(d, cfg).data for d in data]
            ps = np.array([psnr(pixels(o), r) for o, r in zip(outs, refs, strict=True)])
            # What a user gets: the stored file (JPEG q95) against img2dataset's exact pixels,
            # to read beside the same figure for img2dataset's own stored file (last line).
            stored = [D.decode_image(d, timed).data for d in data]
            fs = np.array([psnr(pixels(o), r) for o, r in zip(stored, refs, strict=True)])
            name = "none (full decode)" if h == 0 else f"{h:g}x" + (" (default)" if h == saved else "")
            lines.append(f"| {name} | {ms:.2f} | {np.median(ps):.1f} | {np.percentile(ps, 5):.1f} | {ps.min():.1f} "
                         f"| {np.median(fs):.1f} | {np.percentile(fs, 5):.1f} | {fs.min():.1f} |")
    finally:
        D._STORE_DRAFT_HEADROOM = saved
    q = np.array(q95)
    lines.append(
        f"| img2dataset's copy re-encoded as JPEG q95 (the stored file's own error) | | | | | "
        f"{np.median(q):.1f} | {np.percentile(q, 5):.1f} | {q.min():.1f} |"
    )
    table = "\n".join(lines)
    print(table)
    if a.append:
        append(a.append, "JPEG draft headroom of the stored copy vs img2dataset's pixels",
               f"{len(data)} JPEGs ({a.rows} photo-like, 300-1200 px, and the test photos at their "
               "size and at 1200 px); stored copy 256 px border, PNG on both sides for the PSNR, the "
               "job's JPEG q95 for the time.", table, argv)


if __name__ == "__main__":
    main()
