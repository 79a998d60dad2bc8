"""The download's connection store: what it keeps, how much, and what it refuses to reuse."""

from __future__ import annotations

import ipaddress
import socket
import ssl
import threading
import time
from collections.abc import Iterator

import pytest

from pipeline.http_pool import ConnectFailed, ConnectionPool, tls_context
from testkit.http_server import FaultServer

LOOPBACK = ipaddress.ip_address("127.0.0.1")


@pytest.fixture(scope="module")
def server() -> Iterator[FaultServer]:
    with FaultServer(files={"/a.txt": b"hello"}) as srv:
        yield srv


def _get(pool: ConnectionPool, server: FaultServer, host: str = "a.test"):  # noqa: ANN202
    conn = pool.get(LOOPBACK, server.port, "http", host, 5.0)
    conn.request("GET", "/a.txt", headers={"Host": host})
    resp = conn.getresponse()
    assert resp.read() == b"hello" and resp.isclosed()
    return conn


def test_idle_connections_are_kept_up_to_the_per_host_bound(server: FaultServer) -> None:
    pool = ConnectionPool(per_key=2)
    try:
        held = [_get(pool, server) for _ in range(3)]  # three at once: three connections
        assert pool.connects == 3
        for conn in held:
            pool.put(conn)
        assert held[2].sock is None  # the third was closed, not kept
        server.reset_log()
        again = [_get(pool, server) for _ in range(3)]
        assert pool.connects == 4  # two kept ones reused, one new
        assert {c.sock.getsockname()[1] for c in again[:2]} == {c.live_sock.getsockname()[1] for c in held[:2]}
    finally:
        pool.clear()


def test_connections_above_descriptor_1024_are_reused(server: FaultServer, descriptors_past_1024: None) -> None:
    # select() cannot watch descriptors >= 1024; a busy worker's sockets get there.
    pool = ConnectionPool(per_key=1)
    try:
        for _ in range(3):
            conn = _get(pool, server)
            assert conn.sock.fileno() > 1024
            pool.put(conn)
        assert pool.connects == 1
    finally:
        pool.clear()


def test_least_recently_used_host_is_forgotten_beyond_max_keys(server: FaultServer) -> None:
    pool = ConnectionPool(per_key=4, max_keys=2)
    try:
        for host in ("a.test", "b.test", "c.test"):
            conn = _get(pool, server, host)
            pool.put(conn)
        before = pool.connects
        for host in ("b.test", "c.test"):  # kept
            pool.put(_get(pool, server, host))
        assert pool.connects == before
        _get(pool, server, "a.test")  # evicted: a new connection
        assert pool.connects == before + 1
    finally:
        pool.clear()


def test_idle_connections_in_all_are_bounded_oldest_hosts_first(server: FaultServer) -> None:
    pool = ConnectionPool(per_key=2, max_keys=10, max_idle=3)
    try:
        for host in ("a.test", "b.test"):
            held = [_get(pool, server, host) for _ in range(2)]
            for conn in held:
                pool.put(conn)
        # a.test's first connection went when b.test's second came: three kept
        assert sorted(len(v) for v in pool._idle.values()) == [1, 2]
        assert sum(c.sock is not None for v in pool._idle.values() for c in v) == 3
        before = pool.connects
        pool.put(_get(pool, server, "a.test"))  # reuses a.test's last, then keeps it again
        pool.put(_get(pool, server, "b.test"))
        assert pool.connects == before
        # a kept connection checked out leaves its key empty; the bound still holds after
        out = _get(pool, server, "a.test")
        for host in ("c.test", "d.test"):
            pool.put(_get(pool, server, host))
        pool.put(out)
        assert sum(len(v) for v in pool._idle.values()) == 3
    finally:
        pool.clear()


def test_default_idle_bound_is_a_quarter_of_the_descriptor_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    import resource

    from pipeline import http_pool

    limits = {"soft": 1024}
    monkeypatch.setattr(http_pool.resource, "getrlimit", lambda _what: (limits["soft"], resource.RLIM_INFINITY))
    assert http_pool.default_max_idle(8, 256) == 256  # not 2,048 sockets under a limit of 1,024
    assert ConnectionPool(per_key=8).max_idle == 256
    limits["soft"] = 20
    assert http_pool.default_max_idle(8, 256) == 8  # at least one host's worth
    limits["soft"] = 1 << 20
    assert http_pool.default_max_idle(8, 256) == 2048
    limits["soft"] = resource.RLIM_INFINITY
    assert http_pool.default_max_idle(8, 256) == 2048


def test_a_connection_the_server_closed_is_not_reused() -> None:
    # A server that answers one request per connection as keep-alive, then hangs up (an idle
    # timeout, a restart): the kept connection is found dead before a request is sent on it.
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    hung_up = threading.Event()

    def serve() -> None:
        for _ in range(2):
            conn, _ = listener.accept()
            with conn:
                while b"\r\n\r\n" not in conn.recv(65536):
                    pass
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
            hung_up.set()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    pool = ConnectionPool(per_key=2)
    try:
        for round_ in range(2):
            conn = pool.get(LOOPBACK, port, "http", "a.test", 5.0)
            conn.request("GET", "/", headers={"Host": "a.test"})
            resp = conn.getresponse()
            assert resp.read() == b"hello" and resp.isclosed(), round_
            assert hung_up.wait(5)
            time.sleep(0.05)  # the server's FIN reaches this side
            hung_up.clear()
            pool.put(conn)
        assert pool.connects == 2
    finally:
        pool.clear()
        listener.close()
        thread.join(5)


def test_refused_connection_is_a_connect_failure() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ConnectFailed, match=f"port {port}"):
        ConnectionPool(per_key=1).get(LOOPBACK, port, "http", "a.test", 5.0)


def test_tls_context_verifies_names_and_refuses_old_protocols() -> None:
    ctx = tls_context(None)
    assert ctx.check_hostname and ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.minimum_version >= ssl.TLSVersion.TLSv1_2
