"""A token runs only the handlers it is granted.

Before the fix any write token could submit to any handler (an exec handler
running commands as the daemon), and name any handler as on_complete: a
tenant's token made a privileged webhook handler call out with that handler's
Authorization header and a valid signature.
"""

from __future__ import annotations

from typing import Any

import pytest

from supervisor import config
from supervisor.errors import ConfigError
from tests.daemon import DEFAULT_HANDLERS
from tests.test_api import sha256hex

GRANTED = "granted-token"
FULL = "ungranted-token"


def test_a_token_is_held_to_its_handlers(daemons: Any) -> None:
    tokens = [
        {
            "name": "app",
            "tenant": "A",
            "sha256": sha256hex(GRANTED),
            "scopes": ["read", "write"],
            "handlers": ["echo", "cb_records"],
        },
        {"name": "all", "tenant": "B", "sha256": sha256hex(FULL), "scopes": ["read", "write"]},
    ]
    d = daemons(extra={"auth": {"tokens": tokens}})
    granted = {"Authorization": f"Bearer {GRANTED}"}

    def submit(body: dict[str, Any], headers: dict[str, str]) -> tuple[int, Any]:
        status, out, _ = d.api("POST", "/v1/batches", body, headers)
        return status, out

    status, body = submit({"handler": "sleeper", "items": [1]}, granted)
    assert status == 403 and body["detail"] == (
        "handler: this token may not use handler 'sleeper'"
    ), body
    status, body = submit({"handler": "echo", "items": [1], "on_complete": "cb_raises"}, granted)
    assert status == 403 and "on_complete" in body["detail"] and "cb_raises" in body["detail"]
    status, _ = submit({"handler": "echo", "items": [1], "on_complete": "cb_records"}, granted)
    assert status == 201
    # Nothing was created by the refused requests.
    status, page, _ = d.api("GET", "/v1/batches", headers=granted)
    assert status == 200 and len(page["batches"]) == 1, page
    # A token without a grant list keeps every handler.
    status, _ = submit(
        {"handler": "sleeper", "items": [{"sleep": 0}]}, {"Authorization": f"Bearer {FULL}"}
    )
    assert status == 201


def test_a_grant_must_name_configured_handlers() -> None:
    with pytest.raises(ConfigError) as exc:
        config.from_mapping(
            {
                "auth": {
                    "tokens": [
                        {"name": "x", "sha256": "a" * 64, "scopes": ["write"], "handlers": ["nope"]}
                    ]
                },
                "handlers": {"echo": DEFAULT_HANDLERS["echo"]},
            }
        )
    assert "auth.tokens[0].handlers: no handler 'nope'" in exc.value.problems
