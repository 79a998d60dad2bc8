"""Tiny stages for testing the schedulers' mechanics without images or models: a source
that expands shard descriptors into rows, and a stateful stage that records where and how it
was called (its process, the GPUs Ray gave it, the rows per call)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import ClassVar

import pyarrow as pa

from pipeline import schema as S
from pipeline.stages.base import Resources, Stage


@dataclass
class MakeRows(Stage):
    """``{shard_id, length}`` descriptors -> ``length`` rows each (key, shard, _shard_rows).
    A descriptor with ``release_at`` (epoch seconds) is held until then: a test paces its
    source that way."""

    expands: ClassVar[bool] = True

    def process_batch(self, batch: pa.Table) -> pa.Table:
        keys, shards, totals = [], [], []
        for row in batch.to_pylist():
            wait = float(row.get("release_at") or 0.0) - time.time()
            if wait > 0:
                time.sleep(wait)
            n = int(row["length"])
            name = S.shard_name(int(row["shard_id"]))
            keys += [f"{name}{i:04d}" for i in range(n)]
            shards += [name] * n
            totals += [n] * n
        return pa.table({S.KEY: keys, S.SHARD: shards, S.SHARD_ROWS: pa.array(totals, pa.int64())})


@dataclass
class Probe(Stage):
    """Stateful: adds ``probe_pid``, ``probe_gpus`` (``ray.get_gpu_ids()`` under Ray, else
    ``CUDA_VISIBLE_DEVICES``), ``probe_rows`` (rows in the call) and ``probe_set_up_at``
    (epoch seconds its ``setup`` finished). ``busy_s``: seconds each call takes."""

    stateful: ClassVar[bool] = True
    resources: Resources = field(default_factory=lambda: Resources(num_cpus=0.5))
    busy_s: float = 0.0
    # ``setup`` takes ``setup_s`` seconds (a model loading), or raises with ``setup_error``.
    setup_s: float = 0.0
    setup_error: str = ""

    def setup(self) -> None:
        if getattr(self, "_set_up_at", None) is not None:
            return
        if self.setup_error:
            raise ValueError(self.setup_error)
        time.sleep(self.setup_s)
        self._set_up_at = time.time()

    def process_batch(self, batch: pa.Table) -> pa.Table:
        if self.busy_s:
            time.sleep(self.busy_s)
        try:
            import ray

            gpus = ",".join(str(g) for g in ray.get_gpu_ids()) if ray.is_initialized() else None
        except ImportError:
            gpus = None
        if gpus is None:
            gpus = os.environ.get("CUDA_VISIBLE_DEVICES", "")
        n = batch.num_rows
        out = batch.append_column("probe_pid", pa.array([os.getpid()] * n, pa.int64()))
        out = out.append_column("probe_gpus", pa.array([gpus] * n, pa.string()))
        out = out.append_column("probe_set_up_at", pa.array([getattr(self, "_set_up_at", None)] * n, pa.float64()))
        return out.append_column("probe_rows", pa.array([n] * n, pa.int64()))


@dataclass
class Stamp(Stage):
    """Sleeps ``busy_s``, then adds ``column``: the epoch seconds the call started
    (``at="start"``) or ended (``"end"``).

    Markers force an order between shards instead of timing it, so a test of the scheduler's
    order holds however loaded the machine is. With ``marker_dir``, the stamp also creates
    ``<marker_dir>/<column>.<shard>`` as it is taken, visible to every process. With
    ``await_column``, each call first waits (``timeout_s`` at most) for the marker of that
    column of the shard ``await_offset`` away (-1: the one before, 1: the one after; none is
    awaited past shard 0 or ``last_shard``) and adds ``<column>_awaited``: whether it came.
    A scheduler that makes that marker wait behind this call shows as ``False``."""

    column: str = "stamp"
    busy_s: float = 0.0
    at: str = "end"
    marker_dir: str = ""
    await_column: str = ""
    await_offset: int = -1
    last_shard: int = -1
    timeout_s: float = 30.0

    def process_batch(self, batch: pa.Table) -> pa.Table:
        shards = sorted(set(batch.column(S.SHARD).to_pylist())) if S.SHARD in batch.column_names else []
        came = self._await(shards) if self.await_column else None
        started = time.time()
        if self.at == "start":
            self._mark(shards)
        if self.busy_s:
            time.sleep(self.busy_s)
        when = started if self.at == "start" else time.time()
        out = batch.append_column(self.column, pa.array([when] * batch.num_rows, pa.float64()))
        if self.at != "start":
            self._mark(shards)
        if came is not None:
            out = out.append_column(f"{self.column}_awaited", pa.array([came] * batch.num_rows, pa.bool_()))
        return out

    def _mark(self, shards: list[str]) -> None:
        if self.marker_dir:
            for shard in shards:
                open(os.path.join(self.marker_dir, f"{self.column}.{shard}"), "w").close()

    def _await(self, shards: list[str]) -> bool:
        deadline = time.monotonic() + self.timeout_s
        for shard in shards:
            other = int(shard) + self.await_offset
            if other < 0 or (self.last_shard >= 0 and other > self.last_shard):
                continue
            marker = os.path.join(self.marker_dir, f"{self.await_column}.{S.shard_name(other)}")
            while not os.path.exists(marker):
                if time.monotonic() >= deadline:
                    return False
                time.sleep(0.01)
        return True


@dataclass
class NetworkRows(MakeRows):
    """A :class:`MakeRows` that waits on the network, as the job's read stage does."""

    io_bound: ClassVar[bool] = True


