"""A daemon started as root does not run exec commands as root. Before the fix
every command (fed payloads of whoever can submit) ran as root: this test saw
uid 0. Now they run as ``batch-supervisor-run`` unless the handler's ``user``
says otherwise, and "root" has to be said explicitly."""

from __future__ import annotations

import os
import pathlib
import pwd
from typing import Any

import pytest

from tests.daemon import DEFAULT_HANDLERS, Daemon

RUN_ACCOUNT = "batch-supervisor-run"
pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root: only a daemon started as root switches accounts"
)


def run_id(d: Any, handler: str) -> Any:
    b = d.submit(handler, [1])
    d.wait_status(b["id"], "completed", timeout=20)
    (item,) = d.items(b["id"])
    return item["result"]


def test_commands_run_unprivileged_unless_root_is_named(daemons: Any) -> None:
    handlers = DEFAULT_HANDLERS | {
        "who": {"type": "exec", "command": ["id", "-u"]},
        "who_root": {"type": "exec", "command": ["id", "-u"], "user": "root"},
    }
    d = daemons(handlers=handlers)
    uid = pwd.getpwnam(RUN_ACCOUNT).pw_uid
    assert uid != 0
    assert run_id(d, "who") == uid
    assert run_id(d, "who_root") == 0
    assert f"exec.run_as handler=who account={RUN_ACCOUNT}" in d.log()


def test_a_command_the_run_account_cannot_reach_is_refused_naming_the_field(
    tmp_path: pathlib.Path,
) -> None:
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    tool = private / "tool.sh"
    tool.write_text("#!/bin/sh\necho ok\n")
    tool.chmod(0o755)
    handlers = {"tool": {"type": "exec", "command": [str(tool)]}}
    d = Daemon(tmp_path, "postgresql://unused", handlers=handlers)
    proc = d.cli("check", "--config", str(d.config_path))
    assert proc.returncode == 78, proc
    assert "handlers.tool.command: account batch-supervisor-run cannot execute" in proc.stderr
    assert "handlers.tool.user" in proc.stderr
