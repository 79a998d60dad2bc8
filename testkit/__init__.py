"""The test rig: synthetic image world, fault-injecting HTTP and S3 servers, hostile images,
loopback Ray, the tiny model's training data and its evaluation.

It lives beside the runtime packages, not in them: ``pip install .`` installs ``clip_model``
and ``pipeline`` only, and nothing in those imports this package (tests/test_layers.py checks
both). Tests, benchmarks, the demo and the tiny model's recipe run from a checkout, where the
repository root is on ``sys.path``; subprocesses started from here get it through
:func:`subprocess_env`.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def subprocess_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: this process's environment) with the repository root first on
    ``PYTHONPATH``, so ``python -m testkit.<module>`` works from any working directory."""
    out = dict(os.environ if env is None else env)
    parts = [str(REPO_ROOT), *[p for p in out.get("PYTHONPATH", "").split(os.pathsep) if p]]
    out["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(parts))
    return out
