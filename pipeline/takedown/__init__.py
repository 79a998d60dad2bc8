"""Takedowns: remove given URLs or image hashes from a finished output.

A takedown never deletes a row (every input row stays in the output exactly once); it removes
the image and everything computed from its pixels:

* ``embeddings/<shard>.parquet``: ``keep = false``, ``drop_reason = "takedown: <reason>"``,
  ``image_embedding = null`` (and ``image_thumb = null``), and a ``takedown`` column holding the
  reason (status unchanged);
* ``shards/<shard>.parquet``: the same ``takedown`` column (status unchanged);
* ``shards/<shard>.tar``: rewritten without the taken-down samples (``.jpg``, ``.json`` and
  ``.txt``); every other member keeps its exact header and bytes;
* ``shards/<shard>.manifest.json``: ``samples``, ``keys`` and the tar/parquet size + sha256
  of the new files, plus ``taken_down`` (the keys removed so far);
* ``_stats.json`` / ``report.html``: regenerated from the marked rows (thumbnails read from the
  rewritten tars) so the report neither shows the image nor counts the row as kept;
* ``_takedowns.jsonl``: one audit line per takedown that changed something (time, matchers,
  reason, keys affected; never image bytes);
* ``_blocklist/urls.txt``, ``sha256.txt``, ``pdq.txt``: the output's own blocklist
  (pipeline/blocklist/) gets the taken-down rows' URLs, the sha256 of their downloaded bytes
  and their PDQ hashes, so every later run that writes to this output, deduplicates against
  it or names it in ``blocklist.outputs`` never requests those URLs and never stores those
  pictures again, under any URL (written first, before the files below).

Rows are matched by URL, by sha256 (of the stored image or of the downloaded file), or by key
(a similarity takedown, pipeline/similar.py); every exact copy of a matched row's picture (the
same stored or downloaded bytes under another URL) is taken down with it.

Crash safety without a log: every file's wanted content is computed from the current files
(matching reads only ``url`` and ``sha256``, which a takedown never changes), and a file is
written, atomically, only when its wanted bytes differ from what is stored. Per shard the tar
and parquet go first and the manifest last, so after a crash the shard either still matches
its old manifest or holds the new files with a stale manifest; a rerun of the same takedown
recognises the latter (the tar's samples are exactly the manifest's minus the taken-down keys)
and completes it. A second identical takedown therefore writes nothing at all.

Modules: :mod:`.match` (what to take down: URLs, hashes, keys; list files), :mod:`.files`
(the wanted content of each shard and embeddings file), :mod:`.run` (the procedure:
find, blocklist, rewrite, report, audit), :mod:`.summary` (what a takedown did).
"""

from pipeline.takedown.files import REASON_PREFIX, TAKEDOWN
from pipeline.takedown.match import Matchers, TakedownError, read_list_file
from pipeline.takedown.run import AUDIT_NAME, takedown
from pipeline.takedown.summary import TakedownSummary, format_summary

__all__ = [
    "AUDIT_NAME",
    "REASON_PREFIX",
    "TAKEDOWN",
    "Matchers",
    "TakedownError",
    "TakedownSummary",
    "format_summary",
    "read_list_file",
    "takedown",
]
