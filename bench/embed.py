"""Embedding throughput: the job's re-embed path (tars -> Parquet) vs a plain open_clip loop.

Both sides read the same committed WebDataset shards (made once from the synthetic world by
the pipeline's own decode and shard code) and write image + text embeddings (float16, unit
norm) to Parquet, with the same ViT-B-32 random weights (seeded, saved once as safetensors):

- clipcurate: the job's stream (``pipeline.job.stream``) over shards that are committed but
  have no embeddings file yet, i.e. the ``reread`` source of the stage graph
  (``pipeline.graph.build_job_graph``): reread + tokenize (CPU workers) -> embed (one model
  worker) -> write, on the scheduler ``scheduler_for`` gives (``--scheduler local``, the
  default: local worker processes, no Ray; ``--scheduler ray``: Ray Data on a local Ray);
  moderation off. Captions are encoded at their real length and re-reading the next shard
  overlaps the model.
- baseline: one process, open_clip's model, preprocess and tokenizer: for each tar, decode and
  preprocess each image, then encode images and 77-token captions in batches, then write.

Wall time of each side includes loading the model (clipcurate loads it as the job does: once in
the driver for the model spec, once in the embedding worker) and starting its workers; Ray's
start-up is excluded (a cluster is already running when a job starts). The two outputs are
compared row by row as a check.

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
# The repository root: this checkout's packages and the test rig (testkit is not installed).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402

from pipeline.stages.embed import resolve_precision  # noqa: E402

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


def save_random_weights(path: Path, arch: str = ARCH) -> None:
    """``arch`` with the job's seeded random init, as one safetensors file both sides load."""
    from safetensors.torch import save_file

    from pipeline.stages.embed import load_model

    model, _ = load_model(arch, None)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


def run_clipcurate(
    folder: Path,
    weights: Path,
    *,
    arch: str = ARCH,
    out: str = "ours",
    batch: int = 64,
    cpus: int | None = None,
    scheduler: str = "local",
    precision: str = "auto",
    stored_decode: str = "cpu",
) -> tuple[float, dict[str, dict]]:
    """The job's stream over the committed shards under ``folder/shards``, none embedded yet;
    the embeddings it writes (``folder/embeddings``) are then moved to ``folder/<out>``. Returns (seconds, per-segment rows and seconds).

    ``cpus``: local CPU worker processes and the CPU embedding worker's torch threads (None:
    one per CPU; on a GPU the worker uses the GPU); ``scheduler``: ``local`` or ``ray``
    (connects to the Ray this process started); ``precision``: embed.precision (``auto``: fp16
    autocast on GPU, fp32 on CPU); ``stored_decode``: embed.stored_decode (``device``: the
    embedding worker decodes the stored JPEGs)."""
    from pipeline import job_config as J
    from pipeline import schema as S
    from pipeline.config import EmbedConfig, ExecutionConfig, JobConfig, ModerateConfig, ShardConfig
    from pipeline.job import stream
    from pipeline.shard_format import committed_shards
    from pipeline.stages.read import plan_shards
    from pipeline.storage import Storage

    # The URL list only plans the shards; they are all committed, so nothing is downloaded.
    cfg = J.validate(JobConfig(
        input=str(folder / "world" / "urls.parquet"),
        output=str(folder),
        shard=ShardConfig(number_sample_per_shard=_per_shard(folder)),
        embed=EmbedConfig(model=arch, pretrained=str(weights), inference_batch=batch, precision=precision,
                          num_cpus=float(cpus or os.cpu_count() or 1), stored_decode=stored_decode),
        moderate=ModerateConfig(enabled=False),
        execution=ExecutionConfig(scheduler=scheduler, processes=cpus if scheduler == "local" else None),
    ))
    plan = plan_shards(cfg.read, cfg.shard.number_sample_per_shard, cfg.storage)
    names = [S.shard_name(d.shard_id) for d in plan]
    committed = committed_shards(Storage(cfg.shard.output_folder, cfg.storage))
    written = Path(cfg.write.output_folder)
    if set(names) - committed or written.exists() or (folder / out).exists():
        raise RuntimeError(f"expected {len(names)} committed shards, no {written} and no {folder / out}")
    expected = {n: d.length for n, d in zip(names, plan, strict=True)}
    started = time.perf_counter()
    statuses, stages = stream(cfg, [], plan, expected, lambda line: print(line, file=sys.stderr, flush=True))
    elapsed = time.perf_counter() - started
    if sum(statuses.values()) != sum(expected.values()):
        raise RuntimeError(f"{sum(expected.values())} rows planned, {sum(statuses.values())} embedded")
    # Moved aside, so the same shards are again "committed, not embedded" for the next run.
    written.rename(folder / out)
    return elapsed, stages


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
    """Largest absolute difference between two outputs' embeddings, row by row: the ``ok``
    rows of each (every row of an output without ``status``) must have the same keys."""
    def ok_rows(name: str) -> pa.Table:
        t = pq.read_table(folder / name).sort_by("key")
        return t.filter(pc.equal(t.column("status"), "ok")) if "status" in t.column_names else t

    ours, base = ok_rows(ours_dir), ok_rows(base_dir)
    if ours.column("key").to_pylist() != base.column("key").to_pylist():
        raise RuntimeError(f"{ours_dir} and {base_dir} hold different rows ({ours.num_rows} vs {base.num_rows})")
    worst = 0.0
    for col in ("image_embedding", "text_embedding"):
        a = np.asarray(ours.column(col).to_pylist(), np.float32)
        b = np.asarray(base.column(col).to_pylist(), np.float32)
        worst = max(worst, float(np.abs(a - b).max()))
    return worst


