"""GPU embedding throughput: the job's re-embed path vs a plain open_clip loop, fp16.

    python bench/embed_gpu.py --rows 2048 --models ViT-B-32 ViT-L-14 --append bench/RESULTS.md

On a lent GPU machine, which lacks a few of its packages: ``bash bench/gpu_carry.sh`` here
first, then ``bash bench/gpu_carry.sh --run --rows 2048 ...`` there (the script says how).

For each model (random weights, seeded, one safetensors file shared by both sides) and the same
committed WebDataset shards (synthetic world, 256 px, border):

- clipcurate: the job's stream (``pipeline.job.stream``) over shards committed without
  embeddings, on the local scheduler: the stage objects of ``build_job_graph``'s reread
  source (RereadStage + TokenizeStage in CPU worker processes, one per CPU) -> EmbedStage (one
  model worker per GPU, fp16 autocast: ``embed.precision`` auto) -> WriteStage, moderation
  off. No Ray anywhere: a lent GPU machine does not have it (its wheel is larger than what can
  be carried there); the script fails if ``ray`` was imported.
- baseline: the loop a user writes with open_clip: decode + torchvision preprocess per image,
  encode images and 77-token captions in batches under fp16 autocast, write Parquet.

Also, once per run, decoding the stored images to the model's 224 px input
(:func:`measure_decode`): the CPU path the re-embed path runs (one core, and that rate times
the CPUs) against ``torchvision.io.decode_jpeg`` on the GPU (nvJPEG) with the resize there,
and how far the two inputs differ: whether GPU decoding would feed ViT-B-32's rate where the
CPUs cannot.

Reported: images/s (image + text embeddings of every row; each side's time includes loading
its model and, for clipcurate, starting its worker processes and the driver's load of the
model spec, as a job pays them), GPU utilisation (mean of NVML samples every 50 ms while the
side runs, when pynvml is installed), and two checks: the largest embedding difference of
clipcurate's fp16 output from the same path in fp32 (``embed.precision=fp32``, same device,
not timed: fp16 parity), and from the open_clip loop's output, row by row. Without CUDA it
runs on the CPU (useful only to check the script), clipcurate at the precision ``auto`` picks
there: bf16 on a CPU with native bf16, else fp32 (and the parity figure is then 0); the
open_clip loop in fp32.
"""

from __future__ import annotations

import argparse
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
from embed import _per_shard, compare, make_shards, run_clipcurate, save_random_weights, stage_lines  # noqa: E402


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


def run_ours(work: Path, arch: str, weights: Path, batch: int, processes: int | None,
             precision: str = "auto", out: str | None = None,
             stored_decode: str = "cpu") -> tuple[float, float | None, int, dict[str, dict]]:
    """The job's re-embed path on the local scheduler into ``work/<out>`` (default
    ``ours-<arch>``); (seconds, mean GPU utilisation, images embedded, per-segment stats)."""
    out = out or f"ours-{arch}"
    with GpuSampler() as gs:
        seconds, stages = run_clipcurate(work, weights, arch=arch, out=out, batch=batch, cpus=processes,
                                         scheduler="local", precision=precision, stored_decode=stored_decode)
    col = pq.read_table(work / out, columns=["image_embedding"]).column("image_embedding")
    return seconds, gs.mean, len(col) - col.null_count, stages


