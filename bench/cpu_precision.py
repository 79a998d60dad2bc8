"""CPU embedding cost and fidelity by precision: what ``embed.precision=auto`` trades on a CPU
with native bf16 (AVX512-BF16 or AMX).

For each model (the bundled ``tiny-synthetic`` weights; others at random weights in their
published shapes), the job's own embedding worker (``EmbedStage``, one torch thread, the job's
inference batch) embeds the same uint8 images and token rows in fp32 and in bf16 autocast.
Printed per precision: CPU ms per image and per caption (median of --repeats), and the lowest
cosine of the bf16 embeddings to the fp32 ones. Images: photo-like scenes from the synthetic
world (``testkit.synthetic``); captions: that world's, tokenized by the model's tokenizer.

    python bench/cpu_precision.py --models tiny-synthetic ViT-B-32 --append bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import io
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from results_md import append  # noqa: E402

import clip_model  # noqa: E402
from clip_model.transform import resize_crop_uint8  # noqa: E402
from pipeline.config import EmbedConfig  # noqa: E402
from pipeline.stages.embed import EmbedStage, cpu_has_native_bf16, resolve_precision  # noqa: E402


def inputs(n: int, size: int) -> tuple[np.ndarray, list[list[int]]]:
    from PIL import Image

    from clip_model.tokenizer import default_tokenizer
    from testkit.synthetic import caption, render, sample_scenes

    rng = random.Random(11)
    pp = clip_model.PreprocessConfig(image_size=size)
    pixels = np.empty((n, size, size, 3), np.uint8)
    texts = []
    for i, scene in enumerate(sample_scenes(n, seed=11)):
        buf = io.BytesIO()
        render(scene, (320, 240)).save(buf, "JPEG", quality=90)
        pixels[i] = resize_crop_uint8(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"), pp)
        texts.append(caption(scene, rng))
    tok = default_tokenizer()
    return pixels, tok.token_ids(texts)


def stage_for(model: str, precision: str) -> EmbedStage:
    pretrained = "synthetic" if model in ("tiny-synthetic", "multilingual-synthetic") else None
    torch.manual_seed(0)  # the same random weights for both precisions
    st = EmbedStage(cfg=EmbedConfig(model=model, pretrained=pretrained, precision=precision))
    st.setup()
    return st


def timed(fn, repeats: int) -> float:
    fn()
    runs = []
    for _ in range(repeats):
        t = time.process_time()
        fn()
        runs.append(time.process_time() - t)
    return statistics.median(runs)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["tiny-synthetic", "ViT-B-32"])
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--append", default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    lines = [
        "| model | precision | ms / image | ms / caption | min cosine to fp32 (image / text) |",
        "|---|---|---:|---:|---:|",
    ]
    for model in a.models:
        size = clip_model.get_model_config(model).vision.image_size
        pixels, tokens = inputs(a.images, size)
        ref = None
        for precision in ("fp32", "bf16"):
            st = stage_for(model, precision)
            img_s = timed(lambda st=st, px=pixels: st.encode_pixels(px), a.repeats)
            txt_s = timed(lambda st=st, tk=tokens: st.encode_tokens(tk), a.repeats)
            img, txt = st.encode_pixels(pixels), st.encode_tokens(tokens)
            if ref is None:
                ref, cos = (img, txt), "-"
            else:
                ci = (img * ref[0]).sum(1) / np.linalg.norm(img, axis=1) / np.linalg.norm(ref[0], axis=1)
                ct = (txt * ref[1]).sum(1) / np.linalg.norm(txt, axis=1) / np.linalg.norm(ref[1], axis=1)
                cos = f"{ci.min():.5f} / {ct.min():.5f}"
            lines.append(f"| {model} | {precision} | {1000 * img_s / a.images:.3f} | "
                         f"{1000 * txt_s / len(tokens):.3f} | {cos} |")  # fmt: skip
            print(lines[-1], flush=True)
    native = cpu_has_native_bf16()
    table = "\n".join(lines)
    print(table)
    if a.append:
        append(a.append, "CPU embedding cost by precision",
               f"Native bf16: {native} (so `embed.precision=auto` runs {resolve_precision('auto', 'cpu')} "
               f"here). One torch thread, the job's inference batch ({EmbedConfig().inference_batch}); "
               f"{a.images} synthetic-world images and captions; CPU time, median of {a.repeats}.",
               table, argv)


if __name__ == "__main__":
    main()
