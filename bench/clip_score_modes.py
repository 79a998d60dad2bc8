"""clip_score separation of matching vs swapped captions, by ``decode.resize_mode``, with the
model input made from the decoded image (decode once, what the job does) and, for comparison,
from the stored copy (what the job did before: the stored image read back and preprocessed).

On a fresh synthetic world (a seed no model or threshold was tuned on), every original row is
scored twice: with its own caption and with the caption of a random other row (swapped). The
ROC AUC of clip_score separating the two is printed for each resize mode and each input path;
with decode once the model never sees the stored copy, so its AUC cannot depend on the mode.

    python bench/clip_score_modes.py --rows 600 --seed 4321 --append bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import os
import platform
import random
import shlex
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import clip_model  # noqa: E402
from clip_model.transform import resize_crop_uint8  # noqa: E402
from pipeline import schema as S  # noqa: E402
from pipeline.config import DecodeConfig  # noqa: E402
from pipeline.stages.decode import DecodeStage  # noqa: E402
from testkit.evaluate_model import roc_auc  # noqa: E402
from testkit.synthetic import generate_world  # noqa: E402


def aucs(rows: int, seed: int, image_size: int) -> dict[tuple[str, str], float]:
    model, pp = clip_model.create_model("tiny-synthetic", "synthetic")
    with tempfile.TemporaryDirectory() as tmp:
        gt = generate_world(Path(tmp), rows, seed, "http://127.0.0.1/", mismatch_rate=0.0,
                            exact_dup_rate=0.0, near_dup_rate=0.0)
        images = [(Path(tmp) / p).read_bytes() for p in gt.column("_gt_path").to_pylist()]
    captions = gt.column("caption").to_pylist()
    rng = random.Random(seed)
    swapped = [captions[(i + rng.randrange(1, rows)) % rows] for i in range(rows)]
    with torch.inference_mode():
        t_own = model.encode_text(clip_model.tokenize(captions), normalize=True)
        t_swap = model.encode_text(clip_model.tokenize(swapped), normalize=True)
        out: dict[tuple[str, str], float] = {}
        for mode in ("border", "center_crop"):
            rows_in = pa.table({
                S.KEY: [f"{i:09d}" for i in range(rows)], S.STATUS: [S.OK] * rows,
                S.ERROR: pa.nulls(rows, pa.string()), S.IMAGE_BYTES: pa.array(images, pa.binary()),
            })  # fmt: skip
            dec = DecodeStage(cfg=DecodeConfig(image_size=image_size, resize_mode=mode), model_input=pp,
                              isolate=False).process_batch(rows_in)
            once = np.stack([np.frombuffer(b, np.uint8).reshape(pp.image_size, pp.image_size, 3)
                             for b in dec.column(S.PIXELS).to_pylist()])
            stored = np.stack([resize_crop_uint8(Image.open(io.BytesIO(b)), pp)
                               for b in dec.column(S.IMAGE).to_pylist()])
            for path, pixels in (("decoded once (the job)", once), ("stored copy (before)", stored)):
                x = clip_model.transform.normalize_uint8(pixels, pp)
                img = model.encode_image(x, normalize=True)
                own = (img * t_own).sum(-1).numpy()
                swap = (img * t_swap).sum(-1).numpy()
                out[(mode, path)] = roc_auc(np.concatenate([own, swap]), np.r_[np.ones(rows), np.zeros(rows)])
    return out


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=600)
    p.add_argument("--seed", type=int, default=4321)
    p.add_argument("--image-size", type=int, default=256, help="decode.image_size (the job's default)")
    p.add_argument("--append", default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    res = aucs(a.rows, a.seed, a.image_size)
    lines = ["| resize_mode | model input made from | clip_score AUC, own vs swapped caption |", "|---|---|---:|"]
    lines += [f"| {mode} | {path} | {auc:.4f} |" for (mode, path), auc in res.items()]
    once = [v for (m, pth), v in res.items() if pth.startswith("decoded")]
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    text = (
        f"\n## clip_score separation by resize_mode: decode once vs the stored copy ({when})\n\n"
        f"Machine: {platform.node()}, {os.cpu_count()} CPUs. Command: `python bench/clip_score_modes.py "
        f"{shlex.join(argv)}`. Bundled tiny model; fresh world (seed {a.seed}, {a.rows} rows), each row "
        "scored with its caption and with a random other row's.\n\n" + "\n".join(lines)
        + f"\n\nDecode once: border vs center_crop differ by {abs(once[0] - once[1]):.4f} AUC.\n"
    )
    print(text)
    if a.append:
        with open(a.append, "a") as f:
            f.write(text)


if __name__ == "__main__":
    main()
