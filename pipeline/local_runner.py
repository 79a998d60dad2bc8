"""Run the download half without Ray: local worker processes, one shard per task (img2dataset's
``multiprocessing`` distributor). ``pipeline.runner.run_download`` is the Ray distributor.

    parent:  plan shards (runner.plan_download) -> hand descriptors to N workers
             -> runner.finish_download (checks every shard is committed, writes _stats.json)
    worker:  ReadStage -> DownloadStage -> DecodeStage -> ShardStage, each ``process_batch`` on
             one whole shard; ``setup()`` once per stage per worker

The stage objects are the ones the Ray graph runs (``runner.build_stages``), so the shards,
manifests and statuses are the same; resume works the same way (committed shards are skipped
before any worker starts).

Overlap: a worker reads and downloads its next shard on a background thread (the download
stage's own threads mostly wait on the network) while it decodes and writes the current one,
so the parent keeps ``1 + prefetch`` shards assigned to each worker. With decode isolation on
(the default) the decoding happens in the worker's crash-guard child process.

Start-up: workers are forked from a ``forkserver`` process that imported this module (and so
pyarrow, Pillow and the stages) once; nothing imported here imports ray or torch. A forkserver
keeps the environment of the moment it started, so each worker is handed the parent's
environment (S3 endpoint and credentials, test hooks) when it starts.

Worker loss: the parent watches each worker's process. When one dies (SIGKILL, the OOM
killer, a crashing decoder with isolation off), the shard it was decoding and writing is
charged one attempt (or, if it was between shards, every shard it held) and all its shards go
back to the queue for a fresh worker. A shard whose worker died ``shard_attempts`` times fails
the run with a ``RuntimeError`` naming the shard. An exception raised by a stage (a bug, or
storage failing after its own retries) fails the run at once, naming the shard, as Ray does
(it does not retry exceptions). Committed shards are kept either way: rerun to resume.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import queue
import signal
import threading
import time
import traceback
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

import pyarrow as pa

from pipeline import schema as S
from pipeline.config import ConfigError, DownloadJobConfig
from pipeline.kill_hook import maybe_kill_self
from pipeline.runner import DownloadSummary, build_stages, finish_download, plan_download
from pipeline.stages.base import Stage
from pipeline.stages.download import DownloadStage
from pipeline.stages.read import ShardDescriptor

log = logging.getLogger("clipcurate.local_runner")

START_METHOD = "forkserver"
# Attempts per shard when its worker process dies on it (Ray's path: 1 + TASK_MAX_RETRIES).
SHARD_ATTEMPTS = 3
# How long a worker may take to finish its last shard's cleanup after the parent says stop.
_STOP_TIMEOUT_S = 30.0


def _context() -> Any:
    ctx = mp.get_context(START_METHOD)
    if START_METHOD == "forkserver":
        # Imported once in the fork server, so a worker starts without importing anything.
        # Ignored if this process's fork server is already running.
        ctx.set_forkserver_preload(["__main__", __name__])
    return ctx


# ------------------------------------------------------------------------------------ worker


def _staged(stage: Stage, table: pa.Table) -> pa.Table:
    out = stage.process_batch(table)
    maybe_kill_self(type(stage).__name__)  # the test-only fault hook (pipeline/kill_hook.py)
    return out


def _worker_main(tasks: Connection, results: Connection, stages: list[Stage], env: dict[str, str]) -> None:
    """Worker process: descriptors in on ``tasks`` (None: stop), per shard ``("start", id)``
    then ``("done", id, {status: rows})`` or ``("error", id, text)`` out on ``results``
    (``("error", None, text)``: a stage's ``setup()`` failed)."""
    # The parent decides when to stop; a Ctrl-C in the terminal reaches it too.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ.clear()
    os.environ.update(env)
    read, download, *rest = stages
    try:
        for stage in stages:
            stage.setup()
    except Exception:
        results.send(("error", None, traceback.format_exc(limit=8)))
        return
    inbox: queue.Queue[tuple[ShardDescriptor, Future[pa.Table]] | None] = queue.Queue()
    # One shard at a time in the background: the download stage runs its own thread pool.
    fetcher = ThreadPoolExecutor(1, thread_name_prefix="clipcurate-fetch-shard")

    def fetch(desc: ShardDescriptor) -> pa.Table:
        rows = _staged(read, pa.Table.from_pylist([desc.as_row()]))
        return _staged(download, rows)

    def receive() -> None:
        while True:
            try:
                desc = tasks.recv()
            except (EOFError, OSError):
                desc = None
            if desc is None:
                inbox.put(None)
                return
            inbox.put((desc, fetcher.submit(fetch, desc)))

    threading.Thread(target=receive, name="clipcurate-receive", daemon=True).start()
    try:
        while (item := inbox.get()) is not None:
            desc, pending = item
            results.send(("start", desc.shard_id))
            try:
                table = pending.result()
                for stage in rest:
                    table = _staged(stage, table)
                pending_parts = [s.pending_shards for s in rest if hasattr(s, "pending_shards")]
                if any(pending_parts) or table.num_rows != desc.length:
                    raise RuntimeError(
                        f"shard stage returned {table.num_rows} of {desc.length} rows "
                        f"(parts pending: {pending_parts})"
                    )
            except Exception:
                results.send(("error", desc.shard_id, traceback.format_exc(limit=8)))
                return
            counts = Counter(table.column(S.STATUS).to_pylist())
            results.send(("done", desc.shard_id, dict(counts)))
    finally:
        fetcher.shutdown(wait=False, cancel_futures=True)
        if isinstance(download, DownloadStage):
            download.close()
        # Multiprocessing ends a worker with os._exit, which skips atexit: stop the decode
        # child here rather than leave it to notice the closed pipe.
        from pipeline.crashguard import close_shared

        close_shared()


# ------------------------------------------------------------------------------------ parent


@dataclass
class _Worker:
    proc: Any
    tasks: Connection
    results: Connection
    held: list[ShardDescriptor] = field(default_factory=list)  # sent, not done, in order
    current: int | None = None  # shard id past its download, being decoded and written


def _death(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            return f"was killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"was killed by signal {-exitcode}"
    return f"exited with status {exitcode}"


class _Pool:
    def __init__(self, stages: list[Stage], processes: int, prefetch: int, shard_attempts: int) -> None:
        self.ctx = _context()
        self.stages = stages
        self.processes = processes
        self.per_worker = 1 + prefetch
        self.shard_attempts = shard_attempts
        self.workers: list[_Worker] = []
        self.queue: deque[ShardDescriptor] = deque()
        self.attempts: Counter[int] = Counter()
        self.status: Counter[str] = Counter()
        self.done = 0

    def _start(self) -> _Worker:
        task_r, task_w = self.ctx.Pipe(duplex=False)
        result_r, result_w = self.ctx.Pipe(duplex=False)
        proc = self.ctx.Process(
            target=_worker_main,
            args=(task_r, result_w, self.stages, dict(os.environ)),
            name="clipcurate-download-worker",
            daemon=True,
        )
        proc.start()
        # The parent keeps only its own ends, so a dead worker shows as EOF on `results`.
        task_r.close()
        result_w.close()
        return _Worker(proc, task_w, result_r)

    def run(self, todo: list[ShardDescriptor]) -> Counter[str]:
        self.queue.extend(todo)
        total = len(todo)
        try:
            self.workers = [self._start() for _ in range(min(self.processes, total))]
            while self.done < total:
                self._assign()
                ready = set(wait([w.results for w in self.workers] + [w.proc.sentinel for w in self.workers]))
                for w in list(self.workers):
                    if w.results in ready or w.proc.sentinel in ready:
                        self._service(w)
        finally:
            self._stop()
        return self.status

    def _assign(self) -> None:
        for w in self.workers:
            while self.queue and len(w.held) < self.per_worker:
                desc = self.queue.popleft()
                w.held.append(desc)
                try:
                    w.tasks.send(desc)
                except OSError:  # it just died: its sentinel says so next, and it is requeued then
                    break

    def _service(self, w: _Worker) -> None:
        """Read every message the worker sent; replace it if it died."""
        closed = False
        try:
            while w.results.poll():
                self._handle(w, w.results.recv())
        except (EOFError, OSError):
            closed = True
        if not closed and w.proc.is_alive():
            return
        # Its end of the pipe closes as it exits; give it a moment to be reaped.
        w.proc.join(10)
        if w.proc.is_alive():
            w.proc.kill()
            w.proc.join()
        self._replace(w)

    def _handle(self, w: _Worker, msg: tuple[Any, ...]) -> None:
        kind, shard_id = msg[0], msg[1]
        if shard_id is None:
            raise RuntimeError(f"download worker pid {w.proc.pid} failed to set up its stages:\n{msg[2]}")
        name = S.shard_name(shard_id)
        if kind == "start":
            w.current = shard_id
        elif kind == "done":
            w.held = [d for d in w.held if d.shard_id != shard_id]
            w.current = None
            self.status.update(msg[2])
            self.done += 1
            detail = ", ".join(f"{k} {v}" for k, v in sorted(msg[2].items()))
            log.info("shard %s written (%s); %d shards done this run", name, detail, self.done)
        elif kind == "error":
            # The worker's exception arrives as traceback text; its last line (type: message)
            # goes first, so a one-line report names what broke.
            last = msg[2].strip().splitlines()[-1] if msg[2].strip() else "unknown error"
            raise RuntimeError(
                f"shard {name} failed in download worker pid {w.proc.pid}: {last}\n{msg[2]}"
                "committed shards are kept, rerun to resume"
            )

    def _replace(self, w: _Worker) -> None:
        how = _death(w.proc.exitcode)
        blamed = [d for d in w.held if d.shard_id == w.current] or list(w.held)
        for d in blamed:
            self.attempts[d.shard_id] += 1
        failed = [d for d in blamed if self.attempts[d.shard_id] >= self.shard_attempts]
        if failed:
            names = ", ".join(S.shard_name(d.shard_id) for d in failed)
            raise RuntimeError(
                f"shard {names}: its download worker process {how} on each of "
                f"{self.attempts[failed[0].shard_id]} attempt(s); committed shards are kept, rerun to resume"
            )
        log.warning(
            "download worker pid %d %s holding shard(s) %s; retrying them in a new worker",
            w.proc.pid, how, ", ".join(S.shard_name(d.shard_id) for d in w.held),
        )  # fmt: skip
        self.queue.extendleft(reversed(w.held))
        w.tasks.close()
        w.results.close()
        self.workers[self.workers.index(w)] = self._start()

    def _stop(self) -> None:
        for w in self.workers:
            try:
                w.tasks.send(None)
            except OSError:
                pass
        deadline = time.monotonic() + _STOP_TIMEOUT_S
        for w in self.workers:
            # A worker still busy (the run failed elsewhere) is not waited for.
            w.proc.join(max(0.0, deadline - time.monotonic()) if not w.held else 0.1)
            if w.proc.is_alive():
                w.proc.terminate()
                w.proc.join(5)
            if w.proc.is_alive():
                w.proc.kill()
                w.proc.join()
            w.tasks.close()
            w.results.close()


def _cpus() -> int:
    """CPUs this process may run on (a container's limit, not the host's core count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def run_download_local(
    cfg: DownloadJobConfig,
    processes: int | None = None,
    decode_isolation: bool = True,
    prefetch: int = 1,
    shard_attempts: int = SHARD_ATTEMPTS,
) -> DownloadSummary:
    """Run the download half in ``processes`` local worker processes (default: one per CPU),
    without Ray; same output, resume and ``_stats.json`` as :func:`pipeline.runner.run_download`.

    ``prefetch``: shards each worker downloads ahead of the one it decodes (0: none).
    ``shard_attempts``: how many times a shard may lose its worker process before the run
    fails. Raises ``ConfigError`` naming the field for a bad ``cfg`` or argument, and
    ``RuntimeError`` naming the shard when a shard cannot be completed.
    """
    if processes is None:
        processes = _cpus()
    if processes < 1:
        raise ConfigError(f"execution.processes_count: must be >= 1, got {processes}")
    if prefetch < 0:
        raise ConfigError(f"execution.prefetch: must be >= 0, got {prefetch}")
    if shard_attempts < 1:
        raise ConfigError(f"execution.shard_attempts: must be >= 1, got {shard_attempts}")
    plan = plan_download(cfg)
    status: Counter[str] = Counter()
    if plan.todo:
        stages = [plan.read_stage(cfg), *build_stages(cfg, decode_isolation=decode_isolation)]
        status = _Pool(stages, processes, prefetch, shard_attempts).run(plan.todo)
        per_stage: Counter[str] = Counter()
        for k, v in status.items():
            per_stage[S.stage_of(k)] += v
        log.info("rows this run by stage outcome: %s", dict(per_stage))
    return finish_download(plan, status)


__all__ = ["SHARD_ATTEMPTS", "START_METHOD", "run_download_local"]
