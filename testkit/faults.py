"""Faults that tests inject into a stage graph: nothing in the runtime reads a test hook.

- :func:`crashing_decode_row`: a decoder (``DecodeStage.decoder``) that kills its own process
  with SIGSEGV on rows whose URL contains :data:`CRASH_MARKER`, as a decoder bug on hostile
  bytes would, and decodes every other row as the real one does.
- :class:`KillAfter`: wraps a stage; the first process that finishes its ``nth`` call of the
  stage SIGKILLs itself right after the call (its side effects are done, its result is lost),
  once per ``flag_dir``: the flag file ``<flag_dir>/<stage>.killed`` (created atomically,
  holding the pid) says it happened. The scheduler must then redo the item.
- :func:`inject`: a graph with some of its stages wrapped.
"""

from __future__ import annotations

import os
import signal
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from pipeline.graph import Graph
from pipeline.stages.base import Stage
from pipeline.stages.decode import decode_row

CRASH_MARKER = "SEGV-HERE"
CRASHING_DECODER = "testkit.faults:crashing_decode_row"


def crashing_decode_row(item: tuple[Any, str | None, Any]) -> Any:
    """:func:`pipeline.stages.decode.decode_row`, except that a row whose URL contains
    :data:`CRASH_MARKER` kills the decoding process with SIGSEGV."""
    url = item[1]
    if url and CRASH_MARKER in url:
        os.kill(os.getpid(), signal.SIGSEGV)
    return decode_row(item)


_calls: Counter[str] = Counter()


@dataclass
class KillAfter(Stage):
    """``inner`` with a SIGKILL after the ``nth`` call in the first process to reach it."""

    inner: Stage | None = None
    nth: int = 1
    flag_dir: str = ""

    def __post_init__(self) -> None:
        assert self.inner is not None
        self.resources = self.inner.resources
        self.batch_size = self.inner.batch_size
        self.concurrency = self.inner.concurrency
        # The scheduler must run the wrapper exactly as it would run the stage.
        self.stateful = self.inner.stateful  # type: ignore[misc]
        self.io_bound = self.inner.io_bound  # type: ignore[misc]
        self.expands = self.inner.expands  # type: ignore[misc]

    @property
    def name(self) -> str:
        assert self.inner is not None
        return self.inner.name

    @property
    def offloaded(self) -> bool:
        assert self.inner is not None
        return self.inner.offloaded

    def setup(self) -> None:
        assert self.inner is not None
        self.inner.setup()

    def close(self) -> None:
        close = getattr(self.inner, "close", None)
        if callable(close):
            close()

    def process_batch(self, batch: pa.Table) -> pa.Table:
        assert self.inner is not None
        out = self.inner.process_batch(batch)
        name = self.inner.name
        _calls[name] += 1
        if _calls[name] == self.nth:
            try:
                fd = os.open(os.path.join(self.flag_dir, f"{name}.killed"), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return out  # another process already died for this stage
            os.write(fd, str(os.getpid()).encode())
            os.close(fd)
            os.kill(os.getpid(), signal.SIGKILL)
        return out


@dataclass
class _Replace:
    wrap: dict[str, Callable[[Stage], Stage]] = field(default_factory=dict)

    def __call__(self, stages: list[Stage]) -> list[Stage]:
        return [self.wrap[s.name](s) if s.name in self.wrap else s for s in stages]


def inject(graph: Graph, wrap: dict[str, Callable[[Stage], Stage]]) -> Graph:
    """``graph`` with every stage whose name is a key of ``wrap`` replaced by ``wrap[name](stage)``."""
    rep = _Replace(wrap)
    return Graph({k: rep(v) for k, v in graph.sources.items()}, rep(graph.tail))


def kill_after(victims: dict[str, int], flag_dir: str) -> dict[str, Callable[[Stage], Stage]]:
    """``inject`` wrappers: stage name -> :class:`KillAfter` at its ``nth`` call."""
    return {name: (lambda s, n=nth: KillAfter(inner=s, nth=n, flag_dir=flag_dir)) for name, nth in victims.items()}
