"""Host CPU per image on the embedding side: what an embedding worker spends besides the model.

On a GPU node the CPU decides whether the GPU is fed. The target, <= 0.3 ms per image, keeps
one host core ahead of a GPU that embeds a few thousand images a second.
This runs :class:`pipeline.stages.embed.EmbedStage` on shards of real-size model inputs (uint8
S x S x 3 pixels, token ids of LAION-length captions, as the decode task hands them over) with
the model's device work taken out, so what is timed is exactly the worker's host side:

- Arrow -> uint8 view of the pixels, each chunk copied once into a staging buffer (the pinned
  buffer's copy on CUDA), token padding, the output columns (float16 embeddings, clip_score,
  model id), moderation scoring on the embeddings;
- not timed: normalisation and the encoders, which run on the device (here replaced by stubs
  that return unit vectors of the right shape without reading their input).

The real encoders on this CPU are timed as well, for scale (the CPU does both jobs here).
``time.process_time`` of this one process; best and median of ``--repeats`` passes.

    python bench/embed_host.py --models ViT-B-32 ViT-L-14 --append bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import torch  # noqa: E402

import clip_model  # noqa: E402
from pipeline import schema as S  # noqa: E402
from pipeline.config import EmbedConfig, ModerateConfig  # noqa: E402
from pipeline.stages.embed import EmbedStage  # noqa: E402
from pipeline.stages.moderate import Moderation  # noqa: E402

CAPTIONS = [
    "a photo of a dog",
    "Vintage red bicycle leaning against a brick wall in the old town, summer afternoon light",
    "Men's classic fit cotton oxford shirt - light blue - size L",
    "sunset over the ocean",
    "Modern kitchen with white cabinets, marble countertops and stainless steel appliances for sale",
]


def shard(rows: int, size: int, tokenizer: object, seed: int) -> pa.Table:
    """One shard as the decode and tokenize stages hand it to the embed stage."""
    rng = np.random.default_rng(seed)
    pixels = [rng.integers(0, 256, size * size * 3, dtype=np.uint8).tobytes() for _ in range(rows)]
    captions = [CAPTIONS[i % len(CAPTIONS)] + f" {i}" for i in range(rows)]
    tokens = tokenizer.token_ids(captions)  # type: ignore[attr-defined]
    return pa.table({
        S.KEY: [f"{i:09d}" for i in range(rows)],
        S.STATUS: [S.OK] * rows,
        S.CAPTION: captions,
        S.PIXELS: S.binary_column(pixels),
        S.TOKENS: pa.array(tokens, pa.list_(pa.int32())),
    })  # fmt: skip


class _Device:
    """Stands in for the accelerator: encoders that return unit vectors without reading
    their input, and normalisation that does not touch the pixels (both run on the device in
    a GPU worker). Each chunk is still copied once into a staging buffer, as the pinned copy
    on CUDA is."""

    def __init__(self, dim: int, step: int, size: int) -> None:
        self.dim = dim
        self.staging = np.empty((step, size, size, 3), np.uint8)

    def normalize(self, batch: np.ndarray, cfg: object, device: object = None) -> torch.Tensor:
        self.staging[: len(batch)] = batch
        return torch.empty((len(batch), 1))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros((x.shape[0], self.dim))
        out[:, 0] = 1.0
        return out


def cpu_ms(fn: object, table: pa.Table, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.process_time()
        fn(table)  # type: ignore[operator]
        out.append((time.process_time() - t0) / table.num_rows * 1000)
    return out


def measure(model_name: str, rows: int, batch: int, repeats: int, real: bool) -> dict[str, list[float]]:
    torch.manual_seed(0)
    model, pp = clip_model.create_model(model_name)
    stage = EmbedStage(cfg=EmbedConfig(model=model_name, pretrained=None, inference_batch=batch), preprocess=pp)
    stage._model, stage._device, stage._autocast = model.eval(), torch.device("cpu"), None
    stage._model_id = model_id = f"{model_name}@random-init"
    stage.moderation = Moderation.prepare(ModerateConfig(), None, model)
    table = shard(rows, pp.image_size, model.tokenizer, 0)
    res: dict[str, list[float]] = {}
    if real:
        res["real encoders on this CPU"] = cpu_ms(stage.process_batch, table, 1)
    device = _Device(stage.embed_dim, batch, pp.image_size)
    import clip_model.transform as T

    real_norm = T.normalize_uint8
    T.normalize_uint8 = device.normalize  # type: ignore[assignment]
    model.encode_image = device.encode  # type: ignore[method-assign]
    model.encode_text = device.encode  # type: ignore[method-assign]
    try:
        stage.process_batch(table)  # warm
        res["host side (device work stubbed)"] = cpu_ms(stage.process_batch, table, repeats)
    finally:
        T.normalize_uint8 = real_norm  # type: ignore[assignment]
    assert stage._model_id == model_id
    return res


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["ViT-B-32", "ViT-L-14"])
    p.add_argument("--rows", type=int, default=1000, help="rows per shard (one embed call)")
    p.add_argument("--batch", type=int, default=256, help="embed.inference_batch")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--real", action="store_true", help="also time the real encoders on this CPU")
    p.add_argument("--append", default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    lines = ["| model | input | what | CPU ms/image (best) | CPU ms/image (median) |", "|---|---|---|---:|---:|"]
    for name in a.models:
        size = clip_model.get_model_config(name).vision.image_size
        for what, values in measure(name, a.rows, a.batch, a.repeats, a.real).items():
            lines.append(f"| {name} | {size} px | {what} | {min(values):.3f} | {statistics.median(values):.3f} |")
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load = os.getloadavg()
    text = (
        f"\n## Embedding worker: host CPU per image besides the model ({when})\n\n"
        f"Machine: {platform.node()}, {os.cpu_count()} CPUs, {platform.machine()}; load "
        f"{load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f}. Command: `python bench/embed_host.py {shlex.join(argv)}`. "
        f"{a.rows} rows per call, inference batch {a.batch}, one torch thread, moderation on "
        "(default concepts); process_time of the worker's process.\n\n" + "\n".join(lines) + "\n"
    )
    print(text)
    if a.append:
        with open(a.append, "a") as f:
            f.write(text)


if __name__ == "__main__":
    main()
