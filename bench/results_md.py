"""Appending a figure to bench/RESULTS.md: one section per run, dated, with the machine and the
exact command, so a figure can be re-measured and compared on the same kind of machine."""

from __future__ import annotations

import datetime as dt
import os
import platform
import shlex
import sys
from pathlib import Path


def machine() -> str:
    return f"{platform.node() or 'vm'}, {os.cpu_count()} CPUs, {platform.machine()}"


def append(path: str | Path, title: str, details: str, body: str, argv: list[str] | None = None) -> None:
    """Append ``## title (date UTC)``, the machine, the command that ran (``argv``: the
    script's arguments, default this process's), ``details`` and ``body`` (a table)."""
    script = Path(sys.argv[0]).name
    args = sys.argv[1:] if argv is None else argv
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    with open(path, "a") as f:
        f.write(
            f"\n## {title} ({stamp})\n\nMachine: {machine()}. Command: "
            f"`python bench/{script} {shlex.join(args)}`. {details}\n\n{body}\n"
        )
