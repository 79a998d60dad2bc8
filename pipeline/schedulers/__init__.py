"""What runs the stage graph: local worker processes (one machine) or Ray Data (a cluster).

Both take a :class:`~pipeline.graph.Graph`, shard descriptors per source and a callback for
each shard's final rows, and return per-segment rows and seconds; neither knows which stages
it runs. :func:`scheduler_for` picks one from ``execution`` (``auto``: Ray when an address is
given, else local processes).
"""

from __future__ import annotations

from typing import Any

from pipeline.config import ExecutionConfig


def scheduler_for(execution: ExecutionConfig) -> Any:
    """A :class:`~pipeline.schedulers.local.LocalScheduler` or
    :class:`~pipeline.schedulers.ray_data.RayDataScheduler` for ``execution``."""
    if execution.resolved_scheduler() == "ray":
        from pipeline.schedulers.ray_data import RayDataScheduler

        return RayDataScheduler(execution.ray_address, attempts=execution.attempts,
                                progress_interval_s=execution.progress_interval_s)
    from pipeline.schedulers.local import LocalScheduler

    return LocalScheduler(processes=execution.processes, prefetch=execution.prefetch, item_attempts=execution.attempts,
                          idle_workers=execution.idle_workers)


__all__ = ["scheduler_for"]
