"""A process an exec command starts in a new session does not outlive the attempt.
Killing the attempt's process group missed children that called ``setsid`` (a
daemonizing double fork does the same): before the fix this test's child was
still running after its attempt had completed. The attempt's token in the
environment found those, but not one that also cleared its environment: where
the daemon may make cgroups, each attempt's own cgroup holds that one too."""

from __future__ import annotations

import pathlib
from typing import Any

import pytest

from supervisor.handlers import cgroups
from tests.daemon import wait_for
from tests.test_handlers_exec import TERMINAL, alive, exec_handler, kill_leftovers, script

LEAVES_A_SESSION = """
import json, subprocess, sys
child = subprocess.Popen(
    [sys.executable, "-c", "import time; time.sleep(120)"],
    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    start_new_session=True,  # its own session and process group: setsid
    env=ENV,
)
print(json.dumps({"child": child.pid}))
"""


def leaves_a_session(env: str) -> str:
    return LEAVES_A_SESSION.replace("ENV", env)


def test_a_child_in_its_own_session_dies_with_the_attempt(
    daemons: Any, tmp_path: pathlib.Path
) -> None:
    body = leaves_a_session("None")  # inherits the attempt's token
    d = daemons(handlers={"run": exec_handler(script(tmp_path, "session", body))})
    b = d.submit("run", [1])
    assert d.wait_status(b["id"], TERMINAL)["status"] == "completed"
    (item,) = d.items(b["id"])
    child = int(item["result"]["child"])
    try:
        wait_for(lambda: not alive(child), 10, what="the setsid child to be gone")
        assert "exec.escaped_killed handler=run" in d.log()
    finally:
        kill_leftovers([child])


@pytest.mark.skipif(
    cgroups.detect() is None,
    reason="this process may not create cgroups (needs root outside a protected cgroup "
    "tree, or a delegated one), so neither may the daemon it starts",
)
def test_a_child_that_also_clears_its_environment_dies_with_the_attempt(
    daemons: Any, tmp_path: pathlib.Path
) -> None:
    body = leaves_a_session("{}")  # no BSV_ATTEMPT_TOKEN to be found by
    d = daemons(handlers={"run": exec_handler(script(tmp_path, "wiped", body))})
    b = d.submit("run", [1, 2])
    assert d.wait_status(b["id"], TERMINAL)["status"] == "completed"
    children = [int(item["result"]["child"]) for item in d.items(b["id"])]
    try:
        wait_for(lambda: not any(alive(c) for c in children), 10, what="the children gone")
        assert "exec.cgroups base=" in d.log()
        assert "exec.escaped_killed handler=run" in d.log()
        found = cgroups.detect()
        assert found is not None
        own = list(found.base.glob(f"{cgroups.PREFIX}{d.pid}-*"))
        assert own == [], own  # each attempt's cgroup is removed with it
    finally:
        kill_leftovers(children)
