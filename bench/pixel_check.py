"""Near-duplicate dedup on synthetic worlds: embedding alone vs embedding + pixel check.

For each seed, generates a world (``--world small``, the default: 800 rows of 96-400 px, 5 %
exact copies, 10 % near copies: cropped, resized and re-encoded; ``--world default``: the
generator's and the job's defaults, see :data:`WORLDS`), runs it through the job's decode
(small: centre crop 128), preprocess (with thumbnails) and embed stages with the bundled tiny
model, then ``dedup_table`` with

* ``cos>=0.99``: the embedding alone, at the threshold the demo used before the pixel check;
* ``cos>=0.9 + pixels``: the demo's settings (the tiny model's defaults).

Reports, against the world's ground truth: near-duplicate recall (near copies whose
``duplicate_of`` chain meets their original's), precision of the semantic drops, rows dropped in
favour of a scene with another description ("crossed"), and the pixel check's cost (candidate
pairs, seconds, pairs/s on one thread).

    .venv/bin/python bench/pixel_check.py --seeds 2026 555 7 99 4242 --append bench/RESULTS.md
    .venv/bin/python bench/pixel_check.py --world default --rows 1000 --seeds 990060 990061
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import shlex
import sys
import tempfile
import time
from pathlib import Path

# The repository root: this checkout's packages and the test rig (testkit is not installed).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import torch  # noqa: E402

from pipeline import dedup as D  # noqa: E402
from pipeline import job_config as J  # noqa: E402
from pipeline import schema as S  # noqa: E402
from pipeline.config import DecodeConfig  # noqa: E402
from pipeline.pixel_check import confirm_pairs  # noqa: E402
from pipeline.thumbnails import thumbs_array  # noqa: E402
from testkit.embedding import embed_images  # noqa: E402
from testkit.synthetic import generate_world  # noqa: E402

MACHINE = "2-core CI box, CPU, shared with other work"
REPO = Path(__file__).resolve().parents[1]


# The worlds: "small" as the bounds were first set on (96-400 px, centre crop 128), "default"
# as the job meets with no flags (the generator's default sizes and format mix, grayscale and
# PNG with alpha included; the job's default decode) at the rates of the defaults check.
WORLDS = {
    "small": (dict(exact_dup_rate=0.05, near_dup_rate=0.1, unsafe_rate=0.1, min_side=96, max_side=400),
              DecodeConfig(image_size=128, resize_mode="center_crop")),
    "default": (dict(mismatch_rate=0.1, exact_dup_rate=0.03, near_dup_rate=0.05, unsafe_rate=0.06),
                DecodeConfig()),
}  # fmt: skip


def embedded_world(seed: int, rows: int, world: str = "small") -> tuple[list[dict], pa.Table]:
    knobs, decode = WORLDS[world]
    with tempfile.TemporaryDirectory() as tmp:
        gt = generate_world(Path(tmp), rows, seed, "http://127.0.0.1/", **knobs)  # type: ignore[arg-type]
        images = [(Path(tmp) / p).read_bytes() for p in gt.column("_gt_path").to_pylist()]
    table = embed_images(images, gt.column("caption").to_pylist(), "tiny-synthetic", "synthetic",
                         decode, thumbnails=True)
    return gt.to_pylist(), table


def _picture(gt: list[dict]) -> list[int]:
    """Each row's original: the row itself, or the row it copies."""
    return [i if r["_gt_duplicate_of"] < 0 else r["_gt_duplicate_of"] for i, r in enumerate(gt)]


def score(gt: list[dict], out: list[dict]) -> tuple[float, float, int]:
    """(near-duplicate recall, semantic precision, crossed drops) against the ground truth."""
    index = {r[S.KEY]: i for i, r in enumerate(out)}
    dup_of = [None if r["duplicate_of"] is None else index[r["duplicate_of"]] for r in out]

    def keeper(i: int) -> int:
        while dup_of[i] is not None:
            i = dup_of[i]
        return i

    group = _picture(gt)
    near = [i for i, r in enumerate(gt) if r["_gt_duplicate_kind"] == "near"]
    recall = sum(keeper(i) == keeper(gt[i]["_gt_duplicate_of"]) for i in near) / len(near)
    sem = [i for i, r in enumerate(out) if r["dup_kind"] == "semantic"]
    precision = sum(group[i] == group[dup_of[i]] for i in sem) / max(1, len(sem))
    crossed = sum(
        1
        for i, j in enumerate(dup_of)
        if j is not None and gt[i]["_gt_description"] != gt[j]["_gt_description"]
    )
    return recall, precision, crossed


def pair_truth(gt: list[dict], i: np.ndarray, j: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """bool [E] each, for candidate pairs (i, j): the two rows are copies of one picture (the
    pixel check should confirm them); they show scenes with different descriptions (it must
    not). Two renderings of one description are neither."""
    group = np.array(_picture(gt))
    desc = np.array([r["_gt_description"] for r in gt])
    return group[i] == group[j], desc[i] != desc[j]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[2026, 555, 7])
    p.add_argument("--rows", type=int, default=800)
    p.add_argument("--world", choices=sorted(WORLDS), default="small", help="see WORLDS")
    p.add_argument("--append", help="append the table to this Markdown file")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    demo = J.from_args(["--config", str(REPO / "jobs" / "demo.yaml"), "--input", "x", "--output", "y"]).dedup
    plain = dataclasses.replace(demo, threshold=0.99, pixel_check=False)
    lines = [
        "| seed | dedup | near-dup recall | semantic precision | crossed | candidate pairs "
        "| copy pairs confirmed | other-scene pairs confirmed | pixel check s | pairs/s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for seed in a.seeds:
        gt, table = embedded_world(seed, a.rows, a.world)
        for name, cfg in (("cos>=0.99", plain), (f"cos>={demo.threshold:g} + pixels", demo)):
            out = D.dedup_table(table, cfg).to_pylist()
            recall, precision, crossed = score(gt, out)
            cost = ["", "", "", "", ""]
            if cfg.pixel_check:
                emb = np.array(table.column(S.IMAGE_EMBEDDING).to_pylist(), dtype=np.float16)
                pairs = D.semantic_pairs(emb, cfg.threshold)
                thumbs, ok = thumbs_array(table.column(S.IMAGE_THUMB).to_pylist())
                start = time.perf_counter()
                confirmed = confirm_pairs(thumbs, ok, thumbs, ok, pairs.i, pairs.j)
                secs = time.perf_counter() - start
                copies, others = pair_truth(gt, pairs.i, pairs.j)
                cost = [str(len(pairs.i)), f"{confirmed[copies].sum()} / {copies.sum()}",
                        str(confirmed[others].sum()), f"{secs:.2f}", f"{len(pairs.i) / secs:,.0f}"]
            lines.append(
                f"| {seed} | {name} | {recall:.3f} | {precision:.3f} | {crossed} | "
                + " | ".join(cost)
                + " |"
            )
            print(lines[-1], flush=True)
    if a.append:
        cmd = "python " + " ".join(shlex.quote(x) for x in sys.argv)
        now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        with open(a.append, "a") as f:
            f.write(f"\n## Near-duplicate dedup: embedding alone vs + pixel check ({now})\n\n")
            f.write(f"Machine: {MACHINE}. Command: `{cmd}`. {a.rows}-row {a.world} worlds, tiny model, ")
            f.write(
                "one torch thread; crossed = rows dropped for a scene with another description; "
                "copy / other-scene pairs: the pixel check's answers on the candidate pairs.\n\n"
            )
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
