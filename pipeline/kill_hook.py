"""Test-only fault hook shared by both distributors (runner.py on Ray, local_runner.py).

``KILL_ENV="EmbedStage@2,DecodeStage@1"`` makes the first worker process that finishes its 2nd
EmbedStage call (1st DecodeStage call) SIGKILL itself before returning the result, once per
stage: the flag file ``<KILL_DIR_ENV>/<stage>.killed`` (created atomically, holding the pid)
says it happened. The batch's side effects are done and its result is lost, so the distributor
must redo it. Inert unless both variables are set.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

KILL_ENV = "CLIPCURATE_TEST_KILL_WORKER"
KILL_DIR_ENV = "CLIPCURATE_TEST_KILL_DIR"
_calls: Counter[str] = Counter()


def maybe_kill_self(stage_name: str) -> None:
    """Count one finished call of ``stage_name`` in this process; SIGKILL the process if
    ``KILL_ENV`` names this call and no other process has died for the stage yet."""
    spec, folder = os.environ.get(KILL_ENV), os.environ.get(KILL_DIR_ENV)
    if not spec or not folder:
        return
    _calls[stage_name] += 1
    for item in spec.split(","):
        name, _, nth = item.strip().partition("@")
        if name != stage_name or _calls[stage_name] != int(nth or 1):
            continue
        try:
            fd = os.open(
                os.path.join(folder, f"{stage_name}.killed"), os.O_CREAT | os.O_EXCL | os.O_WRONLY
            )
        except FileExistsError:
            return  # another process already died for this stage
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        os.kill(os.getpid(), signal.SIGKILL)
