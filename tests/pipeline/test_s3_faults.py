"""S3 faults against the real client code paths: boto3 (Storage: every write, shard reads) and
pyarrow's S3 filesystem (Parquet and list reads), through a fault proxy in front of the local
moto server.

What is pinned down: ``storage.s3_retries`` is the number of retries after the first attempt
for both clients (counted at the proxy); a failure after the retries names the object; an
outage of a couple of seconds is survived with the default retries; a writer killed mid-write
leaves no incomplete multipart upload, and ``abort_incomplete_writes`` clears the ones an
older writer left. The job-level runs are in tests/jobs/test_job_s3_faults.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import StorageConfig, WriteConfig
from pipeline.shard_format import read_manifest
from pipeline.stages.write import write_parquet
from pipeline.storage import Storage, StorageError, filesystem_for
from testkit.s3_fault_proxy import S3FaultProxy
from testkit.s3_server import LocalS3


@pytest.fixture
def proxy(s3_server: LocalS3) -> Iterator[S3FaultProxy]:
    with S3FaultProxy(s3_server.endpoint_url) as p:
        yield p


def _cfg(proxy: S3FaultProxy, retries: int) -> StorageConfig:
    return StorageConfig(s3_endpoint_url=proxy.endpoint_url, s3_retries=retries)


def _table() -> pa.Table:
    return pa.table({"key": [f"{i:09d}" for i in range(50)], "x": list(range(50))})


def _put_with_storage(proxy: S3FaultProxy, bucket: str, retries: int) -> str:
    Storage(f"s3://{bucket}/out", _cfg(proxy, retries)).write_atomic("shards/00000.tar", b"tar bytes")
    return "out/shards/00000.tar"


def _put_parquet(proxy: S3FaultProxy, bucket: str, retries: int) -> str:
    uri = f"s3://{bucket}/out/embeddings/00000.parquet"
    write_parquet(_table(), uri, WriteConfig(output_folder=uri.rsplit("/", 1)[0]), _cfg(proxy, retries))
    return "out/embeddings/00000.parquet"


# Both go through Storage.write_atomic (boto3): the one writer of the output.
WRITERS = {"write_atomic": _put_with_storage, "write_parquet": _put_parquet}


def _keys(s3: LocalS3, bucket: str) -> list[str]:
    return [o["Key"] for o in s3.client().list_objects_v2(Bucket=bucket).get("Contents", [])]


def _uploads(s3: LocalS3, bucket: str) -> list[str]:
    return [u["Key"] for u in s3.client().list_multipart_uploads(Bucket=bucket).get("Uploads", [])]


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_slowdown_puts_are_retried_and_the_object_lands_whole(
    writer: str, proxy: S3FaultProxy, s3_server: LocalS3, s3_bucket: str
) -> None:
    rule = proxy.fail(method="PUT", times=2)
    key = WRITERS[writer](proxy, s3_bucket, 2)
    puts = proxy.requests("PUT", key)
    assert [r.status for r in puts] == [503, 503, 200]
    assert rule.hits == 2
    body = s3_server.client().get_object(Bucket=s3_bucket, Key=key)["Body"].read()
    if writer == "write_parquet":
        assert pq.read_table(pa.BufferReader(body)).equals(_table())
    else:
        assert body == b"tar bytes"
    assert _uploads(s3_server, s3_bucket) == []


@pytest.mark.parametrize("writer", sorted(WRITERS))
@pytest.mark.parametrize("retries", [0, 1])
def test_retries_spent_fail_naming_the_object_after_exactly_retries_plus_one_attempts(
    writer: str, retries: int, proxy: S3FaultProxy, s3_server: LocalS3, s3_bucket: str
) -> None:
    proxy.fail(method="PUT", times=retries + 1)
    with pytest.raises(StorageError) as info:
        WRITERS[writer](proxy, s3_bucket, retries)
    message = str(info.value)
    key = "out/shards/00000.tar" if writer == "write_atomic" else "out/embeddings/00000.parquet"
    assert f"s3://{s3_bucket}/{key}" in message
    assert f"after {retries + 1} attempt(s)" in message and f"s3_retries={retries}" in message
    assert "SlowDown" in message
    assert len(proxy.requests("PUT", key)) == retries + 1
    assert _keys(s3_server, s3_bucket) == []  # nothing, not a partial object
    assert _uploads(s3_server, s3_bucket) == []


@pytest.mark.parametrize("retries", [0, 1, 2])
def test_pyarrow_reads_retry_exactly_s3_retries_times(
    retries: int, proxy: S3FaultProxy, s3_server: LocalS3, s3_bucket: str
) -> None:
    key = "out/embeddings/00000.parquet"
    buf = pa.BufferOutputStream()
    pq.write_table(_table(), buf)
    s3_server.client().put_object(Bucket=s3_bucket, Key=key, Body=buf.getvalue().to_pybytes())
    fs, path = filesystem_for(f"s3://{s3_bucket}/{key}", _cfg(proxy, retries))
    # ``retries`` failures are absorbed: the read succeeds after exactly retries + 1 GETs.
    rule = proxy.fail(method="GET", key_pattern=r"00000\.parquet$", times=retries)
    with fs.open_input_stream(path) as f:
        assert pq.read_table(pa.BufferReader(f.read())).equals(_table())
    assert rule.hits == retries and len(proxy.requests("GET", key)) == retries + 1
    # One more and the read fails with pyarrow's OSError (it names the operation, GetObject).
    # The AWS SDK names the 503 from the error body (SLOW_DOWN) or, when it has dropped that
    # body, from the status alone (SERVICE_UNAVAILABLE): measured, it drops it on most reads
    # that follow a successful one on the same client, and not always, so either counts.
    proxy.fail(method="GET", key_pattern=r"00000\.parquet$", times=retries + 1)
    before = len(proxy.requests("GET", key))
    with pytest.raises(OSError, match="(SLOW_DOWN|SERVICE_UNAVAILABLE) during GetObject"):
        with fs.open_input_stream(path) as f:
            f.read()
    assert len(proxy.requests("GET", key)) - before == retries + 1


def test_reads_distinguish_missing_from_unreachable(proxy: S3FaultProxy, s3_server: LocalS3, s3_bucket: str) -> None:
    store = Storage(f"s3://{s3_bucket}/out", _cfg(proxy, 1))
    store.write_atomic("a.json", b"{}")
    assert store.size("nope") is None
    with pytest.raises(FileNotFoundError, match=f"s3://{s3_bucket}/out/nope"):
        store.read_bytes("nope")
    proxy.fail(method="GET", times=2, status=500, code="InternalError", message="We encountered an internal error.")
    with pytest.raises(StorageError, match=f"GET s3://{s3_bucket}/out/a.json failed after 2 attempt"):
        store.read_bytes("a.json")
    # An unreadable manifest is an error, not "this shard was never committed".
    proxy.fail(method="GET", times=2, status=503)
    with pytest.raises(StorageError):
        read_manifest(store, "00000")
    missing_bucket = Storage("s3://no-such-bucket-i1/out", _cfg(proxy, 0))
    with pytest.raises(StorageError, match="bucket 'no-such-bucket-i1' does not exist"):
        missing_bucket.write_atomic("config.yaml", b"x")


def test_a_body_cut_off_mid_stream_is_read_again(proxy: S3FaultProxy, s3_bucket: str) -> None:
    store = Storage(f"s3://{s3_bucket}/out", _cfg(proxy, 2))
    data = bytes(range(256)) * 4096  # 1 MiB, so half of it is well inside the stream
    store.write_atomic("shards/00000.tar", data)
    rule = proxy.fail(method="GET", key_pattern=r"00000\.tar$", times=2, truncate=True)
    assert store.read_bytes("shards/00000.tar") == data
    assert rule.hits == 2
    rule = proxy.fail(method="GET", key_pattern=r"00000\.tar$", times=3, truncate=True)
    with pytest.raises(StorageError, match=f"GET s3://{s3_bucket}/out/shards/00000.tar failed"):
        store.read_bytes("shards/00000.tar")
    assert rule.hits == 3


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_a_client_that_hangs_up_mid_upload_leaves_no_object(
    proxy: S3FaultProxy, s3_server: LocalS3, s3_bucket: str, framing: str
) -> None:
    """A process killed while sending a PUT body: real S3 never stores the partial request,
    so the proxy must not forward it (it once stored a 0-byte object under the full body's
    checksum, which the driver-kill test then read as a cut tar)."""
    import socket
    from urllib.parse import urlsplit

    where = urlsplit(proxy.endpoint_url)
    if framing == "content-length":
        head = "Content-Length: 1000\r\nx-amz-checksum-crc32: smvAqQ==\r\n"
        sent = b"x" * 10
    else:
        head = "Transfer-Encoding: chunked\r\n"
        sent = b"3e8\r\n" + b"x" * 10
    with socket.create_connection((where.hostname, where.port)) as conn:
        conn.sendall(f"PUT /{s3_bucket}/cut.tar HTTP/1.1\r\nHost: {where.netloc}\r\n{head}\r\n".encode() + sent)
    deadline = time.monotonic() + 5
    while not any(r.path == f"{s3_bucket}/cut.tar" for r in proxy.log) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [r.status for r in proxy.log if r.path == f"{s3_bucket}/cut.tar"] == [None]
    assert "cut.tar" not in _keys(s3_server, s3_bucket)
    # A whole PUT through the same proxy still lands.
    Storage(f"s3://{s3_bucket}", _cfg(proxy, 0)).write_atomic("whole.tar", b"tar bytes")
    assert "whole.tar" in _keys(s3_server, s3_bucket)


@pytest.mark.parametrize("mode", ["503", "down"])
def test_an_outage_of_two_seconds_is_survived_with_the_default_retries(
    mode: str, proxy: S3FaultProxy, s3_server: LocalS3, s3_bucket: str
) -> None:
    cfg = StorageConfig(s3_endpoint_url=proxy.endpoint_url)  # default s3_retries
    store = Storage(f"s3://{s3_bucket}/out", cfg)
    store.write_atomic("before.bin", b"1")
    uri = f"s3://{s3_bucket}/out/embeddings/00000.parquet"
    started = time.monotonic()
    proxy.outage(2.0, mode=mode)
    store.write_atomic("during.bin", b"2")  # boto3
    write_parquet(_table(), uri, WriteConfig(output_folder=uri.rsplit("/", 1)[0]), cfg)  # pyarrow
    fs, path = filesystem_for(uri, cfg)
    assert pq.read_table(path, filesystem=fs).equals(_table())
    assert store.read_bytes("during.bin") == b"2"
    assert time.monotonic() - started >= 1.9  # the writes really waited the outage out
    proxy.wait_up()
    if mode == "503":
        failed = [r for r in proxy.log if r.faulted]
        assert {r.path for r in failed} >= {f"{s3_bucket}/out/during.bin"}, failed
    assert sorted(_keys(s3_server, s3_bucket)) == [
        "out/before.bin", "out/during.bin", "out/embeddings/00000.parquet"]


_KILLED_WRITER = """
import sys, time
from pipeline.config import StorageConfig
from pipeline.storage import filesystem_for
uri, endpoint, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
fs, path = filesystem_for(uri, StorageConfig(s3_endpoint_url=endpoint))
stream = fs.open_output_stream(path)
stream.write(b"p" * size)
print("written", flush=True)
time.sleep(120)  # killed here, before close()
"""


def _killed_writer(uri: str, endpoint: str, size: int) -> None:
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, uri, endpoint, str(size)],
                            stdout=subprocess.PIPE, env=os.environ.copy())
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"written\n"
        time.sleep(0.5)  # let a background part upload, if any, reach the server
    finally:
        proc.kill()
        proc.wait()


def test_killed_writers_leave_no_upload_or_the_next_run_aborts_it(
    s3_server: LocalS3, s3_bucket: str, tmp_path: Path
) -> None:
    endpoint = s3_server.endpoint_url
    # A file below one part (every file the job writes on its small shards) goes up as one
    # PutObject on close: a writer killed before that leaves nothing at all.
    _killed_writer(f"s3://{s3_bucket}/out/embeddings/00000.parquet", endpoint, 100_000)
    assert _uploads(s3_server, s3_bucket) == []
    # A file larger than a part starts a multipart upload while it is written; killing the
    # writer leaves it incomplete (invisible as an object, parts still stored).
    _killed_writer(f"s3://{s3_bucket}/out/embeddings/00001.parquet", endpoint, 11 * 1024 * 1024)
    client = s3_server.client()
    other = client.create_multipart_upload(Bucket=s3_bucket, Key="elsewhere/big.bin")["UploadId"]
    assert sorted(_uploads(s3_server, s3_bucket)) == ["elsewhere/big.bin", "out/embeddings/00001.parquet"]
    assert _keys(s3_server, s3_bucket) == []

    removed = Storage(f"s3://{s3_bucket}/out", StorageConfig(s3_endpoint_url=endpoint)).abort_incomplete_writes()
    assert len(removed) == 1 and f"s3://{s3_bucket}/out/embeddings/00001.parquet" in removed[0]
    # Only uploads under the run's root are this run's business.
    assert _uploads(s3_server, s3_bucket) == ["elsewhere/big.bin"]
    client.abort_multipart_upload(Bucket=s3_bucket, Key="elsewhere/big.bin", UploadId=other)

    # Locally the leftovers are temporary files next to the final names.
    root = tmp_path / "out"
    (root / "shards").mkdir(parents=True)
    (root / "embeddings").mkdir()
    (root / "shards" / "00000.tar").write_bytes(b"whole")
    (root / "shards" / ".00001.tar.k2j3h4.tmp-0a1b2c3d").write_bytes(b"half")
    (root / "embeddings" / ".00001.parquet.tmp-deadbeef").write_bytes(b"half")
    removed = Storage(str(root)).abort_incomplete_writes()
    assert [Path(p).name for p in removed] == [".00001.parquet.tmp-deadbeef", ".00001.tar.k2j3h4.tmp-0a1b2c3d"]
    assert sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) == ["shards/00000.tar"]
