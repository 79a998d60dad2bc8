"""Run a :class:`~pipeline.graph.Graph` in local worker processes, without Ray: the default on
one machine (img2dataset's ``multiprocessing`` distributor, for the whole job).

    parent: items -> CPU workers (one per CPU a model worker on CPUs does not take, and one
                     at nice 19 per CPU it takes):
                     read+download+decode+shard+tokenize per shard
                  -> model workers (embed: one per GPU, or one on CPUs)
                  -> CPU workers again: write
                  -> parent: progress, counts

A worker runs whole segments (pipeline.graph.segments) on one shard at a time, calling the
same stage objects Ray Data runs; the parent only routes shards. Between segments a shard's
rows travel as an Arrow IPC file in a spool folder (``/dev/shm`` when it has room): the next
worker maps it without copying, and the parent deletes it once that worker is done with it.

Overlap: a CPU worker is a pipeline of three threads. Its fetch thread runs the
network-bound head of a segment (read + download, ``Stage.io_bound``) for shards ahead; its
offload thread runs the stages whose work is another process's (the isolated decode,
``Stage.offloaded``), one shard at a time, so the decode child goes from one shard to the
next without waiting; its main thread runs the rest (tar, tokenize) and every other segment
(write), taking whichever task is ready first, so a write never waits behind the next
shard's decode. The parent keeps, per CPU worker, one shard per overlapped phase plus
``prefetch`` of such segments, ``1 + prefetch`` of its other segments (a write waiting in a
worker's queue must not stop the next shard's download from starting), and two with each
model worker (one running, one waiting). Shards that finished a segment wait for the next
pool; while more than a few do, no new shard starts, so memory stays flat however long the
input is.

Start-up: workers are forked from a ``forkserver`` that imported this module and the stages
(pyarrow, Pillow, numpy; no torch): a CPU worker starts in milliseconds and never imports
torch (its decode crash-guard child does, for torch's resampling kernels); a model worker
imports it when its stage sets up. Each worker sets its stages up as it starts (the model
loads, the decode child starts) while the first shard is still on its way; a setup that
fails is reported as the first task's error. A forkserver keeps the environment
of the moment it started, so each worker is handed the parent's environment when it starts.

Worker loss: when a worker process dies (SIGKILL, the OOM killer, a crashing decoder with
isolation off), the shard it was working on is charged one attempt (every shard it held, if
it was between shards) and goes back to the queue for a fresh worker; a shard whose worker
died ``item_attempts`` times fails the run naming the shard. An exception raised by a stage
(a bug, or storage failing after its own retries) fails the run at once, naming the shard.
Committed shards and written files are kept either way: rerun to resume.
"""

from __future__ import annotations

import gc
import logging
import math
import multiprocessing as mp
import os
import queue
import shutil
import signal
import tempfile
import threading
import time
import traceback
import uuid
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

import pyarrow as pa

from pipeline import schema as S
from pipeline.graph import Graph, Segment, segments
from pipeline.no_pandas import refuse_pandas
from pipeline.stages.base import Stage, run_stages

log = logging.getLogger("clipcurate.local")

START_METHOD = "forkserver"
# Attempts per shard when the worker process running it dies (execution.attempts).
ITEM_ATTEMPTS = 3
# How long workers may take to finish cleanly after the parent says stop.
_STOP_TIMEOUT_S = 30.0
# /dev/shm is used for the spool only when it has at least this much room.
_MIN_SHM_BYTES = 2 * 1024**3


def _context() -> Any:
    ctx = mp.get_context(START_METHOD)
    if START_METHOD == "forkserver":
        # Imported once in the fork server, so a worker starts without importing anything.
        # Ignored if this process's fork server is already running.
        ctx.set_forkserver_preload([__name__, "pipeline.stages.decode", "pipeline.stages.embed"])
    return ctx


