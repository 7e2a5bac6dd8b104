"""SSE streams are capped, in all and per token, and answer 429 beyond.

Before the fix one read-only token could open any number of streams (400 made
a 2,000-item batch take 53 s instead of 3 s: they shared the dispatcher's
database pool, which the API no longer uses either).
"""

from __future__ import annotations

import http.client
import json
from typing import Any

from tests.daemon import wait_for
from tests.test_api import sha256hex


def _open(d: Any, batch_id: str, token: str) -> tuple[int, http.client.HTTPConnection, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=10)
    conn.request(
        "GET", f"/v1/batches/{batch_id}/events", headers={"Authorization": f"Bearer {token}"}
    )
    resp = conn.getresponse()
    if resp.status == 200:
        resp.readline()  # the first snapshot's first line: the stream is open
    return resp.status, conn, resp


def test_streams_are_capped_per_token_and_in_all(daemons: Any) -> None:
    tokens = [
        {"name": n, "tenant": "T", "sha256": sha256hex(f"tok-{n}"), "scopes": ["read", "write"]}
        for n in ("a", "b", "c")
    ]
    d = daemons(
        extra={
            "auth": {"tokens": tokens},
            "server": {"max_streams": 3, "max_streams_per_token": 2},
        }
    )
    headers = {"Authorization": "Bearer tok-a"}
    status, batch, _ = d.api("POST", "/v1/batches", {"handler": "sleeper", "items": [{}]}, headers)
    assert status == 201
    opened = []
    try:
        for token in ("tok-a", "tok-a"):
            status, conn, _ = _open(d, batch["id"], token)
            assert status == 200
            opened.append(conn)
        status, conn, resp = _open(d, batch["id"], "tok-a")  # a third for one token
        body = json.loads(resp.read())
        conn.close()
        assert status == 429 and "this token has 2 event streams" in body["detail"], body
        assert resp.getheader("Retry-After") == "5"
        status, conn, _ = _open(d, batch["id"], "tok-b")
        assert status == 200
        opened.append(conn)
        status, conn, resp = _open(d, batch["id"], "tok-c")  # three open in all
        body = json.loads(resp.read())
        conn.close()
        assert status == 429 and "too many event streams" in body["detail"], body
        # The work itself goes on while the streams are open.
        status, small, _ = d.api(
            "POST", "/v1/batches", {"handler": "echo", "items": [1, 2]}, headers
        )
        assert status == 201

        def completed() -> bool:
            code, b, _ = d.api("GET", f"/v1/batches/{small['id']}", headers=headers)
            return bool(code == 200 and b["status"] == "completed")

        wait_for(completed, 20, 0.05, "the small batch to complete")
    finally:
        for c in opened:
            c.close()
