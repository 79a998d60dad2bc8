"""Bad safety inputs stop a run before Ray starts, with one line naming the file and the line
(issue 15, acceptance 6): lists that cannot be read, are malformed or hold a hash of the wrong
length, and an unsafe-classifier head whose input size does not fit the model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from safetensors.numpy import save_file

REPO = Path(__file__).resolve().parents[2]
SHA = "ab" * 32


def _run(argv: list[str], tmp_path: Path) -> tuple[subprocess.CompletedProcess, list[Path]]:
    ray_tmp = tmp_path / "ray-tmp"
    ray_tmp.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env |= {"RAY_TMPDIR": str(ray_tmp), "PYTHONPATH": str(REPO), "NO_ALBUMENTATIONS_UPDATE": "1"}
    done = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    return done, list(ray_tmp.iterdir())


@pytest.fixture
def url_list(tmp_path: Path) -> Path:
    path = tmp_path / "urls.parquet"
    pq.write_table(pa.table({"url": ["http://127.0.0.1:9/a.jpg"], "caption": ["a"]}), path)
    return path


def _lists(tmp_path: Path) -> dict[str, tuple[str, str, str]]:
    """case -> (config field, path, expected message start after the path)."""
    (tmp_path / "short.txt").write_text(f"# iwf\n{SHA}\n{SHA[:-1]}\n")
    (tmp_path / "nothex.txt").write_text("0123456789abcdef0123456789abcdeZ\n")
    (tmp_path / "pdq.txt").write_text(f"{SHA}\n\n{SHA}00\n")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    pq.write_table(pa.table({"sha1": ["00" * 20, "00" * 19]}), tmp_path / "rows.parquet")
    return {
        "wrong length": ("sha256", str(tmp_path / "short.txt"), ":3: a sha256 has 64 hex digits, got 63"),
        "not hex": ("md5", str(tmp_path / "nothex.txt"), ":1: md5 entry"),
        "pdq length": ("pdq", str(tmp_path / "pdq.txt"), ":3: a PDQ hash has 64 hex digits, got 66"),
        "unreadable": ("sha256", str(tmp_path / "missing.txt"), ": no such sha256 list"),
        "malformed parquet": ("md5", str(tmp_path / "broken.parquet"), ": cannot read the md5 list"),
        "parquet row": ("sha1", str(tmp_path / "rows.parquet"), ":row 2: a sha1 has 40 hex digits, got 38"),
    }


CASES = ["wrong length", "not hex", "pdq length", "unreadable", "malformed parquet", "parquet row"]


@pytest.mark.parametrize("case", CASES)
def test_bad_list_stops_the_job_before_ray(case: str, tmp_path: Path, url_list: Path) -> None:
    field, path, message = _lists(tmp_path)[case]
    done, ray_files = _run([str(REPO / "jobs" / "embed_laion.py"), "--input", str(url_list), "--output",
                            str(tmp_path / "out"), "--set", f"blocklist.{field}=[{path}]"], tmp_path)
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"embed_laion.py: error: {path}{message}"), lines[0]
    assert ray_files == []  # Ray never started (it would have made a session folder here)
    assert not (tmp_path / "out" / "shards").exists()


@pytest.mark.parametrize("case", ["wrong length", "malformed parquet"])
def test_bad_list_stops_clipcurate_download_before_ray(case: str, tmp_path: Path, url_list: Path) -> None:
    field, path, message = _lists(tmp_path)[case]
    kind = {"sha256": "sha256", "md5": "md5"}[field]
    done, ray_files = _run(["-m", "pipeline.cli", "download", "--url_list", str(url_list), "--output_folder",
                            str(tmp_path / "out"), "--blocklist", f"{kind}={path}"], tmp_path)
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith(f"clipcurate: error: {path}{message}"), done.stderr
    assert ray_files == []


def test_head_of_the_wrong_dimension_stops_the_job_before_ray(tmp_path: Path, url_list: Path) -> None:
    head = tmp_path / "nsfw.safetensors"
    save_file({"layers.0.weight": np.zeros((16, 768), np.float32), "layers.0.bias": np.zeros(16, np.float32),
               "layers.1.weight": np.zeros((1, 16), np.float32)}, str(head))
    done, ray_files = _run([str(REPO / "jobs" / "embed_laion.py"), "--input", str(url_list), "--output",
                            str(tmp_path / "out"), "--head", str(head), "--head-preset", "re-laion-research-safe"],
                           tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"embed_laion.py: error: moderate.head_path: {head}: head expects 768-d embeddings, the model gives 64"
    ]
    assert ray_files == []