def stage_lines(stages: dict[str, dict]) -> str:
    """Markdown rows: rows/s of each segment of the graph, as the job records them."""
    return "".join(f"| {name} | {st['rows']} | {st['seconds']:.1f} | {st['rows'] / st['seconds']:.1f} |\n"
                   for name, st in stages.items() if st.get("seconds"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=1024)
    p.add_argument("--per_shard", type=int, default=256)
    p.add_argument("--batch", type=int, default=64, help="model inference batch (both sides)")
    p.add_argument("--cpus", type=int, default=os.cpu_count() or 2,
                   help="torch threads of both sides; local: also the CPU worker processes; ray: the "
                        "embed actor's CPUs (the local Ray gets one more for the reread tasks)")
    p.add_argument("--scheduler", choices=("local", "ray"), default="local",
                   help="what runs clipcurate's graph (local: worker processes, no Ray)")
    p.add_argument("--seed", type=int, default=3)
    p.add_argument("--workdir", default=None, help="default: a temporary folder, removed after")
    p.add_argument("--append", default=None, help="append the result table to this Markdown file")
    a = p.parse_args(argv)
    if a.rows < 1 or a.per_shard < 1:
        p.error("--rows and --per_shard must be >= 1")

    work = Path(a.workdir or tempfile.mkdtemp(prefix="clipcurate-bench-embed-"))
    ray_start = None
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
        if a.scheduler == "ray":
            from pipeline.ray_start import init_ray

            t0 = time.perf_counter()
            # A Ray of its own ("local": never one recorded by `ray start` on this machine).
            # One more logical CPU than cores: the actor takes the cores for torch, reread
            # tasks run beside it (they mostly wait on the actor).
            init_ray("local", num_cpus=a.cpus + 1, include_dashboard=False, log_to_driver=False)
            ray_start = time.perf_counter() - t0
        try:
            ours_s, stages = run_clipcurate(work, weights, batch=a.batch, cpus=a.cpus, scheduler=a.scheduler)
        finally:
            if a.scheduler == "ray":
                import ray

                ray.shutdown()
        diff = compare(work)
    finally:
        if a.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    ratio = base_s / ours_s
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load = os.getloadavg()[0]
    how = (f"local scheduler: {a.cpus} CPU worker processes + 1 embed worker" if a.scheduler == "local"
           else "Ray Data: reread tasks + 1 embed actor")
    started = "" if ray_start is None else f"Ray start-up (not in the time): {ray_start:.1f} s; "
    text = (
        f"\n## Embed path (tars -> Parquet) vs plain open_clip loop ({when})\n\n"
        f"Machine: {platform.node()}, {os.cpu_count()} CPUs, {platform.machine()}, load average "
        f"{load:.1f} at the end. Command: `python bench/embed.py {shlex.join(argv or sys.argv[1:])}`. "
        f"{ok} stored images (synthetic world, 256 px, border) in shards of {a.per_shard}; "
        f"{ARCH}, random weights (seeded, one safetensors file for both), CPU; open_clip fp32, "
        f"clipcurate {resolve_precision('auto', 'cpu')} (embed.precision auto); image and "
        f"text embeddings, inference batch {a.batch}. clipcurate: the job's re-embed path "
        "(pipeline.job.stream over committed shards without embeddings: reread -> tokenize -> "
        "embed -> write), model load included on both sides.\n\n"
        "| path | seconds | images/s |\n|---|---:|---:|\n"
        f"| open_clip {__import__('open_clip').__version__}, one process, 77-token captions | "
        f"{base_s:.1f} | {ok / base_s:.1f} |\n"
        f"| clipcurate job stream, re-embed path ({how}, {a.cpus} torch threads) | "
        f"{ours_s:.1f} | {ok / ours_s:.1f} |\n\n"
        f"ratio clipcurate / open_clip loop: {ratio:.2f}x (target >= 1.3x); {started}largest "
        f"embedding difference between the two outputs: {diff:.1e}.\n\n"
        "clipcurate per segment (rows, seconds from its first shard's start to its last's end):\n\n"
        "| segment | rows | seconds | rows/s |\n|---|---:|---:|---:|\n" + stage_lines(stages)
    )
    print(text)
    if a.append:
        with open(a.append, "a") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
