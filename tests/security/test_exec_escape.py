"""Nothing an exec command starts outlives its attempt, whatever the exit status.

Each case failed before its fix, with the child still running after its attempt
had completed:

- a background child of a *successful* command (only timeouts killed the group);
- a child that called ``setsid`` (a daemonizing double fork does the same), which
  left the process group; the attempt's token in its environment finds it now;
- a child that left the group *and* cleared its environment, which no token finds;
  where the daemon may make cgroups, each attempt's own cgroup holds it.
"""

from __future__ import annotations

import pathlib
from typing import Any

import pytest

from supervisor.handlers import cgroups
from tests.daemon import wait_for
from tests.test_handlers_exec import TERMINAL, alive, exec_handler, kill_leftovers, script

LEAVES_A_CHILD = """
import json, subprocess, sys
child = subprocess.Popen(
    [sys.executable, "-c", "import time; time.sleep(120)"],
    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    start_new_session=SESSION,  # True: its own session and process group (setsid)
    env=ENV,  # None: inherits the attempt's environment, BSV_ATTEMPT_TOKEN included
)
print(json.dumps({"child": child.pid}))
"""

NO_CGROUPS = pytest.mark.skipif(
    cgroups.detect() is None,
    reason="this process may not create cgroups (needs root outside a protected cgroup "
    "tree, or a delegated one), so neither may the daemon it starts",
)


@pytest.mark.parametrize(
    ("session", "env"),
    [
        pytest.param("False", "None", id="background-child-of-a-successful-command"),
        pytest.param("True", "None", id="child-in-its-own-session"),
        pytest.param("True", "{}", id="own-session-and-cleared-environment", marks=NO_CGROUPS),
    ],
)
def test_a_child_dies_with_its_attempt(
    daemons: Any, tmp_path: pathlib.Path, session: str, env: str
) -> None:
    body = LEAVES_A_CHILD.replace("SESSION", session).replace("ENV", env)
    d = daemons(handlers={"run": exec_handler(script(tmp_path, "leaves", body))})
    b = d.submit("run", [1, 2])
    assert d.wait_status(b["id"], TERMINAL)["status"] == "completed"
    children = [int(item["result"]["child"]) for item in d.items(b["id"])]
    try:
        wait_for(lambda: not any(alive(c) for c in children), 10, what="the children gone")
        if session == "True":
            assert "exec.escaped_killed handler=run" in d.log()
        found = cgroups.detect()
        if found is not None:
            own = list(found.base.glob(f"{cgroups.PREFIX}{d.pid}-*"))
            assert own == [], own  # each attempt's cgroup is removed with it
            assert "exec.cgroups base=" in d.log()
    finally:
        kill_leftovers(children)
