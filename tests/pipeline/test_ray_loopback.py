"""A Ray the project starts itself listens on 127.0.0.1 only (issue 15, acceptance 4).

Each entry point runs as a user would run it, without a Ray address, in a subprocess. While it
runs, a thread reads ``/proc/net/tcp`` and ``/proc/net/tcp6`` and the socket links under
``/proc/<pid>/fd`` of every process below it (GCS, raylet, agents, workers), and the test
fails on any listening socket that is not on a loopback address.
"""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.proc_sockets import ListenerWatch, descendants, listeners
from testkit.http_server import FaultServer

pytestmark = pytest.mark.machine_wide  # starts a Ray of its own (tests/conftest.py)

REPO = Path(__file__).resolve().parents[2]
RAY_PROCESSES = {"gcs_server", "raylet"}


def _env(ray_tmp: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_"))}
    # A private temp dir: no other Ray on the machine is joined, none of ours is left behind.
    env["RAY_TMPDIR"] = ray_tmp
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env["PYTHONPATH"] = str(REPO)
    env["NO_ALBUMENTATIONS_UPDATE"] = "1"
    return env


def _run_watched(cmd: list[str], cwd: Path) -> tuple[subprocess.CompletedProcess, set]:
    ray_tmp = tempfile.mkdtemp(prefix="ccl-", dir="/tmp")
    with subprocess.Popen(
        cmd, cwd=cwd, env=_env(ray_tmp), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as proc:
        watch = ListenerWatch(proc.pid, interval=0.1).start()
        try:
            out, _ = proc.communicate(timeout=300)
        finally:
            seen = watch.stop()
    return subprocess.CompletedProcess(cmd, proc.returncode, out), seen | {("pids", frozenset(watch.pids))}


def _check(result: subprocess.CompletedProcess, seen: set) -> None:
    pids = next(s for s in seen if isinstance(s, tuple) and s[0] == "pids")[1]
    rows = [s for s in seen if not isinstance(s, tuple)]
    comms = {s.comm for s in rows}
    # The watch must have seen Ray's own daemons listening, else it proves nothing.
    assert RAY_PROCESSES <= comms, f"Ray daemons not observed (rc {result.returncode}):\n{result.stdout[-3000:]}"
    assert len(pids) > 3
    exposed = sorted(str(s) for s in rows if not s.loopback)
    assert not exposed, "listening on non-loopback addresses:\n" + "\n".join(exposed)
    assert result.returncode == 0, result.stdout[-3000:]


@pytest.fixture(scope="module")
def url_list(tmp_path_factory: pytest.TempPathFactory):
    files = {}
    for i in range(6):
        buf = io.BytesIO()
        Image.new("RGB", (64 + i, 48), (40 * i, 90, 200)).save(buf, "JPEG")
        files[f"/img/{i}.jpg"] = buf.getvalue()
    root = tmp_path_factory.mktemp("loopback")
    with FaultServer(files=files) as srv:
        # Slow answers keep the run going while the watch samples the workers' sockets.
        urls = [srv.url(p, delay="1") for p in files]
        pq.write_table(pa.table({"url": urls, "caption": [f"image {i}" for i in range(len(urls))]}),
                       root / "urls.parquet")
        yield root


def test_proc_sockets_reads_addresses_of_one_process() -> None:
    """The /proc reader itself: finds this process's sockets with the right addresses."""
    a = socket.socket(socket.AF_INET)
    b = socket.socket(socket.AF_INET6)
    try:
        a.bind(("127.0.0.2", 0))
        a.listen()
        b.bind(("::1", 0))
        b.listen()
        rows = listeners(descendants(os.getpid()))
        mine = {(r.host, r.port) for r in rows if r.pid == os.getpid()}
        assert ("127.0.0.2", a.getsockname()[1]) in mine
        assert ("::1", b.getsockname()[1]) in mine
        assert all(r.loopback for r in rows if r.pid == os.getpid())
    finally:
        a.close()
        b.close()


@pytest.mark.slow
def test_clipcurate_download_local_ray_listens_on_loopback_only(url_list: Path, tmp_path: Path) -> None:
    result, seen = _run_watched(
        [sys.executable, "-m", "pipeline.cli", "download", "--url_list", str(url_list / "urls.parquet"),
         "--output_folder", str(tmp_path / "out"), "--allowed_networks", "127.0.0.1/32",
         "--distributor", "ray", "--number_sample_per_shard", "3"],
        REPO,
    )
    _check(result, seen)
    assert (tmp_path / "out" / "00000.tar").exists()


@pytest.mark.slow
def test_job_run_directly_local_ray_listens_on_loopback_only(url_list: Path, tmp_path: Path) -> None:
    # Without an address the job runs on local processes (no Ray at all); asked for the Ray
    # scheduler it starts its own Ray, which must listen on loopback only.
    result, seen = _run_watched(
        [sys.executable, str(REPO / "jobs" / "embed_laion.py"), "--input", str(url_list / "urls.parquet"),
         "--output", str(tmp_path / "out"), "--allowed-networks", "127.0.0.1/32",
         "--number-sample-per-shard", "3", "--scheduler", "ray"],
        REPO,
    )
    _check(result, seen)
    assert (tmp_path / "out" / "embeddings" / "00000.parquet").exists()


def test_joining_a_cluster_is_left_to_that_cluster(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Only a Ray the project starts is made loopback-only: an address (given or in
    $RAY_ADDRESS, as under ``ray job submit``) is joined as it is."""
    from pipeline.ray_start import _will_start_local

    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))  # no cluster recorded by `ray start` here
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert _will_start_local(None) is True
    assert _will_start_local("local") is True
    assert _will_start_local("10.0.0.5:6379") is False
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    assert _will_start_local(None) is False


def _cluster_mode(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Ray in cluster mode (no local-only variable), with ray.init replaced by what Ray would
    connect to (its own canonicalisation of the address, as ray.init does); returns that list."""
    import ray
    import ray._private.ray_constants as ray_constants
    from ray._private import services

    monkeypatch.delenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", raising=False)
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", True)
    asked: list[str] = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda address=None, **kw: asked.append(services.canonicalize_bootstrap_address(address)))
    return asked


@pytest.mark.parametrize("given, env", [("127.0.0.1:{port}", None), (None, "127.0.0.1:{port}"),
                                        ("localhost:{port}", None), ("[::1]:{port}", None)])
def test_joining_a_loopback_only_head_keeps_the_loopback_address(
    monkeypatch: pytest.MonkeyPatch, given: str | None, env: str | None
) -> None:
    """A head listening on loopback only (infra/local/up.sh), joined without Ray's local-only
    variable in the environment: Ray must still be asked to connect to loopback. Left to
    itself it rewrites 127.0.0.1 into the host's external address, where that head is not."""
    import pipeline.ray_start as rs

    family, host = (socket.AF_INET6, "::1") if "::1" in (given or env or "") else (socket.AF_INET, "127.0.0.1")
    with socket.socket(family) as head:  # stands in for the GCS port of a loopback-only head
        head.bind((host, 0))
        head.listen()
        port = head.getsockname()[1]
        asked = _cluster_mode(monkeypatch)
        if env is None:
            monkeypatch.delenv("RAY_ADDRESS", raising=False)
        else:
            monkeypatch.setenv("RAY_ADDRESS", env.format(port=port))
        assert rs.init_ray(given.format(port=port) if given else None) is False  # joined, not started
    assert asked[0].rsplit(":", 1)[0].strip("[]") in ("127.0.0.1", "::1", "localhost"), asked
    assert asked[0].endswith(f":{port}")
    assert os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"


@pytest.mark.parametrize("listening", [[("tcp", "127.0.0.1"), ("tcp", "0.0.0.0")], [("tcp", "0.0.0.0")], []])
def test_a_head_on_every_interface_or_none_is_joined_as_ray_would(
    monkeypatch: pytest.MonkeyPatch, listening: list[tuple[str, str]]
) -> None:
    """127.0.0.1 names a cluster head that also listens elsewhere (Ray's default binding), or
    nothing listens: Ray's own rewriting to the node's address stays (the head registered this
    node under that address)."""
    import ray._private.ray_constants as ray_constants

    import pipeline.ray_start as rs
    from pipeline import proc_sockets

    fake = {i: (fam, host, 6379) for i, (fam, host) in enumerate(listening)}
    monkeypatch.setattr(proc_sockets, "listening_inodes", lambda: fake)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    asked = _cluster_mode(monkeypatch)
    monkeypatch.setattr(rs, "_will_start_local", lambda address: False)
    monkeypatch.setattr("ray.init", lambda address=None, **kw: asked.append(address))
    assert rs.init_ray("127.0.0.1:6379") is False
    assert asked == ["127.0.0.1:6379"]
    assert ray_constants.ENABLE_RAY_CLUSTER is True
    assert "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in os.environ


def test_joining_a_remote_cluster_leaves_ray_cluster_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray
    import ray._private.ray_constants as ray_constants

    import pipeline.ray_start as rs

    monkeypatch.delenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", raising=False)
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", True)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    asked: list[str | None] = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda address=None, **kw: asked.append(address))
    assert rs.init_ray() is False
    assert asked == [None]
    assert ray_constants.ENABLE_RAY_CLUSTER is True
    assert "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in os.environ
