"""Slow and idle clients cannot hold the API. Each test failed before the fix:
with no connection cap, ~1,100 idle sockets (the unit's open-file limit was 1024)
stopped accept() and the heartbeats; with no read timeouts, a client sending its
request head or body a byte at a time kept its socket for an hour."""

from __future__ import annotations

import socket
import time
from typing import Any

from tests.daemon import wait_for


def connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    return s


def closed_by_server(s: socket.socket, budget: float) -> tuple[bool, bytes]:
    """Read until the server closes the connection (True) or ``budget`` runs out."""
    s.settimeout(0.2)
    data = b""
    deadline = time.monotonic() + budget
    while time.monotonic() < deadline:
        try:
            chunk = s.recv(4096)
        except TimeoutError:
            continue
        except ConnectionResetError:
            return True, data
        if not chunk:
            return True, data
        data += chunk
    return False, data


def test_connections_beyond_the_cap_get_503_and_are_closed(daemons: Any) -> None:
    d = daemons(extra={"server": {"max_connections": 8}})
    idle = [connect(d.port) for _ in range(8)]
    try:
        extra = [connect(d.port) for _ in range(5)]
        for s in extra:
            closed, data = closed_by_server(s, 5.0)
            assert closed and data.startswith(b"HTTP/1.1 503"), data
            s.close()
    finally:
        for s in idle:
            s.close()
    # once the idle ones are gone, the API answers again
    wait_for(lambda: d.api("GET", "/healthz")[0] == 200, 10, 0.1)
    assert "api.connections_full cap=8" in d.log()
    assert "max_connections=8 " in d.log()  # the effective cap is logged at start


def test_a_request_head_sent_slowly_is_cut_off(daemons: Any) -> None:
    d = daemons(extra={"server": {"read_timeout": "1s"}})
    s = connect(d.port)
    started = time.monotonic()
    try:
        s.sendall(b"GET /healthz HTTP/1.1\r\n")
        for _ in range(30):  # a header byte every 0.2 s: never a whole head
            try:
                s.sendall(b"X")
            except (BrokenPipeError, ConnectionResetError):
                break
            closed, _ = closed_by_server(s, 0.2)
            if closed:
                break
        else:
            raise AssertionError("the server kept a slowloris connection for 6 s")
    finally:
        s.close()
    assert time.monotonic() - started < 5


def test_a_body_sent_slowly_gets_408(daemons: Any) -> None:
    d = daemons(extra={"server": {"read_timeout": "1s"}})
    s = connect(d.port)
    try:
        s.sendall(
            b"POST /v1/batches HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
            b'Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"handler"' % d.port
        )
        _, data = closed_by_server(s, 8.0)
    finally:
        s.close()
    assert data.startswith(b"HTTP/1.1 408"), data
    assert b"read_timeout" in data
    code, body, _ = d.api("GET", "/v1/batches")
    assert code == 200 and body["batches"] == [], body  # nothing half-written
