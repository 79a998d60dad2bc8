"""Fixtures shared by the whole test suite."""

from __future__ import annotations

import os
import resource
import shutil
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from testkit.loopback_ray import shared_local_ray, stop_shared_local_ray
from testkit.s3_server import LocalS3

# Variables that could point boto3/pyarrow at a real account or profile while the local S3
# server is in use.
_AWS_LEAKS = ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalS3]:
    """A moto S3 server process on 127.0.0.1, started once per session.

    While it runs, os.environ holds its endpoint (AWS_ENDPOINT_URL, AWS_ENDPOINT_URL_S3), fake
    credentials and region, and no AWS profile or config file, so any boto3/pyarrow client
    created without arguments talks to it. The previous environment is restored afterwards.
    """
    isolated = tmp_path_factory.mktemp("aws-config")
    with LocalS3() as server, pytest.MonkeyPatch.context() as mp:
        for name in _AWS_LEAKS:
            mp.delenv(name, raising=False)
        mp.setenv("AWS_CONFIG_FILE", str(isolated / "config"))
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", str(isolated / "credentials"))
        for name, value in server.env().items():
            mp.setenv(name, value)
        yield server


@pytest.fixture
def s3_bucket(s3_server: LocalS3) -> Iterator[str]:
    """Name of a fresh, empty bucket on the local S3 server; deleted with its objects after."""
    name = f"test-{uuid.uuid4().hex[:20]}"
    s3_server.create_bucket(name)
    yield name
    # Emptying and deleting keeps the session-long server's memory flat across many tests.
    client = s3_server.client()
    existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
    if name not in existing:  # the test removed it itself
        return
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=name):
        keys = [{"Key": obj["Key"]} for obj in page.get("Contents", [])]
        if keys:
            client.delete_objects(Bucket=name, Delete={"Objects": keys})
    client.delete_bucket(Bucket=name)


@pytest.fixture
def descriptors_past_1024() -> Iterator[None]:
    """Holds descriptors open so that the next one this process opens is numbered above 1024
    (where select() gives up), raising the soft RLIMIT_NOFILE for the test if it must; skips
    where the hard limit does not reach that far. A busy download worker gets there."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.skip(f"the descriptor limit ({hard}) does not reach 1024")
    held: list[int] = []
    try:
        if soft != resource.RLIM_INFINITY and soft < 1200:
            resource.setrlimit(resource.RLIMIT_NOFILE, (1200, hard))
        while not held or held[-1] < 1030:
            held.append(os.open(os.devnull, os.O_RDONLY))
        yield
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.fixture(scope="module")
def shared_ray(s3_server: LocalS3) -> None:
    """The local Ray that the modules marked ``shared_ray`` share (2 CPUs, no GPU, loopback),
    started after the S3 server so its workers inherit its endpoint and credentials."""
    shared_local_ray()


def _shares_ray(item: pytest.Item) -> bool:
    return item.get_closest_marker("shared_ray") is not None


def _machine_wide(item: pytest.Item) -> bool:
    """The test starts a Ray, the local stack, or kills processes: by its own or its module's
    ``machine_wide`` mark, or a fixture (direct or not) that starts one."""
    return item.get_closest_marker("machine_wide") is not None or any(
        f in getattr(item, "fixturenames", ()) for f in _RAY_FIXTURES
    )


def pytest_configure(config: pytest.Config) -> None:
    # img2dataset pulls in albumentations, which otherwise checks PyPI for updates on import.
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    config.addinivalue_line("markers", "shared_ray: the module runs on the shared local Ray (fixture shared_ray)")
    config.addinivalue_line(
        "markers", "machine_wide: the test (or module) starts a Ray of its own or kills processes; "
        "under pytest-xdist it runs in the one worker that runs every such test")


# Under ``make test`` (two pytest-xdist workers) the tests that start a Ray (in process, through
# a subprocess, or the local stack's head) or kill processes run one after another in one
# worker, in collection order, as without xdist: never two Ray clusters, or the stack and a kill
# test, side by side. Every other test runs with the rest of its module in either worker, so
# module-scoped fixtures (trained models, worlds, job runs) are built once per worker that needs
# them. The xdist controller sees only test ids: each worker writes the ids of its machine-wide
# tests (by their marks and fixtures, below) to a file the controller named, and the controller's
# scheduler reads it.
_RAY_FIXTURES = ("shared_ray", "local_stack", "ray_local", "ray_plan")
_MACHINE_WIDE_IDS = "clipcurate_machine_wide_ids"


def _module(nodeid: str) -> str:
    return nodeid.split("::", 1)[0]


@pytest.hookimpl(tryfirst=True, specname="pytest_collection_modifyitems")
def pytest_collection_modifyitems_machine_wide(config: pytest.Config, items: list[pytest.Item]) -> None:
    """In an xdist worker: write the machine-wide tests' ids for the controller's scheduler."""
    path = getattr(config, "workerinput", {}).get(_MACHINE_WIDE_IDS)
    if path:
        ids = "\n".join(item.nodeid for item in items if _machine_wide(item))
        mine = f"{path}.{config.workerinput['workerid']}"
        Path(mine + ".tmp").write_text(ids)
        os.replace(mine + ".tmp", mine)


try:
    from xdist.scheduler import LoadScopeScheduling
except ImportError:  # pytest-xdist is in the test extra; without it the suite runs in one process
    LoadScopeScheduling = None

if LoadScopeScheduling is not None:

    class _MachineWideScheduling(LoadScopeScheduling):
        """xdist's per-module scheduling, with the machine-wide tests as one unit, handed out
        first: it is the suite's longest."""

        _ids: frozenset[str] | None = None

        def _split_scope(self, nodeid: str) -> str:
            if self._ids is None:  # every worker has collected (and written) by now
                path = self.config.stash[_IDS_PATH]
                self._ids = frozenset().union(*(
                    p.read_text().splitlines() for p in path.parent.glob(path.name + ".gw*") if not p.name.endswith(".tmp")
                ))
            return "machine-wide" if nodeid in self._ids else _module(nodeid)

        def _assign_work_unit(self, node: Any) -> None:
            if "machine-wide" in self.workqueue:
                self.workqueue.move_to_end("machine-wide", last=False)
            super()._assign_work_unit(node)

    _IDS_PATH = pytest.StashKey[Path]()

    def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
        return _MachineWideScheduling(config, log)

    def pytest_configure_node(node: Any) -> None:
        config = node.config
        if _IDS_PATH not in config.stash:
            config.stash[_IDS_PATH] = Path(tempfile.mkdtemp(prefix="clipcurate-xdist-")) / "machine-wide"
        node.workerinput[_MACHINE_WIDE_IDS] = str(config.stash[_IDS_PATH])

    def pytest_unconfigure(config: pytest.Config) -> None:
        if _IDS_PATH in config.stash:
            shutil.rmtree(config.stash[_IDS_PATH].parent, ignore_errors=True)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Modules marked ``shared_ray`` run last, one after another, on one local Ray: starting a
    local Ray, its first Ray Data run and its shutdown cost ~13 s each on the 2-core CI
    machine. Every other test keeps its order."""
    items.sort(key=_shares_ray)


def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    # No test outside those modules runs beside an idle Ray (or finds one initialized).
    if nextitem is None or not _shares_ray(nextitem):
        stop_shared_local_ray()
    ray = sys.modules.get("ray")
    if hasattr(item.config, "workerinput") and not _machine_wide(item) and ray is not None and ray.is_initialized():
        ray.shutdown()
        raise RuntimeError(f"{item.nodeid} left a Ray running beside the other xdist worker's: mark it machine_wide")
