"""Download stage: fetch each ``ok`` row's URL with the guarded client of :mod:`pipeline.fetch`.

Columns in: ``url`` (string), ``status`` and ``error`` (optional; missing means every row is
``ok``), anything else passes through untouched. Columns added (one output row per input row,
same order):

- ``image_bytes`` (binary): the response body, only for rows that end ``ok``; never the bytes
  of a refused, opted-out, oversized or timed-out response;
- ``http_status`` (int32): the last HTTP status received, null when no response came;
- ``download_s`` (float32): wall seconds spent on the row, retries and waits included; null for
  rows that were not ``ok`` on input;
- ``source_sha256`` (string): hex sha256 of the downloaded bytes (the hash image hash lists
  use; ``sha256`` is the stored, re-encoded file's), only for rows that end ``ok``.

Blocklists (``blocklist``, pipeline/blocklist.py): a URL or domain on a list is never requested
(checked at every redirect hop too), and downloaded bytes whose md5, sha1 or sha256 is listed
are dropped at once; either way the row gets status ``blocked`` and an error naming the list.

Failure statuses (:data:`FAILURE_STATUSES`): ``http_<code>``, ``timeout`` (the total deadline
of one attempt: connect + headers + body), ``connection_error``, ``tls_error``,
``incomplete_body`` (the connection ended before the declared Content-Length), ``too_large``
(declared or streamed size over ``max_bytes``), ``blocked_address``, ``bad_scheme``, ``bad_url``,
``opt_out`` (X-Robots-Tag), ``too_many_redirects``, ``blocked`` (a blocklist names the URL, a
domain or the bytes), ``download_error`` (an unexpected exception, recorded rather than raised).

Retries: connection errors, incomplete bodies, 429 and 5xx only, ``config.retries`` times; a
row can therefore take up to ``(retries + 1) * timeout`` plus the waits between attempts.

Threads: ``config.thread_count`` workers inside each ``process_batch`` call share one pooled
client, so an actor keeps its connections warm across batches. Without Ray, call ``setup()``
(optional; done lazily) and ``process_batch()``, then ``close()``.
"""

from __future__ import annotations

import hashlib
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from pipeline.blocklist import DOWNLOAD_KINDS, BlocklistSpec, get_blocklist
from pipeline.config import DownloadConfig
from pipeline.fetch import Fetcher, FetchResult
from pipeline.netguard import Resolver
from pipeline.stages.base import Stage

# Failure statuses this stage sets, besides the open-ended ``http_<code>``.
FAILURE_STATUSES = frozenset(
    {
        "timeout",
        "connection_error",
        "tls_error",
        "incomplete_body",
        "too_large",
        "blocked_address",
        "bad_scheme",
        "bad_url",
        "opt_out",
        "too_many_redirects",
        "blocked",
        "download_error",
    }
)