def cpu_count() -> int:
    """CPUs this process may run on (a container's limit, not the host's core count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _spool_root() -> str:
    try:
        st = os.statvfs("/dev/shm")
        if st.f_bavail * st.f_frsize >= _MIN_SHM_BYTES and os.access("/dev/shm", os.W_OK):
            return tempfile.mkdtemp(prefix="clipcurate-spool-", dir="/dev/shm")
    except OSError:
        pass
    return tempfile.mkdtemp(prefix="clipcurate-spool-")


def write_spool(table: pa.Table, path: str) -> None:
    """``table`` as an Arrow IPC file (written under a temporary name, then renamed)."""
    tmp = f"{path}.tmp"
    with pa.OSFile(tmp, "wb") as f, pa.ipc.new_file(f, table.schema) as w:
        w.write_table(table)
    os.replace(tmp, path)


def read_spool(path: str) -> pa.Table:
    """The table of an Arrow IPC file, memory-mapped (no copy)."""
    with pa.memory_map(path, "r") as source:
        return pa.ipc.open_file(source).read_all()


# ------------------------------------------------------------------------------------ worker


@dataclass
class _Task:
    """One shard through one segment: ``payload`` is a descriptor row (first segment of a
    source) or the spool path of the previous segment's output."""

    uid: int
    segment: int
    payload: dict[str, Any] | str
    out_path: str


def _load(task: _Task) -> pa.Table:
    if isinstance(task.payload, str):
        return read_spool(task.payload)
    return pa.Table.from_pylist([task.payload])


def _set_process_name(name: str) -> None:
    """Name this process as ``top`` and ``ps -o comm`` show it (Linux; 15 characters)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        libc.prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):
        pass


def _worker_main(tasks: Connection, results: Connection, segs: dict[int, tuple[Stage, ...]],
                 phases: dict[int, tuple[int, int]], env: dict[str, str], name: str = "clipcurate",
                 nice: int = 0) -> None:
    """Worker process: ``_Task`` in on ``tasks`` (None: stop); per task ``("start", uid)``, then
    ``("done", uid, rows, started, ended)`` or ``("error", uid, text)`` out on ``results``.
    ``segs``: the segments this worker may run; ``phases``: per segment, where its stages run
    ahead of the main thread, as ``(a, b)``: stages ``[:a]`` (network-bound) on the fetch
    thread, ``[a:b]`` (offloaded to another process) on the offload thread, each for the next
    task while the main thread runs ``[b:]`` of the current one. ``nice``: added to the
    process's niceness before anything starts, so its threads and its decode child share it."""
    if nice:
        os.nice(nice)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    _set_process_name(name)
    os.environ.clear()
    os.environ.update(env)
    if not any(s.stateful for stages in segs.values() for s in stages):
        refuse_pandas()  # a CPU worker: pyarrow would import it for nothing (pipeline/no_pandas.py)
    # Tasks as they arrive, and a wake-up each time one's work ahead is done.
    inbox: queue.Queue[tuple[_Task, Future[pa.Table] | None] | str | None] = queue.Queue()
    # One thread each, so tasks pass through every phase in the order they came.
    fetcher = ThreadPoolExecutor(1, thread_name_prefix="clipcurate-fetch")
    offloader = ThreadPoolExecutor(1, thread_name_prefix="clipcurate-offload")

    # When each task's first phase began: its segment's time runs from there, not from when
    # the main thread took it after the fetch and offload threads had done their part.
    began: dict[int, float] = {}

    def head(task: _Task) -> pa.Table:
        began.setdefault(task.uid, time.time())
        return run_stages(list(segs[task.segment][: phases[task.segment][0]]), _load(task))

    def middle(task: _Task, fetched: Future[pa.Table] | None) -> pa.Table:
        a, b = phases[task.segment]
        if fetched is None:
            began.setdefault(task.uid, time.time())
        table = fetched.result() if fetched is not None else _load(task)
        return run_stages(list(segs[task.segment][a:b]), table)

    def receive() -> None:
        while True:
            try:
                task = tasks.recv()
            except (EOFError, OSError):
                task = None
            if task is None:
                inbox.put(None)
                return
            a, b = phases.get(task.segment, (0, 0))
            ahead = fetcher.submit(head, task) if a else None
            if b > a:
                ahead = offloader.submit(middle, task, ahead)
            if ahead is not None:
                ahead.add_done_callback(lambda _f: inbox.put("ready"))
            inbox.put((task, ahead))

    threading.Thread(target=receive, name="clipcurate-receive", daemon=True).start()
    # Set up every stage now (a model worker loads its model, a CPU worker starts its decode
    # child) rather than when the first shard arrives, which on a new job is after that
    # shard's download and decode. A failure is reported as the first task's error.
    setup_error = None
    try:
        for stages in segs.values():
            for s in stages:
                s.setup()
    except Exception:
        setup_error = traceback.format_exc(limit=10)
    frozen = False
    pending: list[tuple[_Task, Future[pa.Table] | None]] = []
    try:
        while True:
            # The first task whose work ahead is done, in arrival order: a write that arrives
            # while the next shard still decodes on the offload thread runs now, not after it.
            pick = next((p for p in pending if p[1] is None or p[1].done()), None)
            if pick is None:
                event = inbox.get()
                if event is None:
                    return
                if not isinstance(event, str):
                    pending.append(event)
                continue
            pending.remove(pick)
            task, ahead = pick
            results.send(("start", task.uid))
            if setup_error is not None:
                results.send(("error", task.uid, setup_error))
                return
            started = began.pop(task.uid, time.time())
            try:
                stages = segs[task.segment]
                if ahead is not None:
                    table = ahead.result()
                    rest = stages[phases[task.segment][1]:]
                else:
                    table = _load(task)
                    rest = stages
                table = run_stages(list(rest), table)
                write_spool(table, task.out_path)
            except Exception:
                results.send(("error", task.uid, traceback.format_exc(limit=10)))
                return
            results.send(("done", task.uid, table.num_rows, started, time.time()))
            if not frozen:
                # After the first task the imports and the stage's own setup (a model, a
                # decode child) are done: keep the collector from walking them on every full
                # collection for the rest of the worker's life.
                gc.freeze()
                frozen = True
    finally:
        fetcher.shutdown(wait=False, cancel_futures=True)
        offloader.shutdown(wait=False, cancel_futures=True)
        for stages in segs.values():
            for s in stages:
                close = getattr(s, "close", None)
                if callable(close):
                    close()
        # Multiprocessing ends a worker with os._exit, which skips atexit: stop the decode
        # child here rather than leave it to notice the closed pipe.
        from pipeline.crashguard import close_shared

        close_shared()


