"""A client that closes its event stream is not an error. Failed before the fix:
every disconnected SSE client (a closed dashboard tab) was logged as ERROR with
a traceback (``api.internal_error``)."""

from __future__ import annotations

import socket
from typing import Any

from tests.daemon import wait_for


def test_closed_event_stream_is_not_logged_as_an_error(daemons: Any) -> None:
    d = daemons()
    b = d.submit("echo", [{"sleep": 0.5}, {"sleep": 1.0}, {"sleep": 1.5}])
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", d.port), timeout=10) as sock:
            sock.sendall(
                f"GET /v1/batches/{b['id']}/events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
            )
            got = b""
            while b"event: snapshot" not in got:
                chunk = sock.recv(65536)
                assert chunk, got
                got += chunk
    d.wait_status(b["id"], "completed", timeout=20)
    # the streams noticed the closed sockets when they wrote the next change
    wait_for(lambda: d.batch(b["id"])["status"] == "completed", timeout=5)
    log = d.log()
    assert "api.internal_error" not in log and "Traceback" not in log, log[-3000:]
