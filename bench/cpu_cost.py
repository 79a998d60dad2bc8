"""CPU cost per image of the job's CPU-side image work, one core: the figure cluster sizing
(docs/operations.md) multiplies by the GPUs' embedding rate.

On ``--rows`` synthetic JPEGs whose long side is ``--min-side``..``--max-side`` px (the same
generator as bench/download.py), times with ``time.process_time`` (CPU seconds of this
process, so other load on the machine inflates it less than wall time would):

- decode: ``pipeline.stages.decode.decode_image`` (sniff, draft decode, EXIF, resize, re-encode
  to ``--image-size`` px, sha256), i.e. the decode stage's work per row;
- preprocess: ``clip_model.transform.resize_crop_uint8`` from the stored image to the model
  input (``--model-size`` px), i.e. the preprocess stage's work per row.

Each is run ``--repeats`` times over all images; the best (least disturbed) and the median are
printed in ms per image. Neither counts download, tar writing, tokenizing or Parquet.

    .venv/bin/python bench/cpu_cost.py --rows 300 --append bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
# The repository root: this checkout's packages and the test rig (testkit is not installed).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def cpu_ms_per_item(items: list[bytes], fn: Callable[[bytes], object], repeats: int) -> list[float]:
    """CPU milliseconds per item of ``fn`` over ``items``, once per repeat."""
    out = []
    for _ in range(repeats):
        t0 = time.process_time()
        for item in items:
            fn(item)
        out.append((time.process_time() - t0) / len(items) * 1000)
    return out


def main(argv: list[str] | None = None) -> dict[str, list[float]]:
    """Measure; print (and with ``--append``, append) a Markdown section. Returns the per-repeat
    ms/image of ``decode`` and ``preprocess``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=300)
    p.add_argument("--min-side", type=int, default=300)
    p.add_argument("--max-side", type=int, default=1200)
    p.add_argument("--image-size", type=int, default=256, help="stored size (decode.image_size)")
    p.add_argument("--resize-mode", default="border")
    p.add_argument("--model-size", type=int, default=224, help="model input size (ViT-B-32/L-14: 224)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--append", default=None, help="append the section to this Markdown file")
    a = p.parse_args(argv)
    if a.rows < 1 or a.repeats < 1:
        p.error("--rows and --repeats must be >= 1")

    # One thread, as one decode task uses one core.
    import torch
    from PIL import Image

    torch.set_num_threads(1)
    from clip_model.config import PreprocessConfig
    from clip_model.transform import resize_crop_uint8
    from pipeline.config import DecodeConfig
    from pipeline.stages.decode import decode_image
    from testkit.synthetic import generate_world

    with tempfile.TemporaryDirectory(prefix="clipcurate-cpu-cost-") as tmp:
        generate_world(tmp, a.rows, a.seed, "http://127.0.0.1/", formats={"jpeg": 1.0},
                       min_side=a.min_side, max_side=a.max_side)
        sources = [f.read_bytes() for f in sorted((Path(tmp) / "images").rglob("*.jpg"))]
    cfg = DecodeConfig(image_size=a.image_size, resize_mode=a.resize_mode)
    stored = [decode_image(d, cfg).data for d in sources]
    pp = PreprocessConfig(image_size=a.model_size)

    def preprocess(data: bytes) -> object:
        with Image.open(io.BytesIO(data)) as img:
            return resize_crop_uint8(img, pp)

    res = {
        "decode": cpu_ms_per_item(sources, lambda d: decode_image(d, cfg), a.repeats),
        "preprocess": cpu_ms_per_item(stored, preprocess, a.repeats),
    }
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load = os.getloadavg()
    rows = [
        f"| decode: JPEG {a.min_side}-{a.max_side} px -> {a.image_size} px {a.resize_mode} (decode_image) "
        f"| {min(res['decode']):.2f} | {statistics.median(res['decode']):.2f} |",
        f"| preprocess: stored {a.image_size} px -> {a.model_size} px uint8 (resize_crop_uint8) "
        f"| {min(res['preprocess']):.2f} | {statistics.median(res['preprocess']):.2f} |",
    ]
    text = (
        f"\n## CPU cost per image: decode and preprocess, one core ({when})\n\n"
        f"Machine: {platform.node()}, {os.cpu_count()} CPUs, {platform.machine()}; load average "
        f"{load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f} (1/5/15 min) at the end. Command: "
        f"`python bench/cpu_cost.py {shlex.join(argv)}`. {len(sources)} synthetic JPEGs, "
        f"CPU time (process_time) of one thread, {a.repeats} passes.\n\n"
        "| work | CPU ms/image (best) | CPU ms/image (median) |\n|---|---:|---:|\n"
        + "\n".join(rows) + "\n"
    )
    print(text)
    if a.append:
        with open(a.append, "a") as f:
            f.write(text)
    return res


if __name__ == "__main__":
    main()
