"""A process an exec command starts in a new session does not outlive the attempt.
Killing the attempt's process group missed children that called ``setsid`` (a
daemonizing double fork does the same): before the fix this test's child was
still running after its attempt had completed."""

from __future__ import annotations

import pathlib
from typing import Any

from tests.daemon import wait_for
from tests.test_handlers_exec import TERMINAL, alive, exec_handler, kill_leftovers, script

LEAVES_A_SESSION = """
import json, subprocess, sys
child = subprocess.Popen(
    [sys.executable, "-c", "import time; time.sleep(120)"],
    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    start_new_session=True,  # its own session and process group: setsid
)
print(json.dumps({"child": child.pid}))
"""


def test_a_child_in_its_own_session_dies_with_the_attempt(
    daemons: Any, tmp_path: pathlib.Path
) -> None:
    d = daemons(handlers={"run": exec_handler(script(tmp_path, "session", LEAVES_A_SESSION))})
    b = d.submit("run", [1])
    assert d.wait_status(b["id"], TERMINAL)["status"] == "completed"
    (item,) = d.items(b["id"])
    child = int(item["result"]["child"])
    try:
        wait_for(lambda: not alive(child), 10, what="the setsid child to be gone")
        assert "exec.escaped_killed handler=run" in d.log()
    finally:
        kill_leftovers([child])
