"""infra/local/: the loopback-only local stack (Ray head + job server, local S3, image server).

The scripts run for real: a Ray head is started, a job is submitted with the ``ray job submit``
CLI and reads/writes the local S3 server and the image server, and everything is stopped.
Which sockets the processes listen on is read here straight from /proc (socket inodes of each
process matched against /proc/net/{tcp,tcp6,udp,udp6}), independently of the ``ss``-based
check_loopback.sh that the scripts use.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from testkit.testdata import PHOTOS_DIR

REPO = Path(__file__).resolve().parents[2]
LOCAL = REPO / "infra" / "local"
VENV = Path(sys.prefix)
PHOTO = PHOTOS_DIR / "123_456.jpg"

pytestmark = [
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the local stack scripts read /proc (Linux)"),
    pytest.mark.machine_wide,  # starts the local stack's Ray head (tests/conftest.py)
]


def _script_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_"))}
    env["VENV"] = str(VENV)
    env.pop("CLIPCURATE_RUN_DIR", None)
    return env


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_script_env(),
        cwd=REPO,
    )


def _read_state(path: Path) -> dict[str, str]:
    state = {}
    for line in path.read_text().splitlines():
        if line.startswith("export "):
            key, _, value = line[len("export ") :].partition("=")
            state[key] = shlex.split(value)[0] if value else ""
    return state


# ------------------------------------------------------------- independent /proc reading


def _stat(pid: int) -> tuple[int, int] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return int(fields[1]), int(fields[3])  # ppid, session


def _session_and_descendants(roots: set[int]) -> set[int]:
    """Every process in the sessions of ``roots`` plus all descendants of those."""
    table = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (st := _stat(int(entry.name))) is not None:
            table[int(entry.name)] = st
    sessions = {table[p][1] for p in roots if p in table}
    found = {p for p, (_, sid) in table.items() if sid in sessions} | (roots & table.keys())
    while more := {p for p, (ppid, _) in table.items() if ppid in found} - found:
        found |= more
    return found


def _decode_addr(hex_addr: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    raw = bytes.fromhex(hex_addr)
    if len(raw) == 4:
        return ipaddress.IPv4Address(raw[::-1])  # /proc/net/tcp: one little-endian u32
    # /proc/net/tcp6: four little-endian u32 words
    return ipaddress.IPv6Address(b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4)))


def _bound_sockets() -> dict[int, tuple[str, ipaddress._BaseAddress, int]]:
    """inode -> (proto, local address, port) of every listening TCP and unconnected UDP socket."""
    out = {}
    for proto, want_state in (("tcp", "0A"), ("tcp6", "0A"), ("udp", "07"), ("udp6", "07")):
        for line in Path(f"/proc/net/{proto}").read_text().splitlines()[1:]:
            f = line.split()
            if f[3] != want_state:
                continue
            addr, port = f[1].split(":")
            out[int(f[9])] = (proto, _decode_addr(addr), int(port, 16))
    return out


def _listening(pids: set[int]) -> list[tuple[int, str, ipaddress._BaseAddress, int]]:
    sockets = _bound_sockets()
    rows = []
    for pid in pids:
        try:
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inode = int(target[len("socket:[") : -1])
                if inode in sockets:
                    proto, addr, port = sockets[inode]
                    rows.append((pid, proto, addr, port))
    return rows


def _loopback(addr: ipaddress._BaseAddress) -> bool:
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


def _alive(pids: set[int]) -> set[int]:
    alive = set()
    for pid in pids:
        st = Path(f"/proc/{pid}/stat")
        try:
            if st.read_text().rsplit(")", 1)[1].split()[0] != "Z":
                alive.add(pid)
        except OSError:
            pass
    return alive


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture
def run_dir() -> Iterator[Path]:
    # Short path on purpose: Ray's unix socket paths live under it (107-byte limit).
    path = Path(tempfile.mkdtemp(prefix="cc-", dir="/tmp"))
    try:
        yield path
    finally:
        _run(LOCAL / "down.sh", "--run-dir", path, "--quiet")
        shutil.rmtree(path, ignore_errors=True)


def _spawn_marked(run_dir: Path, code: str) -> subprocess.Popen[bytes]:
    """A process that looks like part of ``run_dir``'s stack (marker env, own session)."""
    env = _script_env() | {"CLIPCURATE_LOCAL_RUN": str(run_dir.resolve())}
    return subprocess.Popen(
        [sys.executable, "-c", code], env=env, start_new_session=True, stdout=subprocess.PIPE
    )


