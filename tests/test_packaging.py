"""What ``pip install .`` ships: the runtime packages and the bundled model, never the test rig
(fault proxies, hostile images, the synthetic world and the tiny model's training data); and the
entry points start without anything only the test extra installs."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from testkit import REPO_ROOT

# Installed by the test extra only (or the test rig itself).
TEST_ONLY = ("testkit", "tests", "open_clip", "img2dataset", "webdataset", "moto", "hypothesis", "torchvision")


def test_the_wheel_holds_the_runtime_and_no_test_rig(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path),
         str(REPO_ROOT)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    (wheel,) = tmp_path.glob("clipcurate-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert tops == {"clip_model", "pipeline"}, tops
    assert "clip_model/weights/tiny-synthetic.safetensors" in names  # the bundled default model
    assert "pipeline/graph.py" in names and "pipeline/schedulers/local.py" in names
    modules = {n.rsplit("/", 1)[-1] for n in names if n.endswith(".py")}
    for rig in ("http_server", "s3_fault_proxy", "s3_server", "hostile_images", "synthetic", "train_tiny", "faults"):
        assert f"{rig}.py" not in modules, rig


def test_the_job_and_the_cli_start_without_test_only_packages() -> None:
    """``--help`` and a dry run of the job, and ``clipcurate download --help``, with every
    test-only package made unimportable."""
    block = (
        "import sys, importlib.abc\n"
        f"BLOCKED = {TEST_ONLY!r}\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in BLOCKED:\n"
        "            raise ImportError(f'{name} is test-only')\n"
        "sys.meta_path.insert(0, Block())\n"
    )
    for code in (
        "sys.argv = ['embed_laion.py', '--help']; import runpy; runpy.run_path('jobs/embed_laion.py', run_name='__main__')",
        "sys.argv = ['embed_laion.py', '--input', 'x', '--output', 'y', '--dry-run']; import runpy; "
        "runpy.run_path('jobs/embed_laion.py', run_name='__main__')",
        "from pipeline.cli import main; main(['download', '--help'])",
    ):
        done = subprocess.run([sys.executable, "-c", block + code], capture_output=True, text=True, timeout=120,
                              cwd=REPO_ROOT)
        assert done.returncode == 0, (code, done.stderr[-2000:])
        assert "usage:" in done.stdout or "input: x" in done.stdout, done.stdout[-500:]
