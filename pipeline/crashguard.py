"""Run per-item work in a child process, so an item that kills its process costs one item.

A decoder bug on hostile bytes (a segfault in a C library, an abort, an endless loop) would
otherwise kill or hang the Ray worker that runs the whole batch; Ray would retry the batch a
bounded number of times and then fail the job for one row. :class:`Sandbox` keeps one child
process per worker process and sends it one item at a time (request, response). The child
works through the items in order, so when it dies the item in flight is the culprit: it is
retried in a fresh child up to ``max_attempts`` times in all (a death that was not its fault,
such as the OOM killer picking the child, gets a second chance), then reported as
:class:`Crashed` while every other item goes on as before. An item that takes longer than
``timeout_s`` gets the same treatment (the child is killed).

Protocol on the child's stdin/stdout: frames of an 8-byte big-endian length and a pickle. The
child answers ``("ready", None)`` once its function is imported; then the parent sends a chunk
(a list of items) and the child answers ``("ok", result)`` or ``("error", "Type: message")``
per item, in order, as each is done. The child points its own fd 1 at stderr, so a stray
print in the work function cannot corrupt the protocol.
"""

from __future__ import annotations

import atexit
import fcntl
import importlib
import math
import os
import pickle
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from pipeline.no_pandas import refuse_pandas

_HEADER = struct.Struct(">Q")
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[1])
# How long a fresh child may take to import its work function (pyarrow, numpy, Pillow) on a
# loaded machine before the sandbox counts as broken rather than slow.
_START_TIMEOUT_S = 120.0


class SandboxError(RuntimeError):
    """The sandbox itself failed (its child could not start, or the work function raised):
    a bug or a broken installation, never a property of one item."""


@dataclass(frozen=True)
class Crashed:
    """An item whose child process died (``reason="worker_crash"``) or ran past the timeout
    (``reason="timeout"``) on every one of ``attempts`` tries. ``detail``: how, for the row's
    error ("killed by SIGSEGV", "exited with code 1", "gave no result in 60 s")."""

    reason: str
    detail: str
    attempts: int


def _death(returncode: int) -> str:
    """How a child ended, from its Popen return code: "killed by SIGSEGV", "exited with code 1"."""
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with code {returncode}"


def _write_frame(f: BinaryIO, obj: Any) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    f.write(_HEADER.pack(len(data)))
    f.write(data)
    f.flush()


def _approx_size(item: Any) -> int:
    """Bytes an item carries in its bytes fields (the part of a pickle that matters)."""
    if isinstance(item, bytes | bytearray):
        return len(item)
    if isinstance(item, tuple | list):
        return sum(_approx_size(x) for x in item)
    return 64


class _Dead(Exception):
    """The child closed its end (it died) or did not answer in time."""

    def __init__(self, timed_out: bool) -> None:
        super().__init__("timed out" if timed_out else "died")
        self.timed_out = timed_out


def _read_exact(fd: int, n: int, deadline: float | None) -> bytearray:
    # Read straight into one buffer: a chunk of large images is tens of MB, and joining
    # pieces would copy it once more.
    buf = bytearray(n)
    view = memoryview(buf)
    pos = 0
    poller = None
    while pos < n:
        if deadline is not None:
            if poller is None:
                # poll, not select: select refuses a descriptor past 1024, which a worker
                # holding many connections has when it starts a child after a crash.
                poller = select.poll()
                poller.register(fd, select.POLLIN)
            left = deadline - time.monotonic()
            if left <= 0 or not poller.poll(math.ceil(left * 1000)):
                raise _Dead(timed_out=True)
        got = os.readv(fd, [view[pos:]])
        if not got:
            raise _Dead(timed_out=False)
        pos += got
    return buf


def _read_frame(fd: int, deadline: float | None) -> Any:
    (size,) = _HEADER.unpack(_read_exact(fd, _HEADER.size, deadline))
    return pickle.loads(_read_exact(fd, size, deadline))


def _widen_pipe(fd: int) -> None:
    """Linux: a 1 MiB pipe buffer instead of 64 KiB, so an image crosses in a few writes
    rather than dozens of wake-ups of the other process (measurable on a busy machine)."""
    if hasattr(fcntl, "F_SETPIPE_SZ"):
        try:
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, 1 << 20)
        except OSError:  # above /proc/sys/fs/pipe-max-size for this user: keep the default
            pass


_SPAWNERS: dict[int, ThreadPoolExecutor] = {}
_SPAWNERS_LOCK = threading.Lock()


