"""The crash guard (pipeline/crashguard.py) and the decode stage's quarantine of rows that kill
or hang their decoder (issue 7, acceptance 1), without Ray.

The work functions below run in the guard's child process, which imports this module by name.
Each appends a line to a log file per call, so the tests count real attempts.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pytest

from pipeline import crashguard
from pipeline import schema as S
from pipeline.config import DecodeConfig
from pipeline.crashguard import Crashed, Sandbox, SandboxError
from pipeline.stages.decode import DecodeStage
from testkit import subprocess_env
from testkit.faults import CRASH_MARKER, CRASHING_DECODER
from testkit.hostile_images import TESTDATA, fuzz_batch, fuzz_config, hostile_case

WORK = f"{__name__}:work"
MARKER = CRASH_MARKER


def work(item: tuple[str, str, int]) -> tuple[int, int]:
    """``(action, log file, value)`` -> ``(2 * value, pid)``; the action may instead kill
    the process, hang, exit, or raise. ``once-segv`` crashes only on its first attempt."""
    action, log, value = item
    with open(log, "a") as f:
        f.write(f"{action} {value}\n")
    if action == "segv" or (action == "once-segv" and Path(log).read_text().count("once-segv") == 1):
        os.kill(os.getpid(), signal.SIGSEGV)
    elif action == "hang":
        time.sleep(600)
    elif action == "exit":
        os._exit(3)
    elif action == "raise":
        raise ValueError("a bug in the work function")
    return 2 * value, os.getpid()


def _attempts(log: Path, action: str) -> int:
    return sum(1 for line in log.read_text().splitlines() if line.split()[0] == action)


@pytest.fixture
def log(tmp_path: Path) -> Path:
    path = tmp_path / "calls.log"
    path.touch()
    return path


@pytest.fixture
def box() -> Iterator[Sandbox]:
    b = Sandbox(WORK, max_attempts=2, timeout_s=20)
    yield b
    b.close()


def test_items_run_in_one_reused_child_in_order(box: Sandbox, log: Path) -> None:
    first = box.map([("ok", str(log), v) for v in range(5)])
    second = box.map([("ok", str(log), 10)])
    assert [r[0] for r in first] == [0, 2, 4, 6, 8] and second[0][0] == 20
    pids = {r[1] for r in first + second}
    assert len(pids) == 1 and pids != {os.getpid()}  # one child, not this process
    assert box.starts == 1


def test_start_runs_the_child_before_the_first_item_and_map_reuses_it(box: Sandbox, log: Path) -> None:
    box.start()
    assert box.starts == 1 and log.read_text() == ""  # started, nothing run yet
    box.start()  # already running: not another child
    (value, pid), = box.map([("ok", str(log), 4)])
    assert value == 8 and box.starts == 1 and pid != os.getpid()


def test_threads_sharing_a_sandbox_each_get_their_own_results_in_order(box: Sandbox, log: Path) -> None:
    """Two threads of one worker (its offload thread and, on a resumed job, its main thread)
    may call the same shared sandbox: the child's answers must never cross between them."""
    import threading

    got: dict[int, list[int]] = {}

    def run(base: int) -> None:
        out: list[int] = []
        for k in range(6):
            out += [r[0] for r in box.map([("ok", str(log), base + 10 * k + j) for j in range(7)])]
        got[base] = out

    threads = [threading.Thread(target=run, args=(base,)) for base in (1000, 5000)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for base in (1000, 5000):
        assert got[base] == [2 * (base + 10 * k + j) for k in range(6) for j in range(7)]
    assert box.starts == 1


@pytest.mark.parametrize("max_attempts", [1, 3])
def test_a_crashing_item_is_tried_max_attempts_times_then_quarantined(log: Path, max_attempts: int) -> None:
    box = Sandbox(WORK, max_attempts=max_attempts, timeout_s=20)
    try:
        items = [("ok", str(log), 1), ("segv", str(log), 2), ("ok", str(log), 3)]
        out = box.map(items)
    finally:
        box.close()
    assert out[1] == Crashed("worker_crash", "killed by SIGSEGV", max_attempts)
    assert [out[0][0], out[2][0]] == [2, 6]  # its neighbours are unaffected
    assert _attempts(log, "segv") == max_attempts
    assert _attempts(log, "ok") == 2  # the rows before it are never redone
    assert box.starts == max_attempts + 1


def test_a_one_off_death_is_retried_not_quarantined(box: Sandbox, log: Path) -> None:
    out = box.map([("once-segv", str(log), 4), ("ok", str(log), 5)])
    assert [r[0] for r in out] == [8, 10]
    assert _attempts(log, "once-segv") == 2 and box.starts == 2


def test_exit_code_and_timeout_are_reported(log: Path) -> None:
    box = Sandbox(WORK, max_attempts=1, timeout_s=1.0)
    try:
        started = time.monotonic()
        out = box.map([("exit", str(log), 0), ("hang", str(log), 0), ("ok", str(log), 7)])
        took = time.monotonic() - started
    finally:
        box.close()
    assert out[0] == Crashed("worker_crash", "exited with code 3", 1)
    assert out[1] == Crashed("timeout", "gave no result in 1 s", 1)
    assert out[2][0] == 14
    assert took < 30  # the hung child was killed, not waited for


def test_a_child_started_past_descriptor_1024_works_and_is_replaced_after_a_crash(
    log: Path, descriptors_past_1024: None
) -> None:
    # A download worker holding many connections starts its decode child (or a new one after
    # a crash) on descriptors select() refuses; the guard must still hear and time it.
    box = Sandbox(WORK, max_attempts=2, timeout_s=1.0)
    try:
        out = box.map([("ok", str(log), 1), ("segv", str(log), 2), ("hang", str(log), 3), ("ok", str(log), 4)])
        assert box._child is not None and box._child.fd > 1024
    finally:
        box.close()
    assert out[0][0] == 2 and out[3][0] == 8
    assert out[1] == Crashed("worker_crash", "killed by SIGSEGV", 2)
    assert out[2] == Crashed("timeout", "gave no result in 1 s", 2)


def test_a_raising_work_function_is_a_sandbox_error_and_the_sandbox_recovers(box: Sandbox, log: Path) -> None:
    with pytest.raises(SandboxError, match="ValueError: a bug in the work function"):
        box.map([("ok", str(log), 1), ("raise", str(log), 2), ("ok", str(log), 3)])
    assert box.map([("ok", str(log), 9)])[0][0] == 18


def test_a_child_that_cannot_start_is_a_sandbox_error() -> None:
    box = Sandbox("pipeline.no_such_module:fn")
    with pytest.raises(SandboxError, match="on start"):
        box.map([1])


def test_the_child_dies_with_its_parent(tmp_path: Path) -> None:
    """A parent killed with SIGKILL (as Ray kills a worker) takes its child along, even when
    the child is busy in a hung decode."""
    log = tmp_path / "calls.log"
    script = textwrap.dedent(f"""
        import sys
        from pipeline.crashguard import Sandbox
        box = Sandbox({WORK!r}, timeout_s=None)
        print(box.map([("ok", {str(log)!r}, 1)])[0][1], flush=True)
        box.map([("hang", {str(log)!r}, 0)])
    """)
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parents[2])
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    deadline = time.monotonic() + 20
    while _attempts(log, "hang") == 0:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    parent.kill()
    parent.wait()
    while Path(f"/proc/{child}").exists() and "Z" not in _proc_state(child):
        assert time.monotonic() < deadline, "the child outlived its parent"
        time.sleep(0.05)


