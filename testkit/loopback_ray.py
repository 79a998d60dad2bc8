"""Ray for tests on 127.0.0.1 only, in a private temp dir.

Two defaults of Ray matter on a shared test machine:

* Ray turns ``127.0.0.1`` in a node or GCS address into the host's external interface address
  (``ray._private.services.resolve_ip_for_localhost``) unless
  ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``; the tests must not send packets to any address
  outside 127.0.0.0/8.
* ``ray.cluster_utils.Cluster`` records its address in ``$RAY_TMPDIR/ray_current_cluster``,
  where any plain ``ray.init()`` on the machine would find it and join it instead of starting
  its own Ray.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

LOOPBACK = "127.0.0.1"


@contextmanager
def loopback_ray_env() -> Iterator[str]:
    """Within the block, Ray started from this process (``ray.init()``, ``Cluster``) binds
    127.0.0.1, keeps its sessions and address file in a fresh temp dir (yielded), and sends
    no usage report. Restores the environment afterwards and removes the temp dir."""
    import ray._private.ray_constants as ray_constants

    # Short path: Ray's unix socket paths live under it (107-byte limit).
    tmp = tempfile.mkdtemp(prefix="ccr-", dir="/tmp")
    env = {
        "RAY_TMPDIR": tmp,
        "RAY_USAGE_STATS_ENABLED": "0",
        ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR: "0",
    }
    saved = {k: os.environ.get(k) for k in env}
    saved_flag = ray_constants.ENABLE_RAY_CLUSTER
    os.environ.update(env)
    # Read once at import: the module constant must change too for this process.
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield tmp
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(tmp, ignore_errors=True)


# One local Ray that consecutive test modules share (tests/conftest.py runs the modules marked
# ``shared_ray`` one after another, and stops it before any other module): each start of a
# local Ray, with its first Ray Data run and its shutdown, costs ~13 s on a 2-core machine.
_shared: ExitStack | None = None


def shared_local_ray() -> None:
    """Start this process's shared local Ray unless it runs: 2 logical CPUs, no GPU, no
    dashboard, loopback only, in a private temp dir (:func:`loopback_ray_env`). Its workers
    keep the environment of the moment it starts: start it after the S3 server. A test that
    needs another Ray shuts it down (``ray.shutdown()``); the next call starts it again."""
    global _shared
    import ray

    from pipeline.ray_start import init_ray

    if _shared is not None and ray.is_initialized():
        return
    stop_shared_local_ray()
    if ray.is_initialized():  # another Ray of this process, started by a test of its own
        ray.shutdown()
    stack = ExitStack()
    stack.enter_context(loopback_ray_env())
    try:
        init_ray(num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False)
    except BaseException:
        stack.close()
        raise
    _shared = stack


def stop_shared_local_ray() -> None:
    """Shut the shared local Ray down (if it runs) and restore the environment."""
    global _shared
    if _shared is None:
        return
    import ray

    ray.shutdown()
    stack, _shared = _shared, None
    stack.close()
