"""The one way the project connects to Ray: join a given cluster, or start a local Ray that
listens on 127.0.0.1 only.

Ray has no authentication on its internal ports (GCS, raylet, object manager, worker gRPC,
dashboard agent, runtime-env agent), and a plain ``ray.init()`` that starts a local instance
binds them to every interface and advertises the host's address: for the length of a run,
anyone who can reach the machine can submit code to it. Every place the project starts Ray
itself (the job run directly, ``clipcurate download``, bench scripts, tests) goes through
:func:`init_ray`, which starts it like ``infra/local/up.sh`` starts its head:

* ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``: Ray's local-only mode. Without it Ray replaces
  ``127.0.0.1`` in a node address by the host's external address
  (``ray._private.services.resolve_ip_for_localhost``);
* node address ``127.0.0.1``: GCS, raylet, agents and workers bind it instead of ``0.0.0.0``;
* no dashboard unless asked for (then on 127.0.0.1), and no usage report.

After starting, the sockets of the processes Ray started are read from /proc (Linux) and the
start is undone with an error if any listens elsewhere, so a Ray release that changes these
defaults fails loudly instead of opening the machine.

Joining an existing cluster (an ``address``, ``$RAY_ADDRESS`` as under ``ray job submit``, or a
cluster that ``ray start`` recorded on this machine) leaves where it listens to that cluster's
own settings (docs/operations.md says what its operator must do). One thing is decided here: a
loopback-only head on this machine (``infra/local/up.sh``, ``ray start --head
--node-ip-address 127.0.0.1`` in local-only mode), named by a loopback address, is joined in
local-only mode too. Without it Ray rewrites the ``127.0.0.1`` the user gave into the host's
external address and sends the driver's connection there, where that head does not answer.
"Loopback-only" is read from /proc/net/tcp: the port listens on loopback and on nothing else.
A head listening on every interface (Ray's default) is a cluster head that registered this
node under its external address, and is joined as Ray would.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import sys
from typing import Any

log = logging.getLogger("clipcurate.ray")

LOOPBACK = "127.0.0.1"
_LOCAL_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


class RayExposedError(RuntimeError):
    """A locally started Ray listens on an address other than loopback."""


def _will_start_local(address: str | None) -> bool:
    """True when ``ray.init(address)`` would start a new local instance rather than join one."""
    if address == "local":
        return True
    from ray._private import services

    try:
        return services.canonicalize_bootstrap_address(address) is None
    except Exception:  # an address Ray cannot parse: let ray.init report it
        return False


def _join_target(address: str | None) -> str | None:
    """The ``host:port`` that ``ray.init(address)`` would join, as written (before Ray's
    rewriting of loopback hosts); None when it would start a local Ray, for a Ray Client
    (``ray://``) address, or when none can be read without asking Ray to search."""
    from ray._private import services

    env = os.environ.get("RAY_ADDRESS") or None
    target = env or address
    if target in (None, "auto"):
        try:
            target = services.get_ray_address_from_environment(target, None)
        except Exception:  # nothing recorded: ray.init reports it
            return None
    if not target or target in ("local", "auto") or "://" in target:
        return None
    return target


def _loopback_only_head(target: str) -> bool:
    """``host:port`` (``[v6]:port`` too) names a loopback host, and on this machine that port
    listens on loopback addresses only (Linux /proc; False where it cannot be read)."""
    if ":" not in target:
        return False
    host, port_text = target.rsplit(":", 1)
    host = host.strip("[]")
    try:
        port = int(port_text)
        if host != "localhost" and not _is_loopback(host):
            return False
    except ValueError:  # a DNS name: where it points is the cluster's business
        return False
    from pipeline import proc_sockets

    hosts = [h for _, h, p in proc_sockets.listening_inodes().values() if p == port]
    return bool(hosts) and all(_is_loopback(h) for h in hosts)


def _local_only_mode() -> None:
    """Switch this process (and the Ray processes it starts, which inherit the environment)
    to Ray's local-only mode."""
    os.environ[_LOCAL_ONLY_ENV] = "0"
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray._private.ray_constants as ray_constants

    # Read once at import: the module constant must change too for this process.
    ray_constants.ENABLE_RAY_CLUSTER = False


def _is_loopback(host: str) -> bool:
    addr = ipaddress.ip_address(host)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


def exposed_listeners(root: int | None = None) -> list[str]:
    """Listening TCP sockets of process ``root`` (default: this one) and its descendants that
    are not on a loopback address, as ``"pid N (comm) host:port"``. Empty where /proc is
    missing (not Linux)."""
    if not os.path.isdir("/proc/self/fd"):
        return []
    from pipeline import proc_sockets

    return [
        str(s) for s in proc_sockets.listeners(proc_sockets.descendants(root or os.getpid()))
        if not _is_loopback(s.host)
    ]


def init_ray(address: str | None = None, **kwargs: Any) -> bool:
    """Connect to Ray once per process; returns True when this call started a local Ray.

    ``address``: a cluster to join (``host:port``, ``ray://...``, ``auto``); None joins
    ``$RAY_ADDRESS`` or a cluster recorded by ``ray start`` on this machine, else starts a
    loopback-only local Ray (see the module docstring). ``kwargs`` go to ``ray.init``
    (``num_cpus``, ``log_to_driver``, ``runtime_env`` ...); ``include_dashboard`` defaults to
    False for a local start. Raises :class:`RayExposedError` (after shutting the new Ray down)
    when a local start listens on a non-loopback address.
    """
    import ray

    if ray.is_initialized():
        return False
    target = _join_target(address)
    if target is not None and _loopback_only_head(target):
        # Before _will_start_local: canonicalising the address is where Ray rewrites it.
        _local_only_mode()
    if not _will_start_local(address):
        ray.init(address=address, **kwargs)
        return False
    _local_only_mode()
    kwargs.setdefault("include_dashboard", False)
    if kwargs.get("include_dashboard"):
        kwargs.setdefault("dashboard_host", LOOPBACK)
    ray.init(address="local" if address is None else address, _node_ip_address=LOOPBACK, **kwargs)
    exposed = exposed_listeners()
    if exposed:
        ray.shutdown()
        raise RayExposedError(
            "the local Ray listens on non-loopback addresses, refusing to run: " + "; ".join(exposed)
        )
    log.info("started a local Ray on %s only", LOOPBACK)
    return True


def main(argv: list[str] | None = None) -> int:
    """``python -m pipeline.ray_start``: start a local Ray the way the project does, print its
    listening sockets, stop it (a check an operator can run on a new machine or Ray release)."""
    from pipeline import proc_sockets

    init_ray(num_cpus=1)
    try:
        import ray

        @ray.remote
        def _pid() -> int:
            return os.getpid()

        ray.get([_pid.remote() for _ in range(2)])  # start workers: they listen too
        rows = proc_sockets.listeners(proc_sockets.descendants(os.getpid()))
        for row in rows:
            print(row, "" if _is_loopback(row.host) else "  <- NOT LOOPBACK")
        bad = [r for r in rows if not _is_loopback(r.host)]
        return 1 if bad else 0
    finally:
        import ray

        ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