JOB = """\
import hashlib, sys, urllib.request
import boto3, ray

ray.init()

@ray.remote
def square(x):
    return x * x

total = sum(ray.get([square.remote(i) for i in range(1, 11)]))
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
image = opener.open(sys.argv[1] + "/photo.jpg", timeout=30).read()
# No endpoint given: the head's environment (set by up.sh) points boto3 at the local S3.
s3 = boto3.client("s3")
s3.create_bucket(Bucket="job-output")
s3.put_object(Bucket="job-output", Key="result.txt", Body=f"{total}".encode())
print(f"RESULT total={total} image_sha256={hashlib.sha256(image).hexdigest()}", flush=True)
"""


@pytest.mark.slow
def test_local_stack_is_loopback_only_runs_a_job_and_stops_cleanly(run_dir: Path) -> None:
    images = run_dir / "images"
    images.mkdir()
    shutil.copy(PHOTO, images / "photo.jpg")
    # A leftover from a crashed earlier run in the same directory: a process of the run and a
    # state file naming a dead pid. up.sh must stop the one and ignore the other.
    stale = _spawn_marked(run_dir, "import time; time.sleep(600)")
    (run_dir / "state.env").write_text("export CLIPCURATE_PIDS=999999999\n")

    t0 = time.monotonic()
    up = _run(
        LOCAL / "up.sh",
        "--run-dir",
        run_dir,
        "--num-cpus",
        "1",
        "--object-store-mb",
        "100",
        "--images",
        images,
    )
    assert up.returncode == 0, up.stdout + up.stderr
    up_s = time.monotonic() - t0
    assert stale.wait(timeout=5) == -signal.SIGTERM, "up.sh left the stale process running"
    state = _read_state(run_dir / "state.env")
    assert up.stdout.strip().endswith(f"export IMAGES_ROOT={images}")

    try:
        dashboard = state["RAY_ADDRESS"]
        assert dashboard == f"http://127.0.0.1:{state['RAY_DASHBOARD_PORT']}"
        roots = {int(state[k]) for k in ("RAY_GCS_PID", "S3_PID", "IMAGES_PID")}
        stack = _session_and_descendants(roots)
        names = {Path(f"/proc/{p}/comm").read_text().strip() for p in _alive(stack)}
        assert {"gcs_server", "raylet"} <= names, names

        # Every bound socket of every process of the stack is on loopback ...
        rows = _listening(stack)
        offenders = [r for r in rows if not _loopback(r[2])]
        assert not offenders, offenders
        # ... and the ports the state file promises are among them.
        ports = {port for _, _, _, port in rows}
        promised = {int(v) for k, v in state.items() if k.endswith("_PORT")}
        promised |= {int(state[k].rsplit(":", 1)[1]) for k in ("S3_ENDPOINT_URL", "IMAGES_URL")}
        assert len(promised) == 11 and promised <= ports, promised - ports
        check = _run(LOCAL / "check_loopback.sh", "--run-dir", run_dir)
        assert check.returncode == 0, check.stdout + check.stderr
        assert f"127.0.0.1:{state['RAY_DASHBOARD_PORT']}" in check.stdout

        # Idempotent: a second up.sh finds the healthy stack and changes nothing.
        again = _run(
            LOCAL / "up.sh",
            "--run-dir",
            run_dir,
            "--num-cpus",
            "1",
            "--object-store-mb",
            "100",
            "--images",
            images,
        )
        assert again.returncode == 0 and "already running" in again.stderr
        assert _read_state(run_dir / "state.env") == state

        # The job API refuses a caller without the run's token.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with pytest.raises(urllib.error.HTTPError) as refused:
            opener.open(f"{dashboard}/api/jobs/", timeout=10)
        assert refused.value.code == 401

        # Submit with the CLI exactly as a user would.
        job_dir = run_dir / "job"
        job_dir.mkdir()
        (job_dir / "x.py").write_text(JOB)
        env = _script_env() | {
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": state["RAY_AUTH_TOKEN_PATH"],
        }
        ray_cli = str(VENV / "bin" / "ray")
        submit = subprocess.run(
            [
                ray_cli,
                "job",
                "submit",
                "--address",
                dashboard,
                "--submission-id",
                "f-job-1",
                "--working-dir",
                str(job_dir),
                "--",
                "python",
                "x.py",
                state["IMAGES_URL"],
            ],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
            cwd=run_dir,
        )
        assert submit.returncode == 0, submit.stdout + submit.stderr
        photo_sha = hashlib.sha256(PHOTO.read_bytes()).hexdigest()
        assert f"RESULT total=385 image_sha256={photo_sha}" in submit.stdout
        token = Path(state["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
        request = urllib.request.Request(
            f"{dashboard}/api/jobs/f-job-1", headers={"Authorization": f"Bearer {token}"}
        )
        with opener.open(request, timeout=10) as resp:
            info = json.load(resp)
        assert info["status"] == "SUCCEEDED" and info["entrypoint"].startswith("python x.py")

        # The job wrote to the stack's S3 server, not anywhere else.
        import boto3

        s3 = boto3.client(
            "s3",
            endpoint_url=state["S3_ENDPOINT_URL"],
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )
        assert s3.get_object(Bucket="job-output", Key="result.txt")["Body"].read() == b"385"

        # Sockets opened while the job ran (workers, driver) were on loopback too.
        stack |= _session_and_descendants(roots)
        late = [r for r in _listening(stack) if not _loopback(r[2])]
        assert not late, late
    finally:
        stack = _session_and_descendants(
            {int(state[k]) for k in ("RAY_GCS_PID", "S3_PID", "IMAGES_PID") if state.get(k)}
        )
        down = _run(LOCAL / "down.sh", "--run-dir", run_dir)

    assert down.returncode == 0, down.stdout + down.stderr
    assert not _alive(stack), f"left running: {_alive(stack)}"
    assert not (run_dir / "state.env").exists()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", int(state["RAY_DASHBOARD_PORT"])), timeout=2)
    assert up_s < 60, f"up.sh took {up_s:.1f} s"


def test_check_loopback_flags_a_wildcard_listener_and_down_stops_it(run_dir: Path) -> None:
    # A process of the run that listens on every interface (it never accepts; it exists for
    # the few hundred milliseconds the check takes).
    code = (
        "import socket, sys, time\n"
        "s = socket.socket(); s.bind((sys.argv[1] if len(sys.argv) > 1 else '0.0.0.0', 0))\n"
        "s.listen(); print(s.getsockname()[1], flush=True); time.sleep(600)\n"
    )
    wide = _spawn_marked(run_dir, code)
    try:
        port = int(wide.stdout.readline())
        check = _run(LOCAL / "check_loopback.sh", "--run-dir", run_dir)
        assert check.returncode == 1, check.stdout + check.stderr
        assert f"0.0.0.0:{port}   <-- NOT LOOPBACK" in check.stdout
    finally:
        # No state file exists: down.sh finds the process by its marker alone.
        down = _run(LOCAL / "down.sh", "--run-dir", run_dir)
    assert down.returncode == 0, down.stderr
    assert wide.wait(timeout=5) == -signal.SIGTERM

    narrow = _spawn_marked(run_dir, code.replace("'0.0.0.0'", "'127.0.0.1'"))
    try:
        narrow.stdout.readline()
        check = _run(LOCAL / "check_loopback.sh", "--run-dir", run_dir)
        assert check.returncode == 0, check.stdout + check.stderr
    finally:
        narrow.kill()
        narrow.wait()
    # Nothing of the run is left: the check refuses to pass vacuously.
    empty = _run(LOCAL / "check_loopback.sh", "--run-dir", run_dir)
    assert empty.returncode == 1 and "no running process" in empty.stderr
