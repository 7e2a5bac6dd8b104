"""Handler tracebacks go to admins only. Failed before the fix: every read-scope
client (API, SSE, dashboard) got the traceback tail of every failed attempt:
source lines, paths, and whatever secret sits on the failing line."""

from __future__ import annotations

import hashlib
from typing import Any

from tests.daemon import wait_for

TOKENS = {"reader": "reader-token-xyz", "admin": "admin-token-xyz"}


def sha(t: str) -> str:
    return hashlib.sha256(t.encode()).hexdigest()


def test_tracebacks_only_for_admin(daemons: Any) -> None:
    d = daemons(
        extra={
            "auth": {
                "tokens": [
                    {
                        "name": "r",
                        "tenant": "A",
                        "sha256": sha(TOKENS["reader"]),
                        "scopes": ["read", "write"],
                    },
                    {
                        "name": "a",
                        "tenant": "ops",
                        "sha256": sha(TOKENS["admin"]),
                        "scopes": ["admin"],
                    },
                ]
            }
        }
    )
    reader = {"Authorization": f"Bearer {TOKENS['reader']}"}
    admin = {"Authorization": f"Bearer {TOKENS['admin']}"}
    code, b, _ = d.api("POST", "/v1/batches", {"handler": "permanent", "items": [1]}, reader)
    assert code == 201, b

    def failed() -> Any:
        _, body, _ = d.api("GET", f"/v1/batches/{b['id']}", headers=reader)
        return body["status"] == "failed"

    wait_for(failed, timeout=20, what="the batch to fail")
    code, page, _ = d.api("GET", f"/v1/batches/{b['id']}/items", headers=reader)
    (item,) = page["items"]
    assert item["error"]["type"] == "PermanentError" and item["error"]["message"]
    assert item["error"]["traceback"] is None
    code, full, _ = d.api("GET", f"/v1/items/{item['id']}", headers=reader)
    assert [e["traceback"] for e in full["errors"]] == [None]
    code, full, _ = d.api("GET", f"/v1/items/{item['id']}", headers=admin)
    assert code == 200 and "Traceback" in full["errors"][0]["traceback"]
