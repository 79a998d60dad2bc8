"""Curating stored copies (``--input-format img2dataset``): what keeping a copy byte for byte
saves against encoding it again, in CPU and in fidelity.

img2dataset (its defaults: 256 px ``border``, JPEG quality 95) downloads ``bench/job_cpu.py``'s
photo-like world (300-1200 px JPEGs) from a loopback server; then the job's decode
(``pipeline.stages.decode.decode_image`` with the bundled model's input, its dedup thumbnail
and PDQ, on one thread as in the decode child) runs over every stored copy twice: marked as a
stored copy (kept byte for byte where it already is the job's copy) and as if it were a
download (always re-encoded). Per image: thread CPU time of the decode, how many copies were
kept, and the PSNR of the re-encoded copy against the copy img2dataset stored (what a second
JPEG pass costs; a kept copy loses nothing).

    python bench/stored_copy.py --rows 600 --append bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tarfile
import tempfile
import time
from dataclasses import replace
from pathlib import Path

os.environ["OMP_NUM_THREADS"] = "1"
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from PIL import Image  # noqa: E402
from results_md import append  # noqa: E402


def stored_copies(workdir: Path, rows: int, seed: int) -> list[tuple[bytes, tuple[int, int]]]:
    """img2dataset's stored JPEGs of the photo-like world, each with its original's size."""
    from job_cpu import make_world

    from testkit.http_server import FaultServer
    from testkit.img2dataset_output import run_img2dataset

    world = make_world(workdir, rows, seed)
    table = pq.read_table(world / "urls.parquet")
    with FaultServer(world) as srv:
        urls = [srv.url(p) for p in table.column("_gt_path").to_pylist()]
        pq.write_table(table.set_column(table.column_names.index("url"), "url", pa.array(urls)),
                       workdir / "list.parquet")
        run_img2dataset(workdir / "list.parquet", workdir / "i2d", number_sample_per_shard=10000, image_size=256)
    out = []
    for table_path in sorted((workdir / "i2d").glob("*.parquet")):
        sizes = {r["key"]: (r["original_width"], r["original_height"]) for r in pq.read_table(table_path).to_pylist()}
        with tarfile.open(table_path.with_suffix(".tar")) as tar:
            for m in tar:
                key, _, ext = m.name.partition(".")
                if m.isfile() and ext == "jpg":
                    out.append((tar.extractfile(m).read(), sizes[key]))
    return out


def psnr(a: bytes, b: bytes) -> float:
    x, y = (np.asarray(Image.open(io.BytesIO(d)).convert("RGB"), np.float64) for d in (a, b))
    mse = float(((x - y) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def main(argv: list[str] | None = None) -> dict[str, tuple[float, int, np.ndarray]]:
    """Runs the figure; returns, per way, (ms per image, copies kept, PSNRs of re-encoded ones)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=600)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir")
    p.add_argument("--append")
    a = p.parse_args(argv)

    from clip_model.config import PreprocessConfig
    from pipeline.config import DecodeConfig
    from pipeline.stages.decode import DecodeOptions, decode_image

    with tempfile.TemporaryDirectory(prefix="stored-copy-") as tmp:
        work = Path(a.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        copies = stored_copies(work, a.rows, a.seed)
    base = DecodeOptions(DecodeConfig(), PreprocessConfig(image_size=64), thumbnails=True)
    results = {}
    for name, stored in (("re-encoded (as a download)", False), ("kept where it is the job's copy", True)):
        for data, size in copies[:20]:  # warm caches and lazy imports outside the timing
            decode_image(data, replace(base, unpad=size, stored=stored))
        started = time.thread_time()
        made = [decode_image(data, replace(base, unpad=size, stored=stored)).data for data, size in copies]
        ms = (time.thread_time() - started) * 1000 / len(copies)
        kept = sum(m == data for m, (data, _) in zip(made, copies, strict=True))
        quality = np.array([psnr(data, m) for m, (data, _) in zip(made, copies, strict=True)])
        finite = quality[np.isfinite(quality)]
        results[name] = (ms, kept, finite)
    rows = []
    for name, (ms, kept, finite) in results.items():
        psnr_text = (f"{np.median(finite):.1f} / {np.percentile(finite, 5):.1f} / {finite.min():.1f}"
                     if finite.size else "identical")
        rows.append(f"| {name} | {ms:.3f} | {kept} of {len(copies)} | {psnr_text} |")
    table = ("| stored copy | decode CPU ms / image | kept byte for byte | PSNR vs img2dataset's copy, "
             "re-encoded ones (median / 5th pct / worst, dB) |\n|---|---:|---:|---|\n" + "\n".join(rows))
    print(table)
    if a.append:
        append(a.append, "Curating stored copies: kept byte for byte vs encoded again",
               f"{len(copies)} copies img2dataset stored (its defaults: 256 px border, JPEG q95) of "
               f"{a.rows} photo-like JPEGs (300-1200 px); the job's decode with the bundled model's "
               "64 px input, thumbnail and PDQ, thread CPU time, one thread.", table, argv)
    return results


if __name__ == "__main__":
    main()
