"""GPU embedding throughput: the pipeline's embed stages vs a plain open_clip loop, fp16.

    python bench/embed_gpu.py --rows 2048 --models ViT-B-32 ViT-L-14 --append bench/RESULTS.md

For each model (random weights, seeded, one safetensors file shared by both sides) and the same
committed WebDataset shards (synthetic world, 256 px, border):

- clipcurate: the stages ``build_embed_stages`` builds for a job (PreprocessStage ->
  EmbedStage -> WriteStage, moderation off), driven in one process: preprocessing of the next
  calls runs in a thread pool while the main thread embeds (what the Ray graph does with CPU
  tasks beside the GPU actor). Ray itself is not in the loop, because a lent GPU machine may not
  have it (its wheel is larger than what can be carried there); the stage code is the same.
- baseline: the loop a user writes with open_clip: decode + torchvision preprocess per image,
  encode images and 77-token captions in batches under fp16 autocast, write Parquet.

Reported: images/s (image + text embeddings of every row, model load excluded, first shard
included) and GPU utilisation (mean of NVML samples every 50 ms while the side runs).
On a machine without CUDA it runs on CPU in fp32 (useful only to check the script).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime as dt
import io
import os
import platform
import shlex
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402
from embed import compare, make_shards  # noqa: E402


class GpuSampler:
    """Samples NVML GPU utilisation (%) every ``period`` s in a thread; ``mean`` after stop."""

    def __init__(self, period: float = 0.05) -> None:
        self.period, self.samples = period, []
        self._stop = threading.Event()
        self._handle = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        except Exception:  # no NVML: no GPU figures
            self._nvml = None

    def __enter__(self) -> GpuSampler:
        if self._handle is not None:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(self._nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu)
            self._stop.wait(self.period)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._handle is not None:
            self._thread.join()

    @property
    def mean(self) -> float | None:
        return float(np.mean(self.samples)) if self.samples else None


def save_random_weights(arch: str, path: Path) -> None:
    from safetensors.torch import save_file

    import clip_model

    torch.manual_seed(0)
    model, _ = clip_model.create_model(arch, device="cpu")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


def run_ours(work: Path, arch: str, weights: Path, rows_per_call: int, batch: int, threads: int) -> tuple[float, float | None, int]:
    from pipeline.runner import build_embed_stages

    from pipeline.config import (
        DownloadJobConfig,
        EmbedConfig,
        ModerateConfig,
        ShardConfig,
        WriteConfig,
    )
    from pipeline.stages.embed import EmbedStage, PreprocessStage

    gpu = torch.cuda.is_available()
    job = DownloadJobConfig(shard=ShardConfig(output_folder=str(work / "shards")))
    embed = EmbedConfig(model=arch, pretrained=str(weights), rows_per_call=rows_per_call,
                        inference_batch=batch, num_gpus=1.0 if gpu else 0.0,
                        num_cpus=float(os.cpu_count() or 1))
    out = work / f"ours-{arch}"
    stages = build_embed_stages(job, embed, ModerateConfig(enabled=False), WriteConfig(output_folder=str(out)))
    pre = next(s for s in stages if isinstance(s, PreprocessStage))
    emb = next(s for s in stages if isinstance(s, EmbedStage))
    write = stages[-1]
    emb.setup()
    tables = [pq.read_table(p) for p in sorted((work / "shards").glob("*.parquet"))]
    calls = [(i, t.slice(s, rows_per_call)) for i, t in enumerate(tables) for s in range(0, t.num_rows, rows_per_call)]
    done: dict[int, list[pa.Table]] = {}
    n_img = 0
    if gpu:
        torch.cuda.synchronize()
    started = time.perf_counter()
    with GpuSampler() as gs, cf.ThreadPoolExecutor(threads) as pool:
        futures = [(i, pool.submit(pre.process_batch, t)) for i, t in calls]
        for i, fut in futures:
            res = emb.process_batch(fut.result())
            n_img += res.num_rows - res.column("image_embedding").null_count
            done.setdefault(i, []).append(res)
            if len(done[i]) * rows_per_call >= tables[i].num_rows:
                write.process_batch(pa.concat_tables(done.pop(i)))
    return time.perf_counter() - started, gs.mean, n_img


def run_baseline(work: Path, arch: str, weights: Path, batch: int) -> tuple[float, float | None, int]:
    import open_clip
    from PIL import Image

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=str(weights), device=dev)
    model.eval()
    tokenizer = open_clip.get_tokenizer(arch)
    out = work / f"baseline-{arch}"
    out.mkdir(exist_ok=True)
    n_img = 0
    if dev == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    with GpuSampler() as gs:
        for tar_path in sorted((work / "shards").glob("*.tar")):
            samples: dict[str, dict[str, bytes]] = {}
            with tarfile.open(tar_path) as tar:
                for m in tar:
                    stem, _, ext = m.name.rpartition(".")
                    samples.setdefault(stem, {})[ext] = tar.extractfile(m).read()
            keys = list(samples)
            images = [preprocess(Image.open(io.BytesIO(samples[k]["jpg"]))) for k in keys]
            captions = [samples[k]["txt"].decode("utf-8") for k in keys]
            img_out, txt_out = [], []
            with torch.inference_mode(), torch.autocast(dev, dtype=torch.float16, enabled=dev == "cuda"):
                for s in range(0, len(keys), batch):
                    img_out.append(model.encode_image(torch.stack(images[s : s + batch]).to(dev), normalize=True).float().cpu())
                    txt_out.append(model.encode_text(tokenizer(captions[s : s + batch]).to(dev), normalize=True).float().cpu())
            img = torch.cat(img_out).numpy().astype(np.float16)
            txt = torch.cat(txt_out).numpy().astype(np.float16)
            dim = img.shape[1]
            pq.write_table(pa.table({
                "key": keys,
                "image_embedding": pa.FixedSizeListArray.from_arrays(pa.array(img.reshape(-1)), dim),
                "text_embedding": pa.FixedSizeListArray.from_arrays(pa.array(txt.reshape(-1)), dim),
            }), out / f"{tar_path.stem}.parquet", compression="zstd")
            n_img += len(keys)
    return time.perf_counter() - started, gs.mean, n_img


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=2048)
    p.add_argument("--per_shard", type=int, default=512)
    p.add_argument("--models", nargs="+", default=["ViT-B-32", "ViT-L-14"])
    p.add_argument("--batch", type=int, default=256, help="model inference batch (both sides)")
    p.add_argument("--rows_per_call", type=int, default=512)
    p.add_argument("--threads", type=int, default=min(8, os.cpu_count() or 1), help="preprocess threads")
    p.add_argument("--seed", type=int, default=3)
    p.add_argument("--append", default=None)
    a = p.parse_args(argv)

    lines = []
    with tempfile.TemporaryDirectory(prefix="clipcurate-bench-embed-gpu-") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        ok = make_shards(work, a.rows, a.per_shard, a.seed)
        print(f"prepared {ok} stored images in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
        for arch in a.models:
            weights = work / f"{arch}.safetensors"
            save_random_weights(arch, weights)
            # Warm-up on a copy of the shards would double the set-up; instead both sides count
            # their first shard, with cuDNN/cuBLAS kernel selection, in the time.
            base_s, base_u, base_n = run_baseline(work, arch, weights, a.batch)
            ours_s, ours_u, ours_n = run_ours(work, arch, weights, a.rows_per_call, a.batch, a.threads)
            diff = compare(work, f"ours-{arch}", f"baseline-{arch}")
            fmt = lambda u: "n/a" if u is None else f"{u:.0f} %"  # noqa: E731
            lines.append(f"| {arch} | open_clip loop | {base_s:.1f} | {base_n / base_s:.0f} | {fmt(base_u)} |")
            lines.append(f"| {arch} | clipcurate embed stages | {ours_s:.1f} | {ours_n / ours_s:.0f} | {fmt(ours_u)} |")
            lines.append(f"| {arch} | ratio | | {(ours_n / ours_s) / (base_n / base_s):.2f}x | max emb diff {diff:.1e} |")
            print(lines[-3] + "\n" + lines[-2] + "\n" + lines[-1], file=sys.stderr, flush=True)
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({platform.machine()})"
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    text = (
        f"\n## GPU embed path vs open_clip loop ({when})\n\n"
        f"Device: {dev}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{'fp16 autocast' if torch.cuda.is_available() else 'fp32'}. Command: "
        f"`python bench/embed_gpu.py {shlex.join(argv if argv is not None else sys.argv[1:])}`. {ok} stored images "
        f"(synthetic world, 256 px, border), shards of {a.per_shard}, inference batch {a.batch}, "
        f"{a.rows_per_call} rows per embed call, {a.threads} preprocess threads; random weights. "
        "Time from first shard to last Parquet written, model load excluded; GPU utilisation = "
        "mean of NVML samples (50 ms). The embed stages are driven in one process (no Ray).\n\n"
        "| model | path | seconds | images/s | GPU util |\n|---|---|---:|---:|---:|\n" + "\n".join(lines) + "\n"
    )
    print(text)
    if a.append:
        with open(a.append, "a") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
