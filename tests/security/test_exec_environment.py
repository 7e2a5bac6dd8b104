"""Exec children get a minimal environment. Failed before the fix: they
inherited the daemon's whole environment, including the database URL with its
password and any cloud keys or tokens the daemon was started with."""

from __future__ import annotations

import pathlib
import sys
import textwrap
from typing import Any

from tests.daemon import DEFAULT_HANDLERS
from tests.test_handlers_exec import AS_ROOT


def test_exec_child_sees_only_the_minimal_and_named_environment(
    daemons: Any, tmp_path: pathlib.Path, monkeypatch: Any
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "do-not-leak")
    monkeypatch.setenv("BSV_TEST_PASSED", "passed-on")
    script = tmp_path / "env.py"
    script.write_text(
        textwrap.dedent(
            """
            import json, os, sys
            json.dump(dict(os.environ), sys.stdout)
            """
        )
    )
    handlers = dict(DEFAULT_HANDLERS) | {
        "env": {
            "type": "exec",
            "command": [sys.executable, str(script)],
            "env": {"APP_MODE": "batch"},
            "pass_env": ["BSV_TEST_PASSED"],
            **AS_ROOT,
        }
    }
    d = daemons(handlers=handlers)
    b = d.submit("env", [1])
    d.wait_status(b["id"], "completed", timeout=20)
    (item,) = d.items(b["id"])
    env = item["result"]
    assert "AWS_SECRET_ACCESS_KEY" not in env
    assert "BATCH_SUPERVISOR_DATABASE_URL" not in env
    assert env["APP_MODE"] == "batch" and env["BSV_TEST_PASSED"] == "passed-on"
    assert {"PATH", "LANG", "HOME", "BSV_ITEM_ID", "BSV_ATTEMPT"} <= set(env)
    assert (
        not set(env)
        - {"PATH", "LANG", "HOME", "TZ", "APP_MODE", "BSV_TEST_PASSED"}
        - {k for k in env if k.startswith("BSV_")}
    )
