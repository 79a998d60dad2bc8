"""The local S3 launcher: a separate moto process on 127.0.0.1, reachable over HTTP only."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import boto3
import pytest

from testkit import subprocess_env
from testkit.s3_server import LocalS3


def _connects(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_fixture_server_is_a_loopback_only_process(s3_server: LocalS3, s3_bucket: str) -> None:
    assert s3_server.pid is not None and s3_server.pid != os.getpid()
    assert s3_server.endpoint_url == f"http://127.0.0.1:{s3_server.port}"
    assert _connects("127.0.0.1", s3_server.port)
    # Bound to 127.0.0.1 only: another loopback address (which a 0.0.0.0 bind would accept)
    # is refused.
    assert not _connects("127.0.0.2", s3_server.port)

    # The fixture's environment alone is enough for a default boto3 client.
    assert os.environ["AWS_ENDPOINT_URL_S3"] == s3_server.endpoint_url
    assert os.environ["AWS_ACCESS_KEY_ID"] == "testing"
    client = boto3.client("s3")
    client.put_object(Bucket=s3_bucket, Key="a/b.txt", Body=b"payload")
    assert client.get_object(Bucket=s3_bucket, Key="a/b.txt")["Body"].read() == b"payload"


def test_each_s3_bucket_starts_empty(s3_server: LocalS3, s3_bucket: str) -> None:
    listing = s3_server.client().list_objects_v2(Bucket=s3_bucket)
    assert listing["KeyCount"] == 0


def test_context_manager_stops_the_process() -> None:
    with LocalS3() as server:
        pid, port = server.pid, server.port
        assert pid is not None and _process_alive(pid)
        server.create_bucket("ctx-bucket")
        names = [b["Name"] for b in server.client().list_buckets()["Buckets"]]
        assert names == ["ctx-bucket"]  # a fresh process: no state shared with other servers
    assert server.pid is None
    assert not _process_alive(pid)
    assert not _connects("127.0.0.1", port)
    with pytest.raises(RuntimeError, match="not started"):
        _ = server.endpoint_url


def test_port_in_use_is_reported_with_the_server_log() -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        start = time.monotonic()
        with pytest.raises(RuntimeError, match="exited with code") as info:
            LocalS3(port=port, startup_timeout=60).start()
        assert time.monotonic() - start < 30  # fails promptly, does not wait for the timeout
        assert "Address already in use" in str(info.value)


def test_command_line_entry_serves_until_terminated() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "testkit.s3_server", "--port", str(port)],
        stdout=subprocess.PIPE,
        env=subprocess_env(),
        stderr=subprocess.DEVNULL,
    )
    try:
        line = proc.stdout.readline().decode()
        assert line.strip() == f"local S3 (moto) listening on http://127.0.0.1:{port}"
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(f"http://127.0.0.1:{port}/", timeout=10) as resp:
            assert resp.status == 200
            assert b"ListAllMyBucketsResult" in resp.read()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
