"""Malformed requests: one concise log line each, never a credential, and no flood.

Before the fix, aiohttp logged each one as an ERROR with a traceback whose text
quoted what the client sent: an over-long ``Authorization`` header put the first
~100 bytes of the bearer token in the log, and a flood of bad requests wrote a
traceback per request.
"""

from __future__ import annotations

import socket
from typing import Any

from tests.daemon import wait_for

TOKEN = "s3cr3t-bearer-token-"


def _send(port: int, raw: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(raw)
        return s.recv(200)


def test_malformed_requests_log_one_line_without_the_credential(daemons: Any) -> None:
    d = daemons()
    start = len(d.log())
    long_auth = b"Authorization: Bearer " + TOKEN.encode() * 600
    reply = _send(
        d.port, b"GET /v1/batches HTTP/1.1\r\nHost: 127.0.0.1\r\n" + long_auth + b"\r\n\r\n"
    )
    assert reply.startswith(b"HTTP/1.") and b" 400 " in reply, reply
    wait_for(lambda: "api.bad_request" in d.log()[start:], 10, 0.05, "the bad request logged")
    log = d.log()[start:]
    assert TOKEN not in log, log
    assert "Traceback" not in log and "ERROR" not in log, log
    assert "api.bad_request peer=127.0.0.1 error=LineTooLong" in log, log

    # A flood: at most a window's worth of lines, and the rest counted.
    for _ in range(60):
        _send(d.port, b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    status, _, _ = d.api("GET", "/healthz")
    assert status == 200
    lines = [ln for ln in d.log()[start:].splitlines() if "api.bad_request" in ln]
    assert 2 <= len(lines) <= 12, len(lines)
    assert "Traceback" not in d.log()[start:]
