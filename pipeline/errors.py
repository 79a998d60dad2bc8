"""How an entry point reports a failed run: the full traceback to the log, then one line.

A failed Ray task's traceback is long and ends in "UDF failed"; a local worker's failure is a
RuntimeError wrapping the worker's traceback. Users need the first thing that went wrong and
that a re-run resumes, so the entry points (``jobs/embed_laion.py``, ``clipcurate download``)
print that and exit 1.
"""

from __future__ import annotations

import logging

RESUME_HINT = "committed shards are kept; fix the cause and re-run the same command to resume"


def root_cause(exc: BaseException) -> BaseException:
    """The exception a failure started from: a StorageError (it names the object) if the chain
    holds one, else the deepest cause. Follows ``__cause__``/``__context__`` and the ``cause``
    attribute Ray's task errors carry across processes."""
    chain, seen = [], set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        chain.append(e)
        nxt = getattr(e, "cause", None)
        e = nxt if isinstance(nxt, BaseException) else (e.__cause__ or e.__context__)
    for e in chain:
        if type(e).__name__ == "StorageError":
            return e
    return chain[-1]


def failure_lines(prog: str, exc: BaseException) -> str:
    """Two lines for stderr: ``<prog>: error: <Type>: <first line of the root cause>`` and the
    resume hint. Logs ``exc``'s traceback (logger ``clipcurate``) first."""
    logging.getLogger("clipcurate").error("run failed", exc_info=exc)
    cause = root_cause(exc)
    first = f"{type(cause).__name__}: {cause}".splitlines()[0]
    return f"{prog}: error: {first}\n{prog}: {RESUME_HINT}"
