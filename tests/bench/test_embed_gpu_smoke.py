"""bench/embed_gpu.py runs end to end on the CPU: the script a lent GPU machine runs first, whose
minutes are too few to find a broken import there (481d0bd moved ``committed_shards`` and the
script failed at its first clipcurate run until this test)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
_NO_RAY = '''import sys


class _NoRay:
    def find_spec(self, name, path=None, target=None):
        if name == "ray" or name.startswith("ray."):
            raise ImportError(f"no Ray on this machine: {name}")
        return None


sys.meta_path.insert(0, _NoRay())
'''


def test_embed_gpu_bench_runs_both_paths_and_appends_what_it_prints(tmp_path: Path) -> None:
    out = tmp_path / "results.md"
    # Its own process, where Ray cannot be imported: a lent GPU machine has none (its wheel is
    # more than can be carried there), so nothing on the local path may need it.
    blocker = tmp_path / "no_ray"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(_NO_RAY)
    env = {**os.environ, "PYTHONPATH": f"{blocker}{os.pathsep}{REPO}", "NO_ALBUMENTATIONS_UPDATE": "1"}
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "embed_gpu.py"), "--rows", "12", "--per_shard", "6",
         "--models", "ViT-B-32", "--batch", "8", "--processes", "1", "--append", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    text = out.read_text()
    assert text in done.stdout
    # images/s is printed rounded (0 on a slow, loaded box): the timed seconds are what must be there.
    seconds = {m.group(1): float(m.group(2)) for m in re.finditer(
        r"^\| ViT-B-32 \| (open_clip loop|clipcurate re-embed path) \| ([\d.]+) \| \d+ \|", text, re.M)}
    assert set(seconds) == {"open_clip loop", "clipcurate re-embed path"} and all(v > 0 for v in seconds.values())
    # The same path with the stored JPEGs decoded by the embed worker (embed.stored_decode).
    assert re.search(r"^\| ViT-B-32 \| clipcurate re-embed path, stored_decode device \| [\d.]+ \| \d+ \|", text, re.M)
    device_vs_cpu = float(re.search(r"stored_decode device vs cpu: (\d\.\de[+-]\d+)", text).group(1))
    assert device_vs_cpu < 1e-2
    # Same weights and pixels on both sides: embeddings agree to bf16 / float16 rounding.
    parity, vs_open_clip = (float(x) for x in re.search(
        r"its fp32 reference: (\d\.\de[+-]\d+); vs the open_clip loop: (\d\.\de[+-]\d+)", text).groups())
    assert parity < 1e-2 and vs_open_clip < 1e-2
    # Every row embedded, in each segment of the re-embed path.
    assert re.search(r"\| RereadStage\+TokenizeStage \| 12 \|", text) and re.search(r"\| WriteStage \| 12 \|", text)
    # The decode figure: both paths timed, and the same pixels within the resize's rounding
    # (TorchCodec decodes with libjpeg-turbo on the CPU, as Pillow does; the resize differs
    # in arithmetic: float32 there, Pillow's fixed point here).
    cpu_ms = float(re.search(r"^\| CPU: Pillow \+ resize_crop_uint8 .* one core \| ([\d.]+) \| \d+ \|$", text, re.M).group(1))
    assert cpu_ms > 0
    assert re.search(r"^\| torchcodec decode_jpeg on cpu \(batch 8\) \+ resize there \| \| [1-9]\d* \|$", text, re.M)
    worst, mean = re.search(r"largest difference (\d+) levels, mean (\d+\.\d+)", text).groups()
    assert int(worst) <= 10 and float(mean) < 0.5
    # The CPU workers' share per stored image in each mode: sending the bytes costs less than
    # decoding them (a loaded box may blur small differences; this one is a whole decode).
    worker_ms = {m.group(1): float(m.group(2)) for m in re.finditer(
        r"^\| (cpu|device) \| ([\d.]+) \| \d+ \|$", text, re.M)}
    assert set(worker_ms) == {"cpu", "device"} and 0 < worker_ms["device"] < worker_ms["cpu"], worker_ms
