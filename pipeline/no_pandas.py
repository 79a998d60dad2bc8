"""Keep pandas out of the processes whose work never uses it: the local scheduler's CPU workers
and the decode children (:mod:`pipeline.crashguard`).

pyarrow imports pandas, when it is installed (Ray Data needs it), the first time a process
converts Python objects to Arrow (``pa.array``, ``Table.from_pylist``) or Arrow to numpy, only
to check whether a value is a pandas object. That import costs 0.1-0.3 s of CPU and 35-50 MiB
of memory in every such process (bench/RESULTS.md, 2026-12-07, "pandas"), and those
processes' stages never touch a DataFrame. Refused, pyarrow carries on without its pandas integration,
and anything that does need pandas there fails with an ImportError naming this module.

Not for the driver (Ray Data), model workers (model libraries may want it) or Ray's workers.
"""

from __future__ import annotations

import importlib.abc
import sys
from collections.abc import Sequence
from importlib.machinery import ModuleSpec
from types import ModuleType


class _RefusePandas(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Sequence[str] | None = None,
                  target: ModuleType | None = None) -> ModuleSpec | None:
        if fullname == "pandas" or fullname.startswith("pandas."):
            raise ModuleNotFoundError(
                f"{fullname} is not loaded in this clipcurate worker process (pipeline.no_pandas)",
                name=fullname,
            )
        return None


def refuse_pandas() -> bool:
    """Make ``import pandas`` fail in this process from now on. Returns False (and does
    nothing) when pandas is already loaded, as there is nothing left to save."""
    if "pandas" in sys.modules:
        return False
    if not any(isinstance(f, _RefusePandas) for f in sys.meta_path):
        sys.meta_path.insert(0, _RefusePandas())
    return True
