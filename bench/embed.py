"""Embedding throughput: the pipeline's embed path (tars -> Parquet) vs a plain open_clip loop.

Both sides read the same committed WebDataset shards (made once from the synthetic world by
the pipeline's own decode and shard code) and write image + text embeddings (float16, unit
norm) to Parquet, with the same ViT-B-32 random weights (seeded, saved once as safetensors):

- clipcurate: ``run_curate`` over shards that are committed but have no output yet, i.e.
  preprocess (CPU tasks) -> embed (one actor) -> write; moderation off. Captions are encoded
  at their real length and decoding overlaps the model.
- baseline: one process, open_clip's model, preprocess and tokenizer: for each tar, decode and
  preprocess each image, then encode images and 77-token captions in batches, then write.

Wall time of each side includes loading the model; Ray's start-up is excluded (a cluster is
already running when a job starts). The two outputs are compared row by row as a check.

    .venv/bin/python bench/embed.py --rows 1024 --append bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import os
import platform
import shlex
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402

ARCH = "ViT-B-32"


def make_shards(folder: Path, rows: int, per_shard: int, seed: int) -> int:
    """Synthetic world -> decode (image_size 256, border) -> committed shards. Returns ok rows."""
    from pipeline import schema as S
    from pipeline.config import DecodeConfig
    from pipeline.stages.decode import DecodeStage
    from pipeline.stages.shard import build_shard, commit_shard
    from pipeline.storage import Storage
    from testkit.synthetic import generate_world

    world_dir = folder / "world"
    world = generate_world(world_dir, rows, seed, "http://127.0.0.1/", min_side=300, max_side=800)
    store = Storage(str(folder / "shards"))
    decode = DecodeStage(cfg=DecodeConfig(image_size=256, resize_mode="border"))
    ok = 0
    for sid, start in enumerate(range(0, rows, per_shard)):
        part = world.slice(start, per_shard)
        n = part.num_rows
        table = pa.table(
            {
                S.KEY: [S.make_key(sid, i, per_shard) for i in range(n)],
                S.SHARD_ID: [sid] * n,
                S.URL: part.column("url"),
                S.CAPTION: part.column("caption"),
                S.STATUS: [S.OK] * n,
                S.ERROR: pa.nulls(n, pa.string()),
                S.IMAGE_BYTES: [(world_dir / p).read_bytes() for p in part.column("_gt_path").to_pylist()],
            }
        )
        decoded = decode.process_batch(table)
        ok += decoded.column(S.STATUS).to_pylist().count(S.OK)
        commit_shard(store, build_shard(sid, decoded))
    return ok


def save_random_weights(path: Path) -> None:
    from pipeline.stages.embed import load_model

    model, _ = load_model(ARCH, None)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


def run_clipcurate(folder: Path, weights: Path, rows_per_call: int, batch: int, cpus: int) -> float:
    from pipeline.runner import run_curate

    from pipeline.config import (
        DownloadJobConfig,
        EmbedConfig,
        ModerateConfig,
        ReadConfig,
        ShardConfig,
        WriteConfig,
    )

    # The URL list only plans the shards; they are all committed, so nothing is downloaded.
    job = DownloadJobConfig(
        read=ReadConfig(url_list=str(folder / "world" / "urls.parquet")),
        shard=ShardConfig(output_folder=str(folder / "shards"), number_sample_per_shard=_per_shard(folder)),
    )
    embed = EmbedConfig(model=ARCH, pretrained=str(weights), rows_per_call=rows_per_call,
                        inference_batch=batch, num_cpus=cpus, concurrency=(1, 1))
    started = time.perf_counter()
    summary = run_curate(job, embed, ModerateConfig(enabled=False), WriteConfig(output_folder=str(folder / "ours")))
    elapsed = time.perf_counter() - started
    assert summary.shards_downloaded == 0 and summary.shards_reembedded == len(summary.files)
    return elapsed


def _per_shard(folder: Path) -> int:
    import json

    manifests = sorted((folder / "shards").glob("*.manifest.json"))
    return max(json.loads(m.read_text())["count"] for m in manifests)


def run_baseline(folder: Path, weights: Path, batch: int) -> float:
    """The loop a user would write with open_clip: decode, preprocess, encode, write."""
    import open_clip
    from PIL import Image

    started = time.perf_counter()
    model, _, preprocess = open_clip.create_model_and_transforms(ARCH, pretrained=str(weights))
    model.eval()
    tokenizer = open_clip.get_tokenizer(ARCH)
    out = folder / "baseline"
    out.mkdir(exist_ok=True)
    for tar_path in sorted((folder / "shards").glob("*.tar")):
        keys, images, captions = [], [], []
        with tarfile.open(tar_path) as tar:
            samples: dict[str, dict[str, bytes]] = {}
            for m in tar:
                stem, _, ext = m.name.rpartition(".")
                samples.setdefault(stem, {})[ext] = tar.extractfile(m).read()
        for key, files in samples.items():
            keys.append(key)
            images.append(preprocess(Image.open(io.BytesIO(files["jpg"]))))
            captions.append(files["txt"].decode("utf-8"))
        img_out, txt_out = [], []
        with torch.inference_mode():
            for s in range(0, len(keys), batch):
                img_out.append(model.encode_image(torch.stack(images[s : s + batch]), normalize=True))
                txt_out.append(model.encode_text(tokenizer(captions[s : s + batch]), normalize=True))
        img = torch.cat(img_out).numpy().astype(np.float16)
        txt = torch.cat(txt_out).numpy().astype(np.float16)
        dim = img.shape[1]
        table = pa.table(
            {
                "key": keys,
                "caption": captions,
                "image_embedding": pa.FixedSizeListArray.from_arrays(pa.array(img.reshape(-1)), dim),
                "text_embedding": pa.FixedSizeListArray.from_arrays(pa.array(txt.reshape(-1)), dim),
                "clip_score": (img.astype(np.float32) * txt.astype(np.float32)).sum(1),
            }
        )
        pq.write_table(table, out / f"{tar_path.stem}.parquet", compression="zstd")
    return time.perf_counter() - started


def compare(folder: Path, ours_dir: str = "ours", base_dir: str = "baseline") -> float:
    """Largest absolute difference between the two outputs' embeddings (same rows by key)."""
    ours = pq.read_table(folder / ours_dir).sort_by("key")
    ours = ours.filter(pa.compute.equal(ours.column("status"), "ok"))
    base = pq.read_table(folder / base_dir).sort_by("key")
    assert ours.column("key").to_pylist() == base.column("key").to_pylist()
    worst = 0.0
    for col in ("image_embedding", "text_embedding"):
        a = np.asarray(ours.column(col).to_pylist(), np.float32)
        b = np.asarray(base.column(col).to_pylist(), np.float32)
        worst = max(worst, float(np.abs(a - b).max()))
    return worst


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=1024)
    p.add_argument("--per_shard", type=int, default=256)
    p.add_argument("--batch", type=int, default=64, help="model inference batch (both sides)")
    p.add_argument("--rows_per_call", type=int, default=256)
    p.add_argument("--cpus", type=int, default=os.cpu_count() or 2,
                   help="Ray CPUs; the embed actor gets them all, preprocess tasks share them")
    p.add_argument("--seed", type=int, default=3)
    p.add_argument("--workdir", default=None, help="default: a temporary folder, removed after")
    p.add_argument("--append", default=None, help="append the result table to this Markdown file")
    a = p.parse_args(argv)

    import ray

    from pipeline.ray_start import init_ray

    work = Path(a.workdir or tempfile.mkdtemp(prefix="clipcurate-bench-embed-"))
    try:
        work.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        ok = make_shards(work, a.rows, a.per_shard, a.seed)
        weights = work / "vit-b-32-random.safetensors"
        save_random_weights(weights)
        print(f"prepared {ok} stored images in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        torch.set_num_threads(a.cpus)
        base_s = run_baseline(work, weights, a.batch)
        print(f"baseline: {base_s:.1f} s", file=sys.stderr)
        t0 = time.perf_counter()
        # One more logical CPU than cores: the actor takes the cores for torch, preprocess
        # tasks run beside it (they mostly wait on the actor).
        init_ray(num_cpus=a.cpus + 1, include_dashboard=False, log_to_driver=False)
        ray_start = time.perf_counter() - t0
        ours_s = run_clipcurate(work, weights, a.rows_per_call, a.batch, a.cpus)
        ray.shutdown()
        diff = compare(work)
    finally:
        if a.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    ratio = base_s / ours_s
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load = os.getloadavg()[0]
    text = (
        f"\n## Embed path (tars -> Parquet) vs plain open_clip loop ({when})\n\n"
        f"Machine: {platform.node()}, {os.cpu_count()} CPUs, {platform.machine()}, load average "
        f"{load:.1f} at the end. Command: `python bench/embed.py {shlex.join(argv or sys.argv[1:])}`. "
        f"{ok} stored images (synthetic world, 256 px, border) in shards of {a.per_shard}; "
        f"{ARCH}, random weights (seeded, one safetensors file for both), CPU, fp32, image and "
        f"text embeddings, inference batch {a.batch}.\n\n"
        "| path | seconds | images/s |\n|---|---:|---:|\n"
        f"| open_clip {__import__('open_clip').__version__}, one process, 77-token captions | "
        f"{base_s:.1f} | {ok / base_s:.1f} |\n"
        f"| clipcurate run_curate (preprocess tasks + 1 embed actor, {a.cpus} torch threads) | "
        f"{ours_s:.1f} | {ok / ours_s:.1f} |\n\n"
        f"ratio clipcurate / open_clip loop: {ratio:.2f}x (target >= 1.3x); Ray start-up (not in "
        f"the time): {ray_start:.1f} s; largest embedding difference between the two outputs: "
        f"{diff:.1e}.\n"
    )
    print(text)
    if a.append:
        with open(a.append, "a") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
