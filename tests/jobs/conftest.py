"""A local stack for the job tests: one loopback Ray head + local S3 (infra/local/up.sh) for
the tests/jobs package, and helpers to run jobs/embed_laion.py against it."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LOCAL = REPO / "infra" / "local"
VENV = Path(sys.prefix)


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_"))}
    env.pop("CLIPCURATE_RUN_DIR", None)
    env["VENV"] = str(VENV)
    return env


def _read_state(path: Path) -> dict[str, str]:
    state = {}
    for line in path.read_text().splitlines():
        if line.startswith("export "):
            key, _, value = line[len("export ") :].partition("=")
            state[key] = shlex.split(value)[0] if value else ""
    return state


@dataclass
class Stack:
    """The running stack: state.env values and ways to talk to it."""

    run_dir: Path
    state: dict[str, str]

    @property
    def s3_endpoint(self) -> str:
        return self.state["S3_ENDPOINT_URL"]

    def aws_env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.s3_endpoint,
            "AWS_ENDPOINT_URL_S3": self.s3_endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_REGION": "us-east-1",
            "AWS_CONFIG_FILE": str(self.run_dir / "aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(self.run_dir / "aws-credentials"),
        }

    def client_env(self) -> dict[str, str]:
        """Environment of a `ray job submit` client (token auth of this run)."""
        return _clean_env() | {
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": self.state["RAY_AUTH_TOKEN_PATH"],
            "PYTHONPATH": str(REPO),
        }

    def driver_env(self) -> dict[str, str]:
        """Environment of a driver started here that joins the cluster (not via the job API).

        Ray's local-only mode, as up.sh sets for the head: without it ray.init swaps the
        loopback GCS address for the machine's own address and never reaches the head. The run
        marker makes down.sh and check_loopback.sh count the driver as part of the run."""
        return self.client_env() | self.aws_env() | {
            "RAY_ADDRESS": self.state["RAY_GCS_ADDRESS"],
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
            "RAY_USAGE_STATS_ENABLED": "0",
            "CLIPCURATE_LOCAL_RUN": str(self.run_dir),
        }

    def s3(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.s3_endpoint,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )

    def new_bucket(self) -> str:
        name = f"g-{uuid.uuid4().hex[:16]}"
        self.s3().create_bucket(Bucket=name)
        return name

    def objects(self, bucket: str, prefix: str = "") -> dict[str, tuple[str, object]]:
        """key -> (ETag, LastModified) of every object under ``prefix``."""
        out = {}
        for page in self.s3().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                out[obj["Key"]] = (obj["ETag"], obj["LastModified"])
        return out


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The tests on the local stack run last among these job tests, one module after another:
    the stack is package-scoped, so it is up only while they run. Idle, its Ray head, dashboard
    and S3 server take about 0.13 of a core, and the rest of the session is CPU-bound."""
    here = Path(__file__).resolve().parent
    mine = [i for i, item in enumerate(items) if Path(str(item.path)).resolve().parent == here]
    on_stack = {items[i].path for i in mine if "local_stack" in getattr(items[i], "fixturenames", ())}
    ordered = sorted((items[i] for i in mine), key=lambda item: item.path in on_stack)  # whole modules move
    for i, item in zip(mine, ordered, strict=True):
        items[i] = item


@pytest.fixture(scope="package")
def local_stack() -> Iterator[Stack]:
    """infra/local/up.sh once for the job tests (Ray head with 4 logical CPUs + local S3),
    stopped when the last of them is done."""
    # Short path on purpose: Ray's unix socket paths live under it (107-byte limit).
    run_dir = Path(tempfile.mkdtemp(prefix="ccg-", dir="/tmp"))
    up = subprocess.run(
        [str(LOCAL / "up.sh"), "--run-dir", str(run_dir), "--num-cpus", "4", "--object-store-mb", "300"],
        capture_output=True, text=True, timeout=240, env=_clean_env(), cwd=REPO,
    )
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        yield Stack(run_dir, _read_state(run_dir / "state.env"))
    finally:
        subprocess.run(
            [str(LOCAL / "down.sh"), "--run-dir", str(run_dir), "--quiet"],
            capture_output=True, text=True, timeout=120, env=_clean_env(), cwd=REPO,
        )
        shutil.rmtree(run_dir, ignore_errors=True)
