"""Which addresses a tree of processes listens on, read from /proc (Linux only; no Ray import).

``/proc/net/tcp`` and ``/proc/net/tcp6`` list every socket of the network namespace with its
inode; ``/proc/<pid>/fd/*`` links name the inodes (``socket:[12345]``) a process holds. Joining
the two gives the listening sockets of exactly the processes asked about, without ``ss`` and
without root.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path

_TCP_LISTEN = "0A"


@dataclass(frozen=True, order=True)
class Listener:
    """One listening TCP socket: the process holding it and its local address."""

    pid: int
    comm: str
    family: str  # "tcp" or "tcp6"
    host: str
    port: int

    @property
    def loopback(self) -> bool:
        """True for 127.0.0.0/8, ::1 and IPv4-mapped loopback; False for wildcards."""
        addr = ipaddress.ip_address(self.host)
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        return addr.is_loopback

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"pid {self.pid} ({self.comm}) {self.family} {host}:{self.port}"


def _decode_addr(hex_addr: str, family: str) -> tuple[str, int]:
    host_hex, port_hex = hex_addr.split(":")
    raw = bytes.fromhex(host_hex)
    if family == "tcp":
        host = socket.inet_ntop(socket.AF_INET, struct.pack("<I", struct.unpack(">I", raw)[0]))
    else:
        # Four host-order 32-bit words.
        words = struct.unpack(">4I", raw)
        host = socket.inet_ntop(socket.AF_INET6, struct.pack("<4I", *words))
    return host, int(port_hex, 16)


def listening_inodes() -> dict[int, tuple[str, str, int]]:
    """inode -> (family, host, port) of every TCP socket in LISTEN state in this namespace."""
    out: dict[int, tuple[str, str, int]] = {}
    for family in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/net/{family}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if len(f) > 9 and f[3] == _TCP_LISTEN:
                host, port = _decode_addr(f[1], family)
                out[int(f[9])] = (family, host, port)
    return out


def descendants(root: int) -> set[int]:
    """``root`` and every live process below it (by parent pid)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found, todo = set(), [root]
    while todo:
        pid = todo.pop()
        if pid in found:
            continue
        found.add(pid)
        todo.extend(children.get(pid, ()))
    return found


def listeners(pids: set[int]) -> list[Listener]:
    """Listening TCP sockets held by ``pids`` (processes that exit meanwhile are skipped)."""
    table = listening_inodes()
    rows: set[Listener] = set()
    for pid in pids:
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inode = int(target[len("socket:[") : -1])
                if inode in table:
                    rows.add(Listener(pid, comm, *table[inode]))
    return sorted(rows)


class ListenerWatch:
    """Samples the listening sockets of a process tree every ``interval`` s in a thread,
    from :meth:`start` until :meth:`stop`; ``seen`` accumulates every one found."""

    def __init__(self, root: int, interval: float = 0.2) -> None:
        self.root = root
        self.interval = interval
        self.seen: set[Listener] = set()
        self.pids: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            pids = descendants(self.root)
            self.pids |= pids
            self.seen.update(listeners(pids))
            time.sleep(self.interval)

    def start(self) -> ListenerWatch:
        self._thread.start()
        return self

    def stop(self) -> set[Listener]:
        self._stop.set()
        self._thread.join()
        return self.seen
