"""Internals are not disclosed to whoever can reach the API.

Before the fix, any read token (any tenant) listed every daemon's host and pid,
and the public /readyz quoted the database driver's error (the database's host,
port and role) to anyone.
"""

from __future__ import annotations

from typing import Any

from tests.daemon import request, wait_for
from tests.pgharness import free_port, with_database
from tests.test_api import TOKENS, sha256hex


def test_the_worker_list_is_for_admin_tokens(daemons: Any) -> None:
    tokens = [
        {"name": "r", "tenant": "A", "sha256": sha256hex(TOKENS["R"]), "scopes": ["read"]},
        {"name": "ops", "tenant": "ops", "sha256": sha256hex("ops-token"), "scopes": ["admin"]},
    ]
    d = daemons(extra={"auth": {"tokens": tokens}})
    status, body, _ = d.api(
        "GET", "/v1/workers", headers={"Authorization": f"Bearer {TOKENS['R']}"}
    )
    assert status == 403 and "admin" in body["detail"], (status, body)
    status, body, _ = d.api("GET", "/v1/workers", headers={"Authorization": "Bearer ops-token"})
    assert status == 200 and body["workers"][0]["pid"] == d.pid, body


def test_readyz_does_not_quote_the_database_error(daemons: Any) -> None:
    port = free_port()  # nothing listens: the database is unreachable
    url = with_database(f"postgresql://secretrole@127.0.0.1:{port}/postgres", "postgres")
    d = daemons("early", start=False, env={"BATCH_SUPERVISOR_DATABASE_URL": url})
    d.start(wait=False)

    def answer() -> Any:
        try:
            status, body, _ = request("GET", d.url + "/readyz", timeout=2)
        except OSError:
            return None
        return body if status == 503 else None

    body = wait_for(answer, 30, 0.1, "readyz 503")
    text = str(body)
    assert str(port) not in text and "secretrole" not in text, body
