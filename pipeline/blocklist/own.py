"""An output's own blocklist (``<output>/_blocklist/``): what takedowns add to it
(:func:`append_to_output`). Every run that writes to that output, deduplicates against it or
names it in ``blocklist.outputs`` applies it (see :func:`pipeline.blocklist.sources`).
"""

from __future__ import annotations

from collections.abc import Iterable

from pipeline.config import StorageConfig

OWN_DIR = "_blocklist"
# File names of an output's own blocklist, per kind.
OWN_FILES = {"url": "urls.txt", "domain": "domains.txt", "md5": "md5.txt", "sha1": "sha1.txt",
             "sha256": "sha256.txt", "pdq": "pdq.txt"}


def append_to_output(
    output: str,
    entries: dict[str, Iterable[str]],
    storage: StorageConfig | None = None,
    note: str | None = None,
) -> dict[str, int]:
    """Add ``entries`` (kind -> values: URLs, hex digests) to ``<output>/_blocklist/`` (the
    output's own blocklist); values already listed are skipped. Returns new entries per kind.
    Each file is rewritten whole and atomically (object stores have no append)."""
    from pipeline.storage import Storage

    storage = storage or StorageConfig()
    store = Storage(f"{output.rstrip('/')}/{OWN_DIR}", storage)
    have = set(store.list_names())
    added: dict[str, int] = {}
    for kind, values in entries.items():
        fname = OWN_FILES[kind]
        old = store.read_bytes(fname) if fname in have else b""
        known = {line.strip() for line in old.decode("utf-8").splitlines() if line.strip() and not line.startswith("#")}
        new = []
        for v in values:
            v = v.strip() if kind in ("url", "domain") else v.strip().lower()
            if v and v not in known:
                known.add(v)
                new.append(v)
        added[kind] = len(new)
        if not new:
            continue
        text = old.decode("utf-8")
        if text and not text.endswith("\n"):
            text += "\n"
        if note:
            text += f"# {note}\n"
        text += "\n".join(new) + "\n"
        store.write_atomic(fname, text.encode("utf-8"))
    return added
