"""Where the decode child's CPU goes, step by step, with one decoder and with several at once.

The job's decode (``pipeline.stages.decode.decode_row``, as the crash-guard child runs it: the
stored copy at ``image_size`` 256 ``border``, the bundled model's 64 px input, its dedup
thumbnail, PDQ) on the photo-like JPEGs of ``bench/job_cpu.py``'s world. Each step's thread CPU
time is summed by wrapping the function that does it: the JPEG decode (Pillow's ``load``), the
tensor view of the pixels, the model input (and thumbnail), the stored copy's resize, PDQ,
padding, the JPEG encode; "rest" is the header checks, colour conversion and sha256. With
``--copies 1 2`` the same run is made by one process alone, then by two processes at once (each
on all the images), which is how the job's two CPU workers decode on two cores: the difference
per image is what two decoders cost each other without the rest of the job around them.
torch runs on one thread, as in the decode child (``OMP_NUM_THREADS=1``).

    python bench/decode_steps.py --images 600 --copies 1 2 --append bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

os.environ["OMP_NUM_THREADS"] = "1"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from results_md import append  # noqa: E402

# (module, attribute) wrapped for each step, in the order the decode runs them.
STEPS = [
    ("jpeg decode", "PIL.ImageFile", "ImageFile.load"),
    ("tensor view", "clip_model.transform", "pixels_tensor"),
    ("model input + thumbnail", "pipeline.stages.decode", "_model_input"),
    ("stored copy resize", "pipeline.stages.decode", "_shrink"),
    ("PDQ", "pipeline.stages.decode", "_pdq"),
    ("pad", "pipeline.stages.decode", "_place"),
    ("JPEG encode", "pipeline.stages.decode", "_encode"),
]


def _wrap(spent: dict[str, float], name: str, module: str, attr: str) -> None:
    import importlib

    owner: object = importlib.import_module(module)
    *path, leaf = attr.split(".")
    for part in path:
        owner = getattr(owner, part)
    inner = getattr(owner, leaf)

    def timed(*args: object, **kwargs: object) -> object:
        t = time.thread_time()
        try:
            return inner(*args, **kwargs)
        finally:
            spent[name] += time.thread_time() - t

    setattr(owner, leaf, timed)


def run_steps(paths: list[str], barrier: tuple[Path, int] | None = None) -> dict[str, float]:
    """Thread CPU ms per image of each step of ``decode_row`` over ``paths`` (after 10 warm-up
    images), plus ``"total"`` and ``"rest"``. ``barrier``: (a folder, n): start timing once n
    processes have said they are ready there."""
    import torch

    torch.set_num_threads(1)
    from clip_model.config import PreprocessConfig
    from pipeline.config import DecodeConfig
    from pipeline.stages import decode as D

    spent: dict[str, float] = defaultdict(float)
    for name, module, attr in STEPS:
        _wrap(spent, name, module, attr)
    opts = D.DecodeOptions(DecodeConfig(), PreprocessConfig(image_size=64), thumbnails=True)
    blobs = [Path(p).read_bytes() for p in paths]
    for b in blobs[:10]:
        out = D.decode_row((b, None, opts))
        assert not isinstance(out, tuple), out
    spent.clear()
    if barrier is not None:
        folder, n = barrier
        (folder / str(os.getpid())).touch()
        while len(list(folder.iterdir())) < n:
            time.sleep(0.001)
    t0 = time.thread_time()
    for b in blobs:
        D.decode_row((b, None, opts))
    total = time.thread_time() - t0
    n = len(blobs)
    out = {name: spent[name] * 1e3 / n for name, _, _ in STEPS}
    out["rest"] = (total - sum(spent.values())) * 1e3 / n
    out["total"] = total * 1e3 / n
    return out


def measure(paths: list[str], copies: int) -> list[dict[str, float]]:
    """One result of :func:`run_steps` per process, ``copies`` processes (fresh interpreters,
    as the job's decode children are) decoding at once."""
    with tempfile.TemporaryDirectory() as tmp:
        listing = Path(tmp) / "paths.json"
        listing.write_text(json.dumps(paths))
        ready = Path(tmp) / "ready"
        ready.mkdir()
        cmd = [sys.executable, __file__, "--child", str(listing), str(ready), str(copies)]
        procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) for _ in range(copies)]
        out = []
        for proc in procs:
            stdout, _ = proc.communicate(timeout=1800)
            assert proc.returncode == 0, proc.returncode
            out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


def table(runs: dict[int, list[dict[str, float]]]) -> str:
    names = [s[0] for s in STEPS] + ["rest", "total"]
    head = "| step | " + " | ".join(f"{c} at once: ms / image (mean of {c})" for c in runs) + " |"
    lines = [head, "|---|" + "---:|" * len(runs)]
    for name in names:
        cells = [f"{sum(r[name] for r in rs) / len(rs):.3f}" for rs in runs.values()]
        label = f"**{name}**" if name == "total" else name
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[int, list[dict[str, float]]] | None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=600)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--copies", type=int, nargs="+", default=[1, 2])
    p.add_argument("--paths", nargs="*", default=None, help="JPEG files instead of the photo-like world")
    p.add_argument("--append", default=None)
    p.add_argument("--child", nargs=3, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        listing, ready, n = a.child
        print(json.dumps(run_steps(json.loads(Path(listing).read_text()), (Path(ready), int(n)))))
        return
    if a.paths:
        paths = list(a.paths)
    else:
        from job_cpu import make_world

        world = make_world(Path("/tmp/clipcurate-bench-jobcpu"), 3000, a.seed)
        paths = sorted(str(q) for q in (world / "images").rglob("*.jpg"))[: a.images]
    runs = {c: measure(paths, c) for c in a.copies}
    body = table(runs)
    print(body)
    if a.append:
        append(a.append, "Decode child: CPU per step, one decoder and several at once",
               f"{len(paths)} {'JPEGs given by --paths' if a.paths else 'photo-like JPEGs (300-1200 px)'}; "
               "the job's decode options (stored copy 256 px "
               "border, 64 px model input and thumbnail, PDQ); thread CPU time per step, torch on one thread.",
               body, argv)
    return runs


if __name__ == "__main__":
    main()
