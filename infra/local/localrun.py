"""Process and socket bookkeeping for the local cluster scripts (up.sh, down.sh,
check_loopback.sh). Standard library only, Linux only (reads /proc, runs ``ss``).

Every process the scripts start runs in a session of its own (setsid) and carries
``CLIPCURATE_LOCAL_RUN=<run dir>`` in its environment, which what it starts inherits (Ray's
gcs_server, raylet, dashboard, job drivers). "The processes of a run" is therefore a property of
the processes themselves (see :func:`run_pids`): it survives a lost or stale state file, and an
unrelated program that reuses a recorded pid is not mistaken for part of the run.

    python localrun.py free-ports N          N distinct free TCP ports on 127.0.0.1, one a line
    python localrun.py pids RUN_DIR          pids of the run's processes, one a line
    python localrun.py listeners RUN_DIR     their listening sockets: pid comm proto addr port
    python localrun.py check RUN_DIR         like listeners; exit 1 if any is not on loopback
    python localrun.py wait-http URL [S]     poll URL until it answers any HTTP status (S s)
    python localrun.py wait-listening S P..  wait up to S s until TCP ports P.. are listening
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

MARKER = "CLIPCURATE_LOCAL_RUN"


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports the kernel calls free on 127.0.0.1 (all bound at once, then
    released, so they are distinct). Another process may take one before it is used;
    the caller's bind then fails loudly rather than silently moving elsewhere."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _stat(pid: str) -> tuple[int, int] | None:
    """(ppid, session id) of ``pid`` from /proc/<pid>/stat, or None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm (field 2) is in parentheses and may itself contain spaces or parentheses.
    rest = stat[stat.rindex(")") + 2 :].split()
    return int(rest[1]), int(rest[3])


def run_pids(run_dir: str) -> list[int]:
    """Pids of the run: processes whose environment holds ``CLIPCURATE_LOCAL_RUN=<run_dir>``,
    every process in the same session as one of them, and all their descendants (this
    process excluded).

    The marker alone is not enough: Ray's agents and workers rename themselves (``ray::...``)
    with setproctitle, which overwrites the memory /proc/<pid>/environ shows. They stay in the
    session of the ``ray start`` that up.sh ran under setsid, and are children of the raylet.
    """
    want = f"{MARKER}={os.path.realpath(run_dir)}".encode()
    me = os.getpid()
    own_session = os.getsid(0)
    marked: set[int] = set()
    info: dict[int, tuple[int, int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        st = _stat(entry.name)
        if st is None:
            continue
        pid = int(entry.name)
        info[pid] = st
        try:
            env = (entry / "environ").read_bytes()
        except OSError:  # exited meanwhile, or a kernel thread
            continue
        if want in env.split(b"\0"):
            marked.add(pid)
    # Never the caller's own session, nor the caller and its ancestors: a marked process
    # started without setsid (by mistake) must not make this return the invoking shell.
    sessions = {info[p][1] for p in marked} - {own_session}
    found = marked | {p for p, (_, sid) in info.items() if sid in sessions}
    # Descendants, in case one started a session of its own.
    grew = True
    while grew:
        more = {p for p, (ppid, _) in info.items() if ppid in found and p not in found}
        found |= more
        grew = bool(more)
    pid = os.getppid()
    ancestors = {me, pid}
    while pid in info and pid > 1:
        pid = info[pid][0]
        ancestors.add(pid)
    return sorted(found - ancestors)


def listening_ports() -> set[int]:
    """TCP ports with a socket in LISTEN state on any address (from /proc/net/tcp{,6})."""
    ports = set()
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(name).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "0A":  # TCP_LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def wait_listening(ports: set[int], timeout: float) -> set[int]:
    """Wait until every port in ``ports`` is listening; returns those that are not after
    ``timeout`` s (empty set on success)."""
    deadline = time.monotonic() + timeout
    while True:
        missing = ports - listening_ports()
        if not missing or time.monotonic() >= deadline:
            return missing
        time.sleep(0.2)


_SS_PID = re.compile(r"pid=(\d+)")


def _split_host_port(local: str) -> tuple[str, str]:
    host, _, port = local.rpartition(":")
    host = host.strip("[]")
    host = host.split("%", 1)[0]  # drop an interface scope such as fe80::1%eth0
    return host, port


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and IPv4-mapped loopback (::ffff:127.x.y.z); False for
    wildcards (0.0.0.0, ::, *) and everything else."""
    if host in ("*", ""):
        return False
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


def listeners(pids: set[int]) -> list[tuple[int, str, str, str, str]]:
    """Listening TCP and bound UDP sockets of ``pids`` as (pid, comm, proto, host, port),
    read from ``ss -Hltunp``."""
    out = subprocess.run(["ss", "-Hltunp"], check=True, capture_output=True, text=True).stdout
    rows = []
    for line in out.splitlines():
        fields = line.split()
        if len(fields) < 6:
            continue
        proto, local, users = fields[0], fields[4], " ".join(fields[6:])
        host, port = _split_host_port(local)
        for pid in {int(p) for p in _SS_PID.findall(users)} & pids:
            try:
                comm = Path(f"/proc/{pid}/comm").read_text().strip()
            except OSError:
                comm = "?"
            rows.append((pid, comm, proto, host, port))
    return sorted(rows)


def wait_http(url: str, timeout: float) -> bool:
    """Poll ``url`` (no proxy) until any HTTP answer arrives; False after ``timeout`` s."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with opener.open(url, timeout=5) as resp:
                resp.read()
            return True
        except urllib.error.HTTPError:
            return True
        except OSError:
            time.sleep(0.2)
    return False


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    cmd, args = argv[1], argv[2:]
    if cmd == "free-ports":
        for port in free_ports(int(args[0])):
            print(port)
        return 0
    if cmd == "pids":
        for pid in run_pids(args[0]):
            print(pid)
        return 0
    if cmd in ("listeners", "check"):
        pids = set(run_pids(args[0]))
        if not pids:
            print(f"no running process belongs to run {args[0]}", file=sys.stderr)
            return 1
        rows = listeners(pids)
        bad = [r for r in rows if not is_loopback(r[3])]
        for pid, comm, proto, host, port in rows:
            flag = "" if is_loopback(host) else "   <-- NOT LOOPBACK"
            print(f"{pid:>8} {comm:<16} {proto:<4} {host}:{port}{flag}")
        if cmd == "check":
            print(
                f"{len(pids)} processes, {len(rows)} listening sockets, {len(bad)} not on loopback",
                file=sys.stderr,
            )
            return 1 if bad else 0
        return 0
    if cmd == "wait-listening":
        missing = wait_listening({int(p) for p in args[1:]}, float(args[0]))
        if missing:
            print(f"ports not listening after {args[0]} s: {sorted(missing)}", file=sys.stderr)
        return 1 if missing else 0
    if cmd == "wait-http":
        return 0 if wait_http(args[0], float(args[1]) if len(args) > 1 else 60.0) else 1
    print(f"unknown command {cmd!r}\n{__doc__}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