def _spawn(args: list[str], **kwargs: Any) -> subprocess.Popen:
    """``subprocess.Popen(args, **kwargs)``, started from one thread that lives as long as
    this process. The child's PR_SET_PDEATHSIG (see :func:`_die_with_parent`) fires when the
    *thread* that started it ends, not the process: a child started from a short-lived
    thread (a worker's pool thread, a test's thread) would be killed with that thread."""
    with _SPAWNERS_LOCK:
        spawner = _SPAWNERS.get(os.getpid())
        if spawner is None:  # first use in this process (a fork does not inherit the thread)
            spawner = _SPAWNERS[os.getpid()] = ThreadPoolExecutor(1, thread_name_prefix="crashguard-spawn")
    return spawner.submit(subprocess.Popen, args, **kwargs).result()


class _Child:
    """One child process running ``python -m pipeline.crashguard <module:function>``."""

    def __init__(self, target: str) -> None:
        env = dict(os.environ)
        # The child must import the same pipeline package as this process, wherever Ray put
        # it (an editable install, or a job's working_dir).
        env["PYTHONPATH"] = os.pathsep.join([_PACKAGE_ROOT, *filter(None, [env.get("PYTHONPATH")])])
        # The child works one item at a time: one thread for native libraries (torch's
        # resampling in the decode child), whose idle pool threads would spin for nothing.
        env["OMP_NUM_THREADS"] = "1"
        self.proc = _spawn(
            [sys.executable, "-m", "pipeline.crashguard", target, str(os.getpid())],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            close_fds=True,
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.stdin = self.proc.stdin
        self.fd = self.proc.stdout.fileno()
        for f in (self.proc.stdin, self.proc.stdout):
            _widen_pipe(f.fileno())
        try:
            kind, _ = _read_frame(self.fd, time.monotonic() + _START_TIMEOUT_S)
        except _Dead as e:
            self.kill()
            how = "did not start in time" if e.timed_out else f"{_death(self.proc.returncode)} on start"
            raise SandboxError(f"crash guard child for {target} {how}; see the worker's stderr") from None
        if kind != "ready":
            self.kill()
            raise SandboxError(f"crash guard child for {target} answered {kind!r} instead of 'ready'")

    def send(self, items: list[Any]) -> None:
        """Hand the child a chunk of items; raises _Dead when it is gone."""
        try:
            _write_frame(self.stdin, items)
        except (BrokenPipeError, OSError):
            raise _Dead(timed_out=False) from None

    def result(self, timeout_s: float | None) -> Any:
        """The next item's result; raises _Dead when the child dies or times out on it,
        SandboxError when the work function raised."""
        kind, value = _read_frame(self.fd, time.monotonic() + timeout_s if timeout_s else None)
        if kind == "error":
            raise SandboxError(f"work function raised in the crash guard child: {value}")
        return value

    def kill(self) -> int:
        """Stop the child (SIGKILL if it is still running); returns its exit status."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                try:
                    f.close()
                except OSError:
                    pass
        return self.proc.returncode

    def close(self) -> None:
        """Ask the child to exit (EOF on its stdin), then make sure it did."""
        try:
            self.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        self.kill()


class Sandbox:
    """Calls ``target`` (``"package.module:function"``, importable by name, taking and
    returning picklable values) on items in a child process; see the module docstring.

    ``max_attempts``: tries per item when the child dies or times out on it (>= 1).
    ``timeout_s``: seconds one item may take; None waits forever. ``starts`` counts child
    processes started so far (one, plus one after every crash or timeout).
    """

    chunk_items = 64
    chunk_bytes = 32 << 20

    def __init__(self, target: str, max_attempts: int = 2, timeout_s: float | None = 60.0) -> None:
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
        if timeout_s is not None and timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0 or None, got {timeout_s}")
        self.target = target
        self.max_attempts = max_attempts
        self.timeout_s = timeout_s
        self.starts = 0
        self._child: _Child | None = None
        # One caller at a time: the child answers in order, one conversation.
        self._lock = threading.Lock()

    def start(self) -> None:
        """Start the child now if none runs (``map`` otherwise starts it when first needed).
        Raises SandboxError when it cannot start."""
        with self._lock:
            self._ensure_child()

    def _ensure_child(self) -> _Child:
        if self._child is None:
            self._child = _Child(self.target)
            self.starts += 1
        return self._child

    def map(self, items: Sequence[Any]) -> list[Any]:
        """``target(item)`` for each item, in order; :class:`Crashed` in place of the result of
        an item whose child died or timed out ``max_attempts`` times. Raises SandboxError when
        the child cannot start or the function raises. Thread-safe: callers take turns."""
        with self._lock:
            return self._map(items)

    def _map(self, items: Sequence[Any]) -> list[Any]:
        results: list[Any] = []
        attempts = 0  # deaths so far on items[len(results)], the next item without a result
        while len(results) < len(items):
            child = self._ensure_child()
            chunk = self._chunk(items, len(results))
            try:
                # One frame per chunk and one per result: the child never waits for us between
                # items, which on a busy machine costs more than the pipe itself.
                child.send(chunk)
                for _ in chunk:
                    results.append(child.result(self.timeout_s))
                    attempts = 0
            except _Dead as e:
                code = child.kill()
                self._child = None
                attempts += 1
                if attempts >= self.max_attempts:
                    detail = f"gave no result in {self.timeout_s:g} s" if e.timed_out else _death(code)
                    results.append(Crashed("timeout" if e.timed_out else "worker_crash", detail, attempts))
                    attempts = 0
            except BaseException:
                # The child may still be writing results of this chunk: never reuse it.
                child.kill()
                self._child = None
                raise
        return results

    def _chunk(self, items: Sequence[Any], start: int) -> list[Any]:
        """Items from ``start`` on, at most ``chunk_items`` of them and about ``chunk_bytes``
        of pickled data (always at least one), so the child never holds a whole large batch."""
        chunk: list[Any] = []
        size = 0
        for item in items[start : start + self.chunk_items]:
            size += _approx_size(item)
            if chunk and size > self.chunk_bytes:
                break
            chunk.append(item)
        return chunk

    def close(self) -> None:
        """Stop the child process, if one runs. A ``map`` still running on another thread (a
        worker closing after a failure elsewhere) is not waited for past a few seconds: its
        child is killed, and that ``map`` ends as if the child had died."""
        if not self._lock.acquire(timeout=5.0):
            child = self._child
            if child is not None:
                child.proc.kill()
            return
        try:
            if self._child is not None:
                self._child.close()
                self._child = None
        finally:
            self._lock.release()


# One sandbox per (target, settings) per process: Ray runs many decode tasks in one worker
# process, and each should not pay for starting a child. Keyed by pid too, so a forked copy
# of this process never talks to its parent's child.
_SHARED: dict[tuple[int, str, int, float | None], Sandbox] = {}


_SHARED_LOCK = threading.Lock()


def shared_sandbox(target: str, max_attempts: int = 2, timeout_s: float | None = 60.0) -> Sandbox:
    """The process-wide :class:`Sandbox` for these arguments (created on first use, closed
    at interpreter exit); threads of one process get the same one."""
    key = (os.getpid(), target, max_attempts, timeout_s)
    with _SHARED_LOCK:
        box = _SHARED.get(key)
        if box is None:
            box = _SHARED[key] = Sandbox(target, max_attempts, timeout_s)
        return box


@atexit.register
def close_shared() -> None:
    """Stop the children of this process's shared sandboxes. The next use starts a fresh
    child, which sees the environment of that moment (a child copies it when it starts)."""
    for key, box in list(_SHARED.items()):
        if key[0] == os.getpid():
            box.close()
    _SHARED.clear()


def _die_with_parent(parent_pid: int) -> None:
    """Linux: have the kernel SIGKILL this child when its parent dies, so a child stuck in
    hostile input does not outlive a killed worker (EOF on stdin covers the idle case)."""
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(0)


def _child_main(target: str, parent_pid: int) -> None:
    _die_with_parent(parent_pid)
    # The work function turns bytes into bytes; pyarrow would import pandas for nothing.
    refuse_pandas()
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # prints from the work function go to stderr, not into the protocol
    sys.stdout = sys.stderr
    module, _, name = target.partition(":")
    fn = getattr(importlib.import_module(module), name)
    _write_frame(out, ("ready", None))
    fd = sys.stdin.buffer.fileno()
    while True:
        try:
            chunk = _read_frame(fd, None)
        except _Dead:
            return  # parent closed stdin or died
        for item in chunk:
            try:
                reply = ("ok", fn(item))
            except Exception as e:
                reply = ("error", f"{type(e).__name__}: {e}"[:1000])
            _write_frame(out, reply)


if __name__ == "__main__":
    _child_main(sys.argv[1], int(sys.argv[2]))