@dataclass
class NetworkStamp(Stamp):
    """A :class:`Stamp` that waits on the network: a local CPU worker runs it ahead, on its
    fetch thread, for the next shard."""

    io_bound: ClassVar[bool] = True


@dataclass
class OffloadedStamp(Stamp):
    """A :class:`Stamp` whose work, as the isolated decode stage's, runs in another process:
    a local CPU worker runs it on its offload thread, for the next shard."""

    @property
    def offloaded(self) -> bool:
        return True


@dataclass
class Niceness(Stage):
    """Adds ``nice`` (the niceness of the thread that runs the call, from
    ``/proc/thread-self/stat``) and ``nice_pid`` (its process)."""

    def process_batch(self, batch: pa.Table) -> pa.Table:
        with open("/proc/thread-self/stat") as f:
            nice = int(f.read().rsplit(")", 1)[1].split()[16])
        n = batch.num_rows
        out = batch.append_column("nice", pa.array([nice] * n, pa.int64()))
        return out.append_column("nice_pid", pa.array([os.getpid()] * n, pa.int64()))


def pandas_state() -> str:
    """After converting Python values to Arrow and Arrow to numpy (which makes pyarrow import
    pandas where it may): "loaded", "refused" (``import pandas`` fails) or "absent"."""
    import importlib
    import sys

    pa.Table.from_pylist([{"a": 1}]).column("a").to_numpy()
    if "pandas" in sys.modules:
        return "loaded"
    try:
        importlib.import_module("pandas")
    except ImportError:
        return "refused"
    return "absent"  # importable, but nothing loaded it: not what this probe expects


def pandas_state_item(_item: object) -> str:
    """:func:`pandas_state` as a crash-guard work function."""
    return pandas_state()


@dataclass
class PandasProbe(Stage):
    """Adds ``pandas``: :func:`pandas_state` in the process that runs the call."""

    def process_batch(self, batch: pa.Table) -> pa.Table:
        return batch.append_column("pandas", pa.array([pandas_state()] * batch.num_rows, pa.string()))


@dataclass
class ModelPandasProbe(Stage):
    """A stateful (model worker's) stage adding ``model_pandas``: :func:`pandas_state`."""

    stateful: ClassVar[bool] = True
    resources: Resources = field(default_factory=lambda: Resources(num_cpus=0.5))

    def process_batch(self, batch: pa.Table) -> pa.Table:
        return batch.append_column("model_pandas", pa.array([pandas_state()] * batch.num_rows, pa.string()))
