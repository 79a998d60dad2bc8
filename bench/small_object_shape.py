"""Small-object shape: can an image trunk read the outline of 9-23 px objects at 64 px?

A control for the towers' image side, with the contrastive objective taken out: each trunk
(clip_model.resnet.ResNet, ResNet18 shape at width 32, as in the towers-small and
multilingual-synthetic configs) gets a linear 5-way classifier and is trained with
cross-entropy on the shape of single-group synthetic scenes (testkit.synthetic, 64 px renders,
the world's colours, counts, sizes and positions), then scored on scenes of another seed.
Variants: torchvision's strided downsampling (the published layout) and max-pool downsampling
(``downsample="maxpool"``). Same seed, data, optimiser (AdamW 1e-3, weight decay 0.1) and steps
for each; one torch thread.

    .venv/bin/python bench/small_object_shape.py --steps 600 --append bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

# The repository root: this checkout's packages and the test rig (testkit is not installed).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from results_md import append  # noqa: E402

from clip_model.config import PreprocessConfig  # noqa: E402
from clip_model.resnet import DOWNSAMPLING, ResNet  # noqa: E402
from clip_model.transform import normalize_uint8  # noqa: E402
from testkit.synthetic import SHAPES, render, sample_scenes  # noqa: E402

TRAIN_SEED, TEST_SEED = 5101, 5102


def scenes_as_arrays(n: int, seed: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [n, size, size, 3] renders of single-group scenes and their shape index [n]."""
    scenes = sample_scenes(n, seed, unsafe_rate=0.0, second_object_rate=0.0)
    pixels = np.stack([np.asarray(render(s, size)) for s in scenes])
    return pixels, np.array([SHAPES.index(s.groups[0].shape) for s in scenes])


def run(downsample: str, train: tuple, test: tuple, steps: int, batch: int, report: list[int]) -> dict:
    torch.manual_seed(0)
    trunk = ResNet("basic", (2, 2, 2, 2), 32, downsample)
    head = torch.nn.Linear(trunk.out_dim, len(SHAPES))
    opt = torch.optim.AdamW([*trunk.parameters(), *head.parameters()], lr=1e-3, weight_decay=0.1)
    pp = PreprocessConfig(image_size=train[0].shape[1])
    x_test = normalize_uint8(test[0], pp)
    out: dict = {"downsample": downsample, "acc": {}}
    t0 = time.perf_counter()
    for step in range(steps):
        idx = np.random.default_rng(step).integers(0, len(train[1]), batch)
        loss = F.cross_entropy(head(trunk(normalize_uint8(train[0][idx], pp))), torch.from_numpy(train[1][idx]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step + 1 in report:
            trunk.eval()
            with torch.no_grad():
                pred = head(trunk(x_test)).argmax(1).numpy()
            trunk.train()
            out["acc"][step + 1] = float((pred == test[1]).mean())
    out["seconds"] = time.perf_counter() - t0
    out["final_loss"] = float(loss.item())
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--train-scenes", type=int, default=4000)
    p.add_argument("--test-scenes", type=int, default=500)
    p.add_argument("--append", help="append the table to this markdown file")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    train = scenes_as_arrays(a.train_scenes, TRAIN_SEED, 64)
    test = scenes_as_arrays(a.test_scenes, TEST_SEED, 64)
    report = sorted({s for s in (a.steps // 3, 2 * a.steps // 3, a.steps) if s > 0})
    results = [run(d, train, test, a.steps, a.batch_size, report) for d in DOWNSAMPLING]
    lines = [
        "| downsampling | " + " | ".join(f"shape acc at {s}" for s in report) + " | final loss | seconds |",
        "|---|" + "---:|" * (len(report) + 2),
    ]
    for r in results:
        accs = " | ".join(f"{r['acc'][s]:.3f}" for s in report)
        lines.append(f"| {r['downsample']} | {accs} | {r['final_loss']:.3f} | {r['seconds']:.0f} |")
    table = "\n".join(lines)
    print(table)
    if a.append:
        append(
            a.append, "Small-object shape: stride vs max-pool downsampling in the ResNet trunk",
            f"ResNet18 shape at width 32, 64 px renders of single-group scenes (objects 9-23 px), "
            f"{a.train_scenes} training scenes (seed {TRAIN_SEED}), {a.test_scenes} held-out "
            f"(seed {TEST_SEED}); linear classifier, cross-entropy on the shape (chance 0.2), "
            f"AdamW 1e-3, batch {a.batch_size}, one thread.",
            table, argv,
        )  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