# ------------------------------------------------------------------------------------ parent


@dataclass
class _Worker:
    pool: str
    slot: int  # its place in the pool (a model worker's GPU)
    proc: Any
    tasks: Connection
    results: Connection
    held: list[_Task] = field(default_factory=list)  # sent, not done, in order
    current: int | None = None  # uid of the task it is working on


@dataclass
class _Unit:
    """One shard on its way through its source's segments."""

    uid: int
    name: str  # the shard, for messages
    plan: list[int]  # global segment indices, in order
    step: int = 0
    payload: dict[str, Any] | str = ""
    attempts: Counter[int] = field(default_factory=Counter)


def _death(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            return f"was killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"was killed by signal {-exitcode}"
    return f"exited with status {exitcode}"


class LocalScheduler:
    """Local worker processes: ``processes`` CPU workers (default: one per CPU that no model
    worker running on CPUs takes, see :meth:`cpu_workers`), ``idle_workers`` more at the
    lowest priority (see :meth:`idle_cpu_workers`), model workers sized from the stage
    (``concurrency``) or the machine (one per GPU, else one)."""

    name = "local"
    IDLE_NICE = 19

    def __init__(self, processes: int | None = None, prefetch: int = 1, item_attempts: int = ITEM_ATTEMPTS,
                 idle_workers: int | None = None) -> None:
        if processes is not None and processes < 1:
            raise ValueError(f"processes must be >= 1, got {processes}")
        if prefetch < 0:
            raise ValueError(f"prefetch must be >= 0, got {prefetch}")
        if item_attempts < 1:
            raise ValueError(f"item_attempts must be >= 1, got {item_attempts}")
        if idle_workers is not None and idle_workers < 0:
            raise ValueError(f"idle_workers must be >= 0, got {idle_workers}")
        self.processes = processes
        self.prefetch = prefetch
        self.item_attempts = item_attempts
        self.idle_workers = idle_workers

    def gpus(self) -> int:
        """CUDA devices this machine has (0 without torch or CUDA)."""
        try:
            import torch
        except ImportError:
            return 0
        return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0

    def pool_size(self, seg: Segment) -> int:
        """Model workers for a stateful segment: its declared maximum, else as many as the
        GPUs hold at ``num_gpus`` each (GPU stages; each worker sees only its own devices
        through ``CUDA_VISIBLE_DEVICES``) or one (CPU stages: the other cores decode)."""
        c = seg.concurrency
        if c is not None:
            return c[1] if isinstance(c, tuple) else c
        if seg.resources.num_gpus > 0:
            return max(1, int(self.gpus() // seg.resources.num_gpus))
        return 1

    def _model_cpus(self, segs: list[Segment]) -> int:
        """CPUs the model workers that run on CPUs take: ``num_cpus`` each (rounded up), as
        Ray Data would reserve for them. Model workers on GPUs take none."""
        gpus = None
        taken = 0
        for seg in segs:
            if not seg.stateful:
                continue
            if seg.resources.num_gpus > 0:
                gpus = self.gpus() if gpus is None else gpus
                if gpus > 0:
                    continue
            taken += self.pool_size(seg) * max(1, math.ceil(seg.resources.num_cpus))
        return taken

    def cpu_workers(self, segs: list[Segment]) -> int:
        """CPU worker processes at normal priority for a graph's segments: ``processes`` when
        given, else the CPUs left after the model workers that run on CPUs take theirs, at
        least one.

        A normal-priority CPU worker for each core beside a model worker on CPUs
        oversubscribes the machine: on 2 cores, two CPU workers beside the model worker cost
        11.0-13.6 ms of CPU per image against 9.0-10.2 with one (bench/RESULTS.md, 2026-12-07,
        "where the steady state goes"): three busy processes on two cores. Model workers on
        GPUs mostly wait for the device and take no CPU from the pool."""
        if self.processes is not None:
            return self.processes
        return max(1, cpu_count() - self._model_cpus(segs))

    def idle_cpu_workers(self, segs: list[Segment]) -> int:
        """CPU workers at the lowest priority (nice 19): ``idle_workers`` when given, else one
        per CPU the model workers on CPUs take, unless ``processes`` was given (then none).

        A model worker on CPUs does not use its CPUs all the time (the bundled model: about
        a fifth of one core at the job's pace on 2 cores), and the one serial process of a CPU
        worker (its decode child) bounds the job. At nice 19 the extra worker runs on CPU time
        nobody at normal priority wants (a core busy at normal priority gives it about 1.5 %),
        so it barely slows the model worker or the other CPU workers: on 2 cores, +50 % rows/s
        for +9 % CPU per image, where a second normal-priority worker cost +20-35 %
        (bench/RESULTS.md, 2026-12-07, "a CPU worker at the lowest priority")."""
        if self.idle_workers is not None:
            return self.idle_workers
        if self.processes is not None:
            return 0
        return self._model_cpus(segs)

    def run(self, graph: Graph, items: dict[str, list[dict[str, Any]]],
            on_batch: Callable[[pa.Table], None]) -> dict[str, dict[str, Any]]:
        """Stream every item (a descriptor row per shard, by source) through the graph;
        ``on_batch`` gets each shard's final output. Returns per segment ``{"rows": rows out,
        "seconds": wall time from its first task's first stage starting (on a worker's fetch
        or offload thread) to its last task's end}``, as the Ray Data scheduler reports."""
        return _Run(self, graph, items, on_batch).run()


class _Run:
    def __init__(self, sched: LocalScheduler, graph: Graph, items: dict[str, list[dict[str, Any]]],
                 on_batch: Callable[[pa.Table], None]) -> None:
        self.sched = sched
        self.on_batch = on_batch
        self.ctx = _context()
        # Global segment table: every source's own segments, then the shared tail.
        self.segs: list[Segment] = []
        tail = segments(graph.tail)
        tail_ids = list(range(len(tail)))
        self.segs.extend(tail)
        self.units: deque[_Unit] = deque()
        uid = 0
        plans: list[list[int]] = [tail_ids]
        for source, stages in graph.sources.items():
            rows = items.get(source) or []
            if not rows:
                continue
            first = len(self.segs)
            own = segments(stages)
            self.segs.extend(own)
            plan = list(range(first, first + len(own))) + tail_ids
            plans.append(plan)
            for row in rows:
                name = S.shard_name(int(row["shard_id"])) if "shard_id" in row else str(uid)
                self.units.append(_Unit(uid, name, plan, payload=row))
                uid += 1
        self.total = uid
        self.by_uid: dict[int, _Unit] = {u.uid: u for u in self.units}
        # Pools: "cpu" runs every non-stateful segment; each stateful segment has its own.
        self.pool_of: dict[int, str] = {}
        self.pool_sizes: dict[str, int] = {}
        self.normal_cpu = 0
        for i, seg in enumerate(self.segs):
            if seg.stateful:
                name = f"model{i}"
                self.pool_of[i] = name
                self.pool_sizes[name] = sched.pool_size(seg)
            else:
                self.pool_of[i] = "cpu"
        if any(p == "cpu" for p in self.pool_of.values()):
            # Normal-priority workers take slots 0..normal-1 (and, as the parent offers tasks
            # to workers in slot order, tasks first); the rest run at the lowest priority.
            self.normal_cpu = sched.cpu_workers(self.segs)
            self.pool_sizes["cpu"] = min(self.normal_cpu + sched.idle_cpu_workers(self.segs), max(1, self.total))
        # A CPU worker holds, of a segment it runs in phases (fetch thread, offload thread,
        # main thread), one shard per phase after the first plus ``prefetch`` (shards whose
        # download runs ahead), and up to ``1 + prefetch`` of the others (write): counted
        # together, a queued write took the place of the next shard's download, which the
        # worker then waited for every second shard (bench/RESULTS.md, "Local scheduler: the
        # next shard's download", 2026-12-06).
        self.phases = {i: (seg.io_bound_prefix, seg.offloaded_end) for i, seg in enumerate(self.segs)}
        self.ahead = {i for i, (a, b) in self.phases.items() if b > 0}
        overlapped = max([(a > 0) + (b > a) for a, b in self.phases.values()] + [1])
        self.ahead_cap = overlapped + sched.prefetch
        self.capacity = {p: (self.ahead_cap + 1 + sched.prefetch if p == "cpu" else 2) for p in self.pool_sizes}
        # How far along a plan each segment sits: deeper segments are served first.
        self.depth = {seg: max(p.index(seg) for p in plans if seg in p) for seg in range(len(self.segs))}
        self.ready: dict[int, deque[_Task]] = {i: deque() for i in range(len(self.segs))}
        self.workers: list[_Worker] = []
        self.spool = _spool_root()
        self.done = 0
        self.stats: dict[str, dict[str, Any]] = {}
        # Shards past their first segment, not finished: bounded so memory stays flat.
        self.in_flight = 0
        self.max_in_flight = sum(n * self.capacity[p] for p, n in self.pool_sizes.items()) + 2

    # -- workers -------------------------------------------------------------------------

    def _start(self, pool: str, slot: int) -> _Worker:
        segs = {i: self.segs[i].stages for i, p in self.pool_of.items() if p == pool}
        phases = {i: self.phases[i] if pool == "cpu" else (0, 0) for i in segs}
        nice = LocalScheduler.IDLE_NICE if pool == "cpu" and slot >= self.normal_cpu else 0
        env = dict(os.environ)
        gpus_each = max((self.segs[i].resources.num_gpus for i in segs), default=0.0)
        if gpus_each > 0:
            # Each model worker sees only its own device(s), as Ray does for a GPU actor.
            n = max(1, int(gpus_each)) if gpus_each >= 1 else 1
            per_device = max(1, int(1 / gpus_each)) if gpus_each < 1 else 1
            first = (slot // per_device) * n
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(first + k) for k in range(n))
        task_r, task_w = self.ctx.Pipe(duplex=False)
        result_r, result_w = self.ctx.Pipe(duplex=False)
        proc = self.ctx.Process(
            target=_worker_main,
            args=(task_r, result_w, segs, phases, env, f"cc-{pool}-idle" if nice else f"cc-{pool}", nice),
            name=f"clipcurate-{pool}-worker",
            daemon=True,
        )
        proc.start()
        # The parent keeps only its own ends, so a dead worker shows as EOF on `results`.
        task_r.close()
        result_w.close()
        return _Worker(pool, slot, proc, task_w, result_r)

    def run(self) -> dict[str, dict[str, Any]]:
        if self.total == 0:
            return {}
        try:
            return self._run()
        finally:
            shutil.rmtree(self.spool, ignore_errors=True)

    def _run(self) -> dict[str, dict[str, Any]]:
        try:
            for pool, n in self.pool_sizes.items():
                self.workers += [self._start(pool, slot) for slot in range(n)]
            while self.done < self.total:
                self._feed()
                self._assign()
                conns = [w.results for w in self.workers] + [w.proc.sentinel for w in self.workers]
                ready = set(wait(conns))
                for w in list(self.workers):
                    if w.results in ready or w.proc.sentinel in ready:
                        self._service(w)
        finally:
            self._stop()
        return {name: {"rows": st["rows"], "seconds": st["seconds"]} for name, st in self.stats.items()}

    def _feed(self) -> None:
        """Start new shards while few are between segments."""
        while self.units and self.in_flight < self.max_in_flight:
            unit = self.units.popleft()
            self.in_flight += 1
            self._enqueue(unit)

    def _enqueue(self, unit: _Unit) -> None:
        seg = unit.plan[unit.step]
        out = os.path.join(self.spool, f"{unit.uid}-{unit.step}-{uuid.uuid4().hex[:6]}.arrow")
        self.ready[seg].append(_Task(unit.uid, seg, unit.payload, out))

    def _assign(self) -> None:
        # Later segments first: finishing shards frees memory before new ones start.
        for seg in sorted(self.ready, key=lambda i: -self.depth[i]):
            q = self.ready[seg]
            pool = self.pool_of[seg]
            for w in self.workers:
                if not q:
                    break
                while q and w.pool == pool and self._room(w, seg):
                    task = q.popleft()
                    w.held.append(task)
                    try:
                        w.tasks.send(task)
                    except OSError:  # it just died: its sentinel says so next, and it is requeued then
                        break

    def _room(self, w: _Worker, seg: int) -> bool:
        """Whether ``w`` may take one more task of segment ``seg`` (see ``capacity``)."""
        if w.pool != "cpu":
            return len(w.held) < self.capacity[w.pool]
        ahead = seg in self.ahead
        same = sum(1 for t in w.held if (t.segment in self.ahead) == ahead)
        return same < (self.ahead_cap if ahead else 1 + self.sched.prefetch)

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
        w.proc.join(10)
        if w.proc.is_alive():
            w.proc.kill()
            w.proc.join()
        self._replace(w)

    def _handle(self, w: _Worker, msg: tuple[Any, ...]) -> None:
        kind, uid = msg[0], msg[1]
        unit = self.by_uid[uid]
        if kind == "start":
            w.current = uid
            return
        task = next(t for t in w.held if t.uid == uid)
        if kind == "error":
            last = msg[2].strip().splitlines()[-1] if msg[2].strip() else "unknown error"
            raise RuntimeError(
                f"shard {unit.name} failed in {self.segs[task.segment].name} (worker pid {w.proc.pid}): "
                f"{last}\n{msg[2]}committed shards are kept, rerun to resume"
            )
        # done
        w.held.remove(task)
        w.current = None
        _, _, rows, started, ended = msg
        st = self.stats.setdefault(self.segs[task.segment].name, {"rows": 0, "first": started, "last": ended})
        st["rows"] += rows
        st["first"], st["last"] = min(st["first"], started), max(st["last"], ended)
        st["seconds"] = st["last"] - st["first"]
        if isinstance(unit.payload, str):
            _unlink(unit.payload)
        unit.payload = task.out_path
        unit.step += 1
        if unit.step < len(unit.plan):
            self._enqueue(unit)
            return
        table = read_spool(unit.payload)
        _unlink(unit.payload)
        self.done += 1
        self.in_flight -= 1
        self.on_batch(table)

    def _replace(self, w: _Worker) -> None:
        how = _death(w.proc.exitcode)
        blamed = [t for t in w.held if t.uid == w.current] or list(w.held)
        for t in blamed:
            self.by_uid[t.uid].attempts[t.segment] += 1
        failed = [t for t in blamed if self.by_uid[t.uid].attempts[t.segment] >= self.sched.item_attempts]
        if failed:
            t = failed[0]
            raise RuntimeError(
                f"shard {self.by_uid[t.uid].name}: its {w.pool} worker process {how} in "
                f"{self.segs[t.segment].name} on each of {self.by_uid[t.uid].attempts[t.segment]} "
                "attempt(s); committed shards are kept, rerun to resume"
            )
        log.warning(
            "%s worker pid %d %s holding shard(s) %s; retrying them in a new worker",
            w.pool, w.proc.pid, how, ", ".join(self.by_uid[t.uid].name for t in w.held),
        )  # fmt: skip
        for t in reversed(w.held):
            _unlink(t.out_path)
            self.ready[t.segment].appendleft(t)
        w.tasks.close()
        w.results.close()
        self.workers[self.workers.index(w)] = self._start(w.pool, w.slot)

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


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


__all__ = ["ITEM_ATTEMPTS", "START_METHOD", "LocalScheduler", "cpu_count", "read_spool", "write_spool"]
