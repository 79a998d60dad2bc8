"""Fixtures shared by the whole test suite."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

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


@pytest.fixture(scope="module")
def shared_ray(s3_server: LocalS3) -> None:
    """The local Ray that the modules marked ``shared_ray`` share (2 CPUs, no GPU, loopback),
    started after the S3 server so its workers inherit its endpoint and credentials."""
    shared_local_ray()


def _shares_ray(item: pytest.Item) -> bool:
    return item.get_closest_marker("shared_ray") is not None


def _machine_wide(item: pytest.Item) -> bool:
    return (
        _shares_ray(item)
        or item.get_closest_marker("machine_wide") is not None
        or "local_stack" in getattr(item, "fixturenames", ())
    )


def pytest_configure(config: pytest.Config) -> None:
    # img2dataset pulls in albumentations, which otherwise checks PyPI for updates on import.
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    config.addinivalue_line("markers", "shared_ray: the module runs on the shared local Ray (fixture shared_ray)")
    config.addinivalue_line(
        "markers", "machine_wide: the module starts a Ray of its own or kills processes; under "
        "pytest-xdist it runs in the one worker that runs every such module (see below)")


@pytest.hookimpl(tryfirst=True, specname="pytest_collection_modifyitems")
def pytest_collection_modifyitems_xdist_groups(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Groups for ``pytest -n 2 --dist loadgroup`` (``make test``): every module that starts a
    Ray (in process, through a subprocess, or the local stack's head) is in group "machine", so
    they run one after another in one worker, in the order below, as without xdist: never two
    Ray clusters, a stack and a kill test side by side. Every other module is a group of its
    own, so its module-scoped fixtures (trained models, worlds) are built once. Runs before
    xdist's own hook, which reads the groups. About half of the suite's wall time the machine
    was idle (one test process on two cores, or a job test waiting on its workers): the
    second worker fills it."""
    machine = {item.path for item in items if _machine_wide(item)}
    for item in items:
        item.add_marker(pytest.mark.xdist_group("machine" if item.path in machine else item.nodeid.split("::")[0]))


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