@dataclass
class DownloadStage(Stage):
    """HTTP download of the ``url`` column; see the module docstring for the columns."""

    config: DownloadConfig = field(default_factory=DownloadConfig)
    # Tests inject a resolver with a fake getaddrinfo; None means the system resolver.
    resolver: Resolver | None = None
    # The job's blocklists; loaded once per worker process (None or empty: no checks).
    blocklist: BlocklistSpec | None = None
    _fetcher: Fetcher | None = field(default=None, init=False, repr=False, compare=False)
    _pool: ThreadPoolExecutor | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.config.validate()

    def setup(self) -> None:
        """Create the HTTP client and the worker threads (once per actor or process)."""
        if self._fetcher is None:
            self._fetcher = Fetcher(self.config, self.resolver, get_blocklist(self.blocklist, DOWNLOAD_KINDS))
            self._pool = ThreadPoolExecutor(
                self.config.thread_count, thread_name_prefix="clipcurate-download"
            )

    def close(self) -> None:
        """Stop the worker threads and drop pooled connections."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        if self._fetcher is not None:
            self._fetcher.close()
        self._pool = None
        self._fetcher = None

    def __getstate__(self) -> dict[str, Any]:
        # Threads, sockets and locks do not cross process boundaries; each worker builds its own.
        state = self.__dict__.copy()
        state["_fetcher"] = None
        state["_pool"] = None
        return state

    def _fetch_row(self, url: str | None) -> tuple[FetchResult, float]:
        start = time.monotonic()
        assert self._fetcher is not None
        if url is None or not str(url).strip():
            result = FetchResult("bad_url", "missing URL")
        else:
            try:
                result = self._fetcher.fetch(str(url))
                if result.status == "ok" and result.body is not None:
                    result = _check_bytes(result, self._fetcher.blocklist)
            except Exception as e:  # noqa: BLE001 - a row's failure must not fail the batch
                result = FetchResult("download_error", f"{type(e).__name__}: {e}")
        return result, time.monotonic() - start

    def process_batch(self, batch: pa.Table) -> pa.Table:
        """Fetch every ``ok`` row of ``batch``; returns the batch plus the download columns."""
        if "url" not in batch.column_names:
            raise ValueError(f"download stage needs a 'url' column, got {batch.column_names}")
        self.setup()
        assert self._pool is not None
        n = batch.num_rows
        urls = batch.column("url").to_pylist()
        if "status" in batch.column_names:
            statuses = batch.column("status").to_pylist()
        else:
            statuses = ["ok"] * n
        if "error" in batch.column_names:
            errors = batch.column("error").to_pylist()
        else:
            errors = [None] * n
        todo = [i for i in range(n) if statuses[i] == "ok"]
        bodies: list[bytes | None] = [None] * n
        codes: list[int | None] = [None] * n
        seconds: list[float | None] = [None] * n
        digests: list[str | None] = [None] * n
        for i, (result, spent) in zip(
            todo, self._pool.map(self._fetch_row, [urls[i] for i in todo]), strict=True
        ):
            statuses[i] = result.status
            # A successful fetch keeps an earlier stage's note (e.g. a caption repaired at read).
            if result.error is not None or result.status != "ok":
                errors[i] = result.error
            codes[i] = result.http_status
            seconds[i] = spent
            bodies[i] = result.body if result.status == "ok" else None
            digests[i] = result.sha256 if result.status == "ok" else None
        out = batch
        for name in ("image_bytes", "http_status", "download_s", "source_sha256"):
            if name in out.column_names:
                out = out.drop_columns([name])
        out = _put(out, "status", pa.array(statuses, pa.string()))
        out = _put(out, "error", pa.array(errors, pa.string()))
        out = out.append_column("image_bytes", _binary_column(bodies))
        out = out.append_column("http_status", pa.array(codes, pa.int32()))
        out = out.append_column("download_s", pa.array(seconds, pa.float32()))
        out = out.append_column("source_sha256", pa.array(digests, pa.string()))
        return out


def _check_bytes(result: FetchResult, blocklist: Any) -> FetchResult:
    """Hash a fetched body (``result.sha256``, hex) and drop it when a hash list names it."""
    assert result.body is not None
    digest = hashlib.sha256(result.body)
    if blocklist is not None:
        hit = blocklist.check_bytes(result.body, digest.digest())
        if hit is not None:
            return FetchResult("blocked", hit.reason(), result.http_status, attempts=result.attempts)
    result.sha256 = digest.hexdigest()
    return result


_MAX_CHUNK_BYTES = 1 << 30


def _binary_column(values: list[bytes | None]) -> pa.ChunkedArray:
    """A ``binary`` column split into chunks below 1 GiB each: one ``binary`` array's 32-bit
    offsets cannot address more than 2 GiB, which a batch of large images can reach."""
    chunks: list[pa.Array] = []
    start, size = 0, 0
    for i, v in enumerate(values):
        if v is not None and size + len(v) > _MAX_CHUNK_BYTES and i > start:
            chunks.append(pa.array(values[start:i], pa.binary()))
            start, size = i, 0
        size += 0 if v is None else len(v)
    chunks.append(pa.array(values[start:], pa.binary()))
    return pa.chunked_array(chunks, pa.binary())


def _put(table: pa.Table, name: str, values: pa.Array) -> pa.Table:
    """Replace column ``name`` in place (keeping its position) or append it."""
    if name in table.column_names:
        return table.set_column(table.column_names.index(name), name, values)
    return table.append_column(name, values)
