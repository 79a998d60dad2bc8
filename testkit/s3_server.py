"""A local S3 endpoint (moto's server) in its own process, bound to 127.0.0.1 only.

Tests, the demo and benchmarks talk to it over HTTP exactly as they would to S3, so code under
test uses its real boto3 / pyarrow S3 paths rather than in-process mocks.

    with LocalS3() as s3:                       # starts the process, waits until it answers
        s3.create_bucket("data")
        os.environ.update(s3.env())             # endpoint + fake credentials for boto3/pyarrow

or from a shell (runs until killed):

    python -m testkit.s3_server --port 9000
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

from testkit import subprocess_env

HOST = "127.0.0.1"

# moto accepts any credentials; these make boto3/pyarrow sign requests without touching a real
# account, and the region matches moto's default so bucket creation needs no constraint.
FAKE_CREDENTIALS: Mapping[str, str] = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
}


class LocalS3:
    """Launch and stop a moto S3 server process on 127.0.0.1.

    port: TCP port to bind; 0 lets the OS pick a free one (read ``port`` / ``endpoint_url``
        after ``start()``).
    startup_timeout: seconds to wait for the process to answer HTTP before giving up.
    """

    def __init__(self, port: int = 0, startup_timeout: float = 60.0) -> None:
        if not 0 <= port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {port}")
        self._requested_port = port
        self._startup_timeout = startup_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._workdir: tempfile.TemporaryDirectory[str] | None = None
        self._log_file = None
        self.port: int | None = None

    @property
    def endpoint_url(self) -> str:
        """``http://127.0.0.1:<port>``; only valid while started."""
        if self.port is None:
            raise RuntimeError("LocalS3 is not started")
        return f"http://{HOST}:{self.port}"

    @property
    def pid(self) -> int | None:
        """Process id of the server, or None when not running."""
        return self._proc.pid if self._proc is not None else None

    def env(self) -> dict[str, str]:
        """Environment for clients: fake credentials, region and this endpoint."""
        return {
            **FAKE_CREDENTIALS,
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ENDPOINT_URL_S3": self.endpoint_url,
        }

    def client(self):
        """A boto3 S3 client bound to this endpoint with the fake credentials."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=FAKE_CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=FAKE_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            aws_session_token=FAKE_CREDENTIALS["AWS_SESSION_TOKEN"],
            region_name=FAKE_CREDENTIALS["AWS_DEFAULT_REGION"],
        )

    def create_bucket(self, name: str) -> str:
        """Create bucket ``name`` on this server; returns the name."""
        self.client().create_bucket(Bucket=name)
        return name

    def start(self) -> LocalS3:
        """Start the server process and block until it answers HTTP on its port."""
        if self._proc is not None:
            raise RuntimeError("LocalS3 is already started")
        self._workdir = tempfile.TemporaryDirectory(prefix="clipcurate-s3-")
        port_file = Path(self._workdir.name) / "port"
        log_path = Path(self._workdir.name) / "server.log"
        self._log_file = open(log_path, "wb")  # kept open for the life of the process
        cmd = [
            sys.executable,
            "-m",
            "testkit.s3_server",
            "--port",
            str(self._requested_port),
            "--port-file",
            str(port_file),
        ]
        self._proc = subprocess.Popen(
            cmd, stdout=self._log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=subprocess_env(),
        )
        try:
            self.port = self._wait_for_port(port_file, log_path)
            self._wait_until_answering(log_path)
        except BaseException:
            self.stop()
            raise
        return self

    def _fail(self, message: str, log_path: Path) -> RuntimeError:
        log = log_path.read_text(errors="replace")[-4000:] if log_path.exists() else ""
        return RuntimeError(f"{message}; server log:\n{log}")

    def _wait_for_port(self, port_file: Path, log_path: Path) -> int:
        # The child binds first and then reports the port it got, so port 0 has no race
        # between choosing a free port and binding it.
        assert self._proc is not None
        deadline = time.monotonic() + self._startup_timeout
        while time.monotonic() < deadline:
            if port_file.exists():
                text = port_file.read_text().strip()
                if text:
                    return int(text)
            if self._proc.poll() is not None:
                raise self._fail(
                    f"moto S3 server exited with code {self._proc.returncode} while starting",
                    log_path,
                )
            time.sleep(0.05)
        raise self._fail(
            f"moto S3 server did not report its port within {self._startup_timeout} s", log_path
        )

    def _wait_until_answering(self, log_path: Path) -> None:
        assert self._proc is not None
        # No proxy: the probe must reach the loopback socket even if a proxy is configured.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        deadline = time.monotonic() + self._startup_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise self._fail(
                    f"moto S3 server exited with code {self._proc.returncode}", log_path
                )
            try:
                with opener.open(f"{self.endpoint_url}/moto-api/", timeout=5) as resp:
                    resp.read()
                return
            except urllib.error.HTTPError:
                return  # any HTTP answer means the server is serving
            except OSError:
                time.sleep(0.05)
        raise self._fail(
            f"moto S3 server on {self.endpoint_url} did not answer within "
            f"{self._startup_timeout} s",
            log_path,
        )

    def request_count(self, method: str, path: str) -> int:
        """How many ``method`` requests (``"GET"``) for ``path`` (``/bucket/key``, any query) the
        server has logged so far: what a test needs to see how a reader uses the store."""
        if self._workdir is None:
            raise RuntimeError("LocalS3 is not started")
        log = (Path(self._workdir.name) / "server.log").read_text(errors="replace")
        return len(re.findall(rf'"(?:\x1b\[[0-9;]*m)*{re.escape(method)} {re.escape(path)}[ ?]', log))

    def stop(self) -> None:
        """Terminate the server process (SIGTERM, then SIGKILL after 10 s) and clean up."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self._workdir is not None:
            self._workdir.cleanup()
            self._workdir = None
        self.port = None

    def __enter__(self) -> LocalS3:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _serve(port: int, port_file: str | None) -> int:
    """Run moto's server in this process until SIGTERM/SIGINT; returns the exit code."""
    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
    )
    from werkzeug.serving import make_server

    stop = threading.Event()

    def _on_signal(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)

    # Binding here, in the main thread, turns "port in use" into a prompt non-zero exit that
    # the launcher reports (moto's ThreadedMotoServer would hang waiting for a failed thread).
    server = make_server(
        HOST,
        port,
        DomainDispatcherApplication(create_backend_app),
        threaded=True,
        request_handler=MotoRequestHandler,
    )
    host, bound_port = server.server_address[:2]
    # moto builds some absolute URLs from MOTO_PORT; it must be the port actually bound.
    os.environ["MOTO_PORT"] = str(bound_port)
    serving = threading.Thread(target=server.serve_forever, name="moto-s3", daemon=True)
    serving.start()
    if port_file:
        tmp = f"{port_file}.tmp"
        with open(tmp, "w") as fh:
            fh.write(f"{bound_port}\n")
        os.replace(tmp, port_file)  # the parent never reads a half-written port
    print(f"local S3 (moto) listening on http://{host}:{bound_port}", flush=True)

    while not stop.wait(0.2):
        pass
    server.shutdown()
    serving.join()
    server.server_close()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Run a local S3 endpoint (moto) on 127.0.0.1 until killed."
    )
    parser.add_argument(
        "--port", type=int, default=0, help="TCP port on 127.0.0.1 (0: pick a free one)"
    )
    parser.add_argument(
        "--port-file", default=None, help="write the bound port to this file once listening"
    )
    args = parser.parse_args(argv)
    return _serve(args.port, args.port_file)


if __name__ == "__main__":
    sys.exit(main())