def _proc_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "Z"


# --------------------------------------------------------------------------- decode stage


@pytest.fixture
def fresh_children() -> Iterator[None]:
    """Children copy the environment when they start: restart them around each test."""
    crashguard.close_shared()
    yield
    crashguard.close_shared()


def _rows(marked: set[int]) -> pa.Table:
    photos = sorted(TESTDATA.glob("*.jpg"))
    n = 8
    urls = [f"http://127.0.0.1/{i}.jpg" + (f"?{MARKER}" if i in marked else "") for i in range(n)]
    statuses = [S.OK] * n
    statuses[6] = "http_404"
    blobs = [photos[i % len(photos)].read_bytes() for i in range(n)]
    blobs[6] = None
    blobs[7] = b"not an image"
    return pa.table({
        S.KEY: [f"{i:09d}" for i in range(n)], S.URL: urls, S.STATUS: statuses,
        S.ERROR: [None] * 6 + ["404 Not Found", None], S.IMAGE_BYTES: pa.array(blobs, pa.binary()),
    })


def test_decode_quarantines_marked_rows_and_decodes_the_rest_as_in_process(fresh_children: None) -> None:
    cfg = DecodeConfig(image_size=64)
    reference = DecodeStage(cfg=cfg, isolate=False).process_batch(_rows(set()))
    out = DecodeStage(cfg=cfg, decoder=CRASHING_DECODER).process_batch(_rows({1, 4}))
    assert out.num_rows == 8
    for i, (got, want) in enumerate(zip(out.to_pylist(), reference.to_pylist(), strict=True)):
        if i in (1, 4):
            assert got[S.STATUS] == S.WORKER_CRASH and S.stage_of(got[S.STATUS]) == "decode"
            assert got[S.ERROR] == "decoder process killed by SIGSEGV on this row (2 attempts); quarantined"
            assert got[S.IMAGE] is None and got[S.SHA256] is None and got[S.WIDTH] is None
        else:
            got.pop(S.URL), want.pop(S.URL)
            assert got == want, i
    assert reference.column(S.STATUS).to_pylist() == [S.OK] * 6 + ["http_404", "unsupported_format"]


def test_the_real_decoder_ignores_the_marker(fresh_children: None) -> None:
    for isolate in (True, False):
        out = DecodeStage(cfg=DecodeConfig(image_size=64), isolate=isolate).process_batch(_rows({1, 4}))
        assert out.column(S.STATUS).to_pylist()[:6] == [S.OK] * 6


def test_without_isolation_the_marked_row_kills_the_decoding_process(tmp_path: Path) -> None:
    script = textwrap.dedent("""
        import pyarrow as pa
        from pipeline import schema as S
        from pipeline.stages.decode import DecodeStage
        from testkit.faults import CRASHING_DECODER
        rows = pa.table({S.KEY: ["0"], S.URL: ["http://127.0.0.1/a?SEGV-HERE"], S.STATUS: ["ok"],
                         S.ERROR: pa.nulls(1, pa.string()), S.IMAGE_BYTES: pa.array([b"x"], pa.binary())})
        DecodeStage(isolate=False, decoder=CRASHING_DECODER).process_batch(rows)
        print("survived")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[2], env=subprocess_env())
    assert done.returncode == -signal.SIGSEGV and "survived" not in done.stdout


def test_isolated_and_in_process_decoding_agree_on_hostile_bytes(fresh_children: None) -> None:
    for seed in range(6):
        rng = random.Random(1000 + seed)
        cases = [hostile_case(rng)[1] for _ in range(8)]
        cfg = fuzz_config(rng)
        batch = fuzz_batch(cases)
        isolated = DecodeStage(cfg=cfg).process_batch(batch)
        in_process = DecodeStage(cfg=cfg, isolate=False).process_batch(batch)
        assert isolated.equals(in_process), seed
