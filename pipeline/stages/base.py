"""The stage contract every pipeline stage follows (see DESIGN.md, "The stage contract").

A stage is a plain object: tests call ``setup()`` and ``process_batch()`` directly, and
``pipeline/runner.py`` turns it into a Ray Data ``map_batches`` call (an actor class when
the stage overrides ``setup`` or asks for a GPU, a task otherwise).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import pyarrow as pa


@dataclass(frozen=True)
class Resources:
    """Ray resources one task or actor of a stage asks for."""

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

    ``process_batch`` receives and returns a pyarrow Table. It never raises because of a bad
    row: the row's ``status``/``error`` columns record why it failed and the row flows on.
    An exception escaping ``process_batch`` is a bug in the stage.
    """

    resources: Resources = field(default_factory=Resources)
    batch_size: int | None = None
    concurrency: int | tuple[int, int] | None = None

    def setup(self) -> None:  # noqa: B027 - optional hook, empty by design
        """Called once per actor (or once per task) before the first batch."""

    @abstractmethod
    def process_batch(self, batch: pa.Table) -> pa.Table:
        """Transform one batch of rows; must return exactly one output row per input row."""

    @property
    def needs_actor(self) -> bool:
        """True when the stage keeps state across batches (a model) or asks for a GPU."""
        return type(self).setup is not Stage.setup or self.resources.num_gpus > 0
