"""The stage contract every pipeline stage follows (DESIGN.md, "The stage contract").

A stage is a plain object: tests call ``setup()`` and ``process_batch()`` directly, and the
schedulers (pipeline/schedulers/) run the stage list of pipeline/graph.py without knowing
which stages they run. What a scheduler needs to know, a stage declares on itself:

- ``resources``: CPUs and GPUs one process running the stage uses while it works;
- ``batch_size``: rows per ``process_batch`` call (None: one whole shard per call, which is
  how every stage of the job is fed);
- ``concurrency``: how many processes may run it at once (None: as many as resources allow;
  ``(min, max)``: a pool of long-lived workers that grows from min to max);
- ``stateful``: it holds something expensive across batches (a model): it runs in long-lived
  workers of its own (Ray actors, a local process pool), never fused with other stages;
- ``long_lived``: it is called every few seconds, each call short: on Ray Data it runs in a
  pool of long-lived actors instead of tasks. Ray kills a task worker that idles for a second
  while the node's CPUs are all taken (its idle-worker limit follows the CPUs left free), so
  behind a saturated stream such a stage would pay a new worker's start-up (~2 CPU-seconds)
  on most calls. The local scheduler's workers live for the whole job anyway;
- ``io_bound``: it mostly waits on the network: a local worker overlaps it with the CPU-bound
  stages of the previous item instead of idling the core;
- ``offloaded`` (a property: it may depend on the stage's settings): its work runs in
  another process (the decode stage's crash-guard child), so the thread that calls it only
  waits: a local worker runs it for the next item on a thread of its own while it computes
  the rest of the current one, so that process never waits for the worker's own bookkeeping;
- ``expands``: it turns shard descriptors into the shards' rows (a source's first stage), the
  only stages whose output row count differs from their input's.

Consecutive stages that are not stateful run together, in one task per item (Ray Data) or in
one worker process per item (local processes), so a shard is downloaded, decoded and written
without its bytes ever leaving the process.

``setup()`` may be called many times per process (once per stage object a worker receives):
anything costly it builds is cached per process with :func:`per_process`.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import pyarrow as pa

T = TypeVar("T")


@dataclass(frozen=True)
class Resources:
    """Resources one process running a stage asks for."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0

    def __post_init__(self) -> None:
        if self.num_cpus < 0:
            raise ValueError(f"Resources.num_cpus must be >= 0, got {self.num_cpus}")
        if self.num_gpus < 0:
            raise ValueError(f"Resources.num_gpus must be >= 0, got {self.num_gpus}")


@dataclass
class Stage(ABC):
    """One step of the streaming graph.

    ``process_batch`` receives and returns a pyarrow Table with one output row per input row.
    It never raises because of a bad row: the row's ``status``/``error`` columns record why it
    failed and the row flows on. An exception escaping ``process_batch`` is a bug in the stage
    (or storage failing after its retries) and fails the item.
    """

    resources: Resources = field(default_factory=Resources)
    batch_size: int | None = None
    concurrency: int | tuple[int, int] | None = None

    stateful: ClassVar[bool] = False
    long_lived: ClassVar[bool] = False
    io_bound: ClassVar[bool] = False
    expands: ClassVar[bool] = False

    def setup(self) -> None:  # noqa: B027 - optional hook, empty by design
        """Prepare per-process state (clients, models); cheap when called again."""

    @abstractmethod
    def process_batch(self, batch: pa.Table) -> pa.Table:
        """Transform one batch of rows; must return exactly one output row per input row."""

    @property
    def offloaded(self) -> bool:
        """Whether its work runs in another process, the calling thread only waiting (see the
        module docstring)."""
        return False

    @property
    def name(self) -> str:
        """The stage's name in logs and statistics (its class name)."""
        return type(self).__name__

    @property
    def max_concurrency(self) -> int | None:
        """The most processes that may run this stage at once (None: no limit)."""
        c = self.concurrency
        if c is None:
            return None
        return c[1] if isinstance(c, tuple) else c


_CACHE: dict[Hashable, Any] = {}
_CACHE_LOCK = threading.Lock()


def per_process(key: Hashable, factory: Callable[[], T]) -> T:
    """The value ``factory()`` made the first time ``key`` was asked for in this process.

    Schedulers hand a worker a fresh copy of a stage per item (Ray deserialises a task's
    function per call), so what ``setup()`` builds (an HTTP client, a tokenizer, a Storage)
    is cached here by configuration instead of on the stage object."""
    with _CACHE_LOCK:
        if key in _CACHE:
            return _CACHE[key]
    value = factory()
    with _CACHE_LOCK:
        return _CACHE.setdefault(key, value)


def forget(key: Hashable) -> Any:
    """Drop what :func:`per_process` keeps for ``key`` (returned, None when nothing), so the
    next call makes it again: for state a stage closes."""
    with _CACHE_LOCK:
        return _CACHE.pop(key, None)


def run_stages(stages: list[Stage], batch: pa.Table) -> pa.Table:
    """Run ``stages`` one after the other on ``batch`` (each set up first): what one fused
    task or one local worker does with an item."""
    for stage in stages:
        stage.setup()
        n = batch.num_rows
        batch = stage.process_batch(batch)
        if batch.num_rows != n and not stage.expands:
            raise RuntimeError(f"{stage.name} returned {batch.num_rows} rows for {n}")
    return batch
