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

Blocklists (``blocklist``, pipeline/blocklist/): a URL or domain on a list is never requested
(checked at every redirect hop too), and downloaded bytes whose md5, sha1 or sha256 is listed
are dropped at once; either way the row gets status ``blocked`` and an error naming the list.

Failure statuses (:data:`pipeline.schema.DOWNLOAD_STATUSES`): ``http_<code>``, ``timeout`` (the total deadline
of one attempt: connect + headers + body), ``connection_error``, ``tls_error``,
``incomplete_body`` (the connection ended before the declared Content-Length), ``too_large``
(declared or streamed size over ``max_bytes``), ``blocked_address``, ``bad_scheme``, ``bad_url``,
``opt_out`` (X-Robots-Tag), ``too_many_redirects``, ``blocked`` (a blocklist names the URL, a
domain or the bytes), ``download_error`` (an unexpected exception, recorded rather than raised).

Retries: connection errors, incomplete bodies, 429 and 5xx only, ``config.retries`` times; a
row can therefore take up to ``(retries + 1) * timeout`` plus the waits between attempts.

Threads: ``config.thread_count`` workers inside each ``process_batch`` call share one pooled
client, made once per process (``per_process``), so a worker keeps its connections warm
across shards. Call ``setup()`` (optional; done lazily) and ``process_batch()``, then
``close()`` when the process is done with the stage.
"""

from __future__ import annotations

import hashlib
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pyarrow as pa

from pipeline import schema as S
from pipeline.blocklist import DOWNLOAD_KINDS, BlocklistSpec, get_blocklist
from pipeline.config import DownloadConfig
from pipeline.fetch import Fetcher, FetchResult
from pipeline.netguard import Resolver
from pipeline.stages.base import Resources, Stage, forget, per_process


@dataclass
class DownloadStage(Stage):
    """HTTP download of the ``url`` column; see the module docstring for the columns."""

    io_bound: ClassVar[bool] = True

    resources: Resources = field(default_factory=lambda: Resources(num_cpus=0))
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
        """Get this process's HTTP client and worker threads for this config (made once)."""
        if self._fetcher is None:
            self._fetcher, self._pool = per_process(
                self._key(),
                lambda: (
                    Fetcher(self.config, self.resolver, get_blocklist(self.blocklist, DOWNLOAD_KINDS)),
                    ThreadPoolExecutor(self.config.thread_count, thread_name_prefix="clipcurate-download"),
                ),
            )

    def _key(self) -> tuple[Any, ...]:
        return ("download", self.config, self.blocklist, id(self.resolver) if self.resolver is not None else None)

    def close(self) -> None:
        """Stop the worker threads and drop pooled connections (this process's, for this
        config: call it when the process is done with the stage)."""
        forget(self._key())
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
            result = FetchResult(S.BAD_URL, "missing URL")
        else:
            try:
                result = self._fetcher.fetch(str(url))
                if result.status == S.OK and result.body is not None:
                    result = _check_bytes(result, self._fetcher.blocklist)
            except Exception as e:  # noqa: BLE001 - a row's failure must not fail the batch
                result = FetchResult(S.DOWNLOAD_ERROR, f"{type(e).__name__}: {e}")
        return result, time.monotonic() - start

    def process_batch(self, batch: pa.Table) -> pa.Table:
        """Fetch every ``ok`` row of ``batch``; returns the batch plus the download columns."""
        if S.URL not in batch.column_names:
            raise ValueError(f"download stage needs a {S.URL!r} column, got {batch.column_names}")
        self.setup()
        assert self._pool is not None
        n = batch.num_rows
        urls = batch.column(S.URL).to_pylist()
        if S.STATUS in batch.column_names:
            statuses = batch.column(S.STATUS).to_pylist()
        else:
            statuses = [S.OK] * n
        errors = S.column_list(batch, S.ERROR)
        todo = [i for i in range(n) if statuses[i] == S.OK]
        bodies: list[bytes | None] = [None] * n
        codes: list[int | None] = [None] * n
        seconds: list[float | None] = [None] * n
        digests: list[str | None] = [None] * n
        for i, (result, spent) in zip(
            todo, self._pool.map(self._fetch_row, [urls[i] for i in todo]), strict=True
        ):
            statuses[i] = result.status
            # A successful fetch keeps an earlier stage's note (e.g. a caption repaired at read).
            if result.error is not None or result.status != S.OK:
                errors[i] = result.error
            codes[i] = result.http_status
            seconds[i] = spent
            bodies[i] = result.body if result.status == S.OK else None
            digests[i] = result.sha256 if result.status == S.OK else None
        out = S.set_column(batch, S.STATUS, pa.array(statuses, pa.string()))
        out = S.set_column(out, S.ERROR, pa.array(errors, pa.string()))
        out = S.set_column(out, S.IMAGE_BYTES, S.binary_column(bodies))
        out = S.set_column(out, S.HTTP_STATUS, pa.array(codes, pa.int32()))
        out = S.set_column(out, S.DOWNLOAD_S, pa.array(seconds, pa.float32()))
        return S.set_column(out, S.SOURCE_SHA256, pa.array(digests, pa.string()))


def _check_bytes(result: FetchResult, blocklist: Any) -> FetchResult:
    """Hash a fetched body (``result.sha256``, hex) and drop it when a hash list names it."""
    assert result.body is not None
    digest = hashlib.sha256(result.body)
    if blocklist is not None:
        hit = blocklist.check_bytes(result.body, digest.digest())
        if hit is not None:
            return FetchResult(S.BLOCKED, hit.reason(), result.http_status, attempts=result.attempts)
    result.sha256 = digest.hexdigest()
    return result
