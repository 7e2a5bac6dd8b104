"""A daemon started as root does not quietly run an operator's python handler as
root. A python handler runs inside the daemon, so before the fix a root daemon
(README's first command, run by root) ran every such function as root on payloads
of whoever can submit. Now it refuses to start (exit 78) and names the ways out,
unless the handler's ``user = "root"`` says that is intended. Handlers shipped in
the ``supervisor`` package (the examples) are the daemon's own code and run."""

from __future__ import annotations

import os
import pathlib
from typing import Any

import pytest

from tests.daemon import Daemon

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root: the refusal is for a daemon started as root"
)


def check(tmp_path: pathlib.Path, handlers: dict[str, Any]) -> Any:
    d = Daemon(tmp_path, "postgresql://unused", handlers=handlers)
    return d.cli("check", "--config", str(d.config_path))


def test_an_operators_python_handler_is_refused_as_root(tmp_path: pathlib.Path) -> None:
    mine = {"type": "python", "target": "tests.handlers:echo", "user": ""}
    proc = check(tmp_path, {"mine": mine})
    assert proc.returncode == 78, proc
    assert "handler 'mine': this daemon runs as root" in proc.stderr
    assert 'handlers.mine.user = "root"' in proc.stderr


def test_a_python_handler_cannot_name_another_account(tmp_path: pathlib.Path) -> None:
    mine = {"type": "python", "target": "tests.handlers:echo", "user": "nobody"}
    proc = check(tmp_path, {"mine": mine})
    assert proc.returncode == 78, proc
    assert "handlers.mine.user: a python handler runs inside the daemon" in proc.stderr


def test_root_said_explicitly_and_the_shipped_examples_run(daemons: Any) -> None:
    handlers = {
        "mine": {"type": "python", "target": "tests.handlers:echo", "user": "root"},
        "example": {"type": "python", "target": "supervisor.examples:echo", "user": ""},
    }
    d = daemons(handlers=handlers)
    for name in handlers:
        b = d.submit(name, [{"n": 1}])
        d.wait_status(b["id"], "completed", timeout=20)