def run_baseline(work: Path, arch: str, weights: Path, batch: int) -> tuple[float, float | None, int]:
    import open_clip
    from PIL import Image

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    out = work / f"baseline-{arch}"
    out.mkdir(exist_ok=True)
    n_img = 0
    started = time.perf_counter()
    with GpuSampler() as gs:
        # Loading is timed, as on clipcurate's side (whose workers load the model themselves).
        model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=str(weights), device=dev)
        model.eval()
        tokenizer = open_clip.get_tokenizer(arch)
        print(f"open_clip {arch} loaded in {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
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
        if dev == "cuda":
            torch.cuda.synchronize()
    return time.perf_counter() - started, gs.mean, n_img


def stored_jpegs(work: Path) -> list[bytes]:
    """The stored images of the committed shards under ``work/shards``, in shard order."""
    out = []
    for tar_path in sorted((work / "shards").glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            out += [tar.extractfile(m).read() for m in tar if m.name.endswith(".jpg")]
    return out


def measure_decode(jpegs: list[bytes], image_size: int, batch: int, repeats: int = 3) -> dict[str, object]:
    """Stored JPEG -> the model's uint8 input (resize shortest side, centre crop, bicubic),
    two ways, for scope 4's question whether decoding on the GPU beats the CPU when
    re-embedding committed shards:

    - ``cpu_ms``: CPU ms per image (process_time, one thread, best of ``repeats``) of what the
      re-embed path's RereadStage does per row (Pillow decode, ``resize_crop_uint8``);
    - ``dev_rate``: images/s (wall, best of ``repeats``, device synchronised) of
      :mod:`clip_model.device_decode` (TorchCodec's ``decode_jpeg`` on the GPU, nvJPEG; the CPU
      without one) in batches of ``batch``, then resize and crop there, what the embed stage
      does with ``embed.stored_decode: device``; None without TorchCodec or torchvision;
    - ``max_diff`` / ``mean_diff``: largest and mean absolute difference between the two
      inputs, in uint8 levels.
    """
    from PIL import Image

    from clip_model import device_decode
    from clip_model.config import PreprocessConfig
    from clip_model.transform import resize_crop_uint8

    pp = PreprocessConfig(image_size=image_size)
    cpu_best, ref = float("inf"), []
    for _ in range(repeats):
        t0 = time.process_time()
        ref = [resize_crop_uint8(Image.open(io.BytesIO(b)), pp) for b in jpegs]
        cpu_best = min(cpu_best, (time.process_time() - t0) / len(jpegs) * 1000)
    out: dict[str, object] = {"cpu_ms": cpu_best, "dev_rate": None, "max_diff": None, "mean_diff": None,
                              "device": None, "backend": device_decode.available()}
    if out["backend"] is None:
        return out

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    data = [np.frombuffer(b, np.uint8) for b in jpegs]

    def run() -> list[torch.Tensor]:
        res = []
        for s in range(0, len(data), batch):
            imgs = device_decode.decode_jpegs(data[s : s + batch], dev)
            res += list(device_decode.resize_crop_images(imgs, pp))  # type: ignore[arg-type]
        if dev == "cuda":
            torch.cuda.synchronize()
        return res

    run()  # warm-up: nvJPEG's handles, kernels
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        got = run()
        best = min(best, time.perf_counter() - t0)
    diffs = [np.abs(g.cpu().numpy().astype(np.int16) - r.astype(np.int16)) for g, r in zip(got, ref, strict=True)]
    out.update(dev_rate=len(jpegs) / best, device=dev, max_diff=int(max(int(d.max()) for d in diffs)),
               mean_diff=float(np.mean([d.mean() for d in diffs])))
    return out


def measure_reread(work: Path, image_size: int, thumbnails: bool = True, repeats: int = 3) -> dict[str, float]:
    """CPU ms per stored image (process_time, one thread, best of ``repeats``) of a CPU
    worker's reread + tokenize of every committed shard under ``work/shards``, per
    ``embed.stored_decode`` ("cpu": it decodes and makes the model input; "device": it reads
    the headers and sends the bytes), thumbnails on (the pixel check's default with the
    bundled model). Writing the Parquet, the same in both, is not counted."""
    from clip_model.config import PreprocessConfig
    from clip_model.tokenizer import default_tokenizer
    from pipeline.config import ReadConfig
    from pipeline.stages.read import plan_shards
    from pipeline.stages.reread import RereadStage
    from pipeline.stages.tokenize import TokenizeStage

    per_shard = _per_shard(work)
    read = ReadConfig(url_list=str(work / "world" / "urls.parquet"))
    desc = pa.Table.from_pylist([d.as_row() for d in plan_shards(read, per_shard)])
    tok = TokenizeStage(tokenizer=default_tokenizer())
    out = {}
    for mode in ("cpu", "device"):
        stage = RereadStage(read=read, number_sample_per_shard=per_shard, shard_folder=str(work / "shards"),
                            model_input=PreprocessConfig(image_size=image_size), thumbnails=thumbnails,
                            stored_decode=mode)
        best = float("inf")
        for _ in range(repeats):
            t0 = time.process_time()
            rows = sum(tok.process_batch(stage.process_batch(desc.slice(i, 1))).num_rows
                       for i in range(desc.num_rows))
            best = min(best, (time.process_time() - t0) / rows * 1000)
        out[mode] = best
    return out


def reread_lines(r: dict[str, float], cpus: int) -> str:
    """The CPU workers' table (see :func:`measure_reread`): per mode, ms per image and what
    ``cpus - 1`` such workers (one core left to the embedding worker) feed at most."""
    workers = max(1, cpus - 1)
    rows = [f"| {mode} | {ms:.3f} | {1000 / ms * workers:.0f} |" for mode, ms in r.items()]
    return (f"| embed.stored_decode | CPU worker ms / image (reread + tokenize) | images/s from {workers} "
            f"CPU worker{'s' if workers > 1 else ''} (upper bound) |\n|---|---:|---:|\n" + "\n".join(rows) + "\n")


def decode_lines(d: dict[str, object], cpus: int, batch: int) -> str:
    """The decode figure's table (see :func:`measure_decode`)."""
    cpu_rate = 1000 / float(d["cpu_ms"])  # type: ignore[arg-type]
    rows = [
        f"| CPU: Pillow + resize_crop_uint8 (the re-embed path's work), one core | {d['cpu_ms']:.2f} | {cpu_rate:.0f} |",
        f"| CPU: all {cpus} cores, one core's rate x {cpus} (an upper bound) | | {cpu_rate * cpus:.0f} |",
    ]
    if d["dev_rate"] is None:
        rows.append("| decode_jpeg on the device | n/a (neither TorchCodec nor torchvision) | |")
        tail = ""
    else:
        rows.append(f"| {d['backend']} decode_jpeg on {d['device']} (batch {batch}) + resize there | | "
                    f"{d['dev_rate']:.0f} |")
        tail = (f"\nModel input from the two paths: largest difference {d['max_diff']} levels, "
                f"mean {d['mean_diff']:.3f}.\n")
    return ("| decode to the model input | CPU ms / image | images/s |\n|---|---:|---:|\n"
            + "\n".join(rows) + "\n" + tail)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=2048)
    p.add_argument("--per_shard", type=int, default=512)
    p.add_argument("--models", nargs="+", default=["ViT-B-32", "ViT-L-14"])
    p.add_argument("--batch", type=int, default=256, help="model inference batch (both sides)")
    p.add_argument("--processes", type=int, default=None,
                   help="clipcurate's CPU worker processes (reread + tokenize, write); default one per CPU")
    p.add_argument("--seed", type=int, default=3)
    p.add_argument("--append", default=None)
    a = p.parse_args(argv)
    if a.rows < 1 or a.per_shard < 1 or (a.processes is not None and a.processes < 1):
        p.error("--rows, --per_shard and --processes must be >= 1")

    gpu = torch.cuda.is_available()
    from pipeline.stages.embed import resolve_precision

    ours_precision = resolve_precision("auto", "cuda" if gpu else "cpu")
    lines, checks = [], []
    with tempfile.TemporaryDirectory(prefix="clipcurate-bench-embed-gpu-") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        ok = make_shards(work, a.rows, a.per_shard, a.seed)
        print(f"prepared {ok} stored images in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
        decode = measure_decode(stored_jpegs(work), 224, a.batch)
        decode_text = decode_lines(decode, os.cpu_count() or 1, a.batch)
        if decode["backend"] is not None:
            decode_text += "\n" + reread_lines(measure_reread(work, 224), os.cpu_count() or 1)
        print(decode_text, file=sys.stderr, flush=True)
        for arch in a.models:
            weights = work / f"{arch}.safetensors"
            save_random_weights(weights, arch)
            base_s, base_u, base_n = run_baseline(work, arch, weights, a.batch)
            if gpu:
                torch.cuda.empty_cache()  # the baseline's memory is not the embed worker's to share
            ours_s, ours_u, ours_n, stages = run_ours(work, arch, weights, a.batch, a.processes)
            # The fp32 reference: the same path and inputs, no autocast (not timed).
            run_ours(work, arch, weights, a.batch, a.processes, precision="fp32", out=f"fp32-{arch}")
            parity = compare(work, f"ours-{arch}", f"fp32-{arch}")
            diff = compare(work, f"ours-{arch}", f"baseline-{arch}")
            fmt = lambda u: "n/a" if u is None else f"{u:.0f} %"  # noqa: E731
            lines.append(f"| {arch} | open_clip loop | {base_s:.1f} | {base_n / base_s:.0f} | {fmt(base_u)} |")
            lines.append(f"| {arch} | clipcurate re-embed path | {ours_s:.1f} | {ours_n / ours_s:.0f} | {fmt(ours_u)} |")
            lines.append(f"| {arch} | ratio | | {(ours_n / ours_s) / (base_n / base_s):.2f}x | |")
            extra = ""
            if decode["backend"] is not None:
                # The same path with the stored JPEGs decoded by the embed worker on its device.
                dev_s, dev_u, dev_n, _ = run_ours(work, arch, weights, a.batch, a.processes,
                                                  out=f"devdec-{arch}", stored_decode="device")
                lines.append(f"| {arch} | clipcurate re-embed path, stored_decode device | {dev_s:.1f} | "
                             f"{dev_n / dev_s:.0f} | {fmt(dev_u)} |")
                lines.append(f"| {arch} | ratio (stored_decode device) | | {(dev_n / dev_s) / (base_n / base_s):.2f}x | |")
                extra = f"; stored_decode device vs cpu: {compare(work, f'devdec-{arch}', f'ours-{arch}'):.1e}"
            checks.append(f"- {arch}: largest embedding difference, clipcurate {ours_precision} vs "
                          f"its fp32 reference: {parity:.1e}; vs the open_clip loop: {diff:.1e}{extra}. Segments:\n\n"
                          "  | segment | rows | seconds | rows/s |\n  |---|---:|---:|---:|\n"
                          + "".join(f"  {line}\n" for line in stage_lines(stages).splitlines()))
            print("\n".join(lines[-5:]) + "\n" + checks[-1], file=sys.stderr, flush=True)
    leaked = sorted(m for m in sys.modules if m == "ray" or m.startswith("ray."))
    if leaked:
        raise SystemExit(f"embed_gpu.py must run without Ray, but imported {', '.join(leaked[:5])}")
    dev = torch.cuda.get_device_name(0) if gpu else f"CPU ({platform.machine()})"
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    text = (
        f"\n## GPU embed path vs open_clip loop ({when})\n\n"
        f"Device: {dev}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"clipcurate {ours_precision} (embed.precision auto), open_clip loop {'fp16 autocast' if gpu else 'fp32'}. "
        "Command: "
        f"`python bench/embed_gpu.py {shlex.join(argv if argv is not None else sys.argv[1:])}`. {ok} stored images "
        f"(synthetic world, 256 px, border), shards of {a.per_shard}, inference batch {a.batch}; "
        f"clipcurate: the job's re-embed path on the local scheduler ({a.processes or os.cpu_count()} CPU worker "
        "processes, one embed worker per GPU, or one on the CPU), no Ray; random weights. Time from start to last Parquet written, "
        "model load (and clipcurate's worker start-up) included on both sides; GPU utilisation = mean of NVML "
        "samples (50 ms).\n\n"
        "| model | path | seconds | images/s | GPU util |\n|---|---|---:|---:|---:|\n" + "\n".join(lines) + "\n\n"
        + "\n".join(checks)
        + "\n\nDecoding the stored images to a 224 px model input (`measure_decode`): the CPU path the "
        "re-embed path runs in its CPU workers, against nvJPEG through clip_model.device_decode (scope 4 of "
        "issue 14: offer GPU decoding where it beats the CPU; the job offers it as embed.stored_decode device).\n\n" + decode_text
    )
    print(text)
    if a.append:
        with open(a.append, "a") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
