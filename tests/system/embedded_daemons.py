"""Daemons that run on an embedded server of their own data directory."""

from __future__ import annotations

import pathlib
from typing import Any

from tests.conftest import DaemonFactory
from tests.daemon import Daemon


def start_embedded(daemons: DaemonFactory, name: str, data_dir: pathlib.Path, **kw: Any) -> Daemon:
    """Start (without waiting) a daemon whose database is the embedded server in ``data_dir``."""
    extra = {"embedded": {"data_dir": str(data_dir)}} | kw.pop("extra", {})
    d = daemons(name, start=False, env={"BATCH_SUPERVISOR_DATABASE_URL": ""}, extra=extra, **kw)
    return d.start(wait=False)


def completes_a_batch(d: Daemon, timeout: float = 60) -> None:
    """The daemon still does work: a small batch completes."""
    batch = d.submit("echo", [1, 2, 3])
    assert d.wait_status(batch["id"], "completed", timeout=timeout)["counts"]["succeeded"] == 3
