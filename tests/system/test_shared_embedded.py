"""Two daemons started on one embedded data directory: the server is shared, and
it is stopped only by the last process using it.

Before the fix, the second daemon adopted the running server and stopped it on its
way out (after a clean SIGTERM, or after failing on a busy API port), and the first
daemon never got its database back. Both tests below failed that way.
"""

from __future__ import annotations

import pathlib

from tests.conftest import DaemonFactory
from tests.pgharness import postgres_pids
from tests.system.embedded_daemons import completes_a_batch, start_embedded

EX_CONFIG = 78


def test_second_daemon_leaves_the_shared_server_running(
    daemons: DaemonFactory, data_dir: pathlib.Path
) -> None:
    first = start_embedded(daemons, "first", data_dir)
    first.wait_ready(90)
    second = start_embedded(daemons, "second", data_dir)
    second.wait_ready(60)
    completes_a_batch(second)
    assert second.stop() == 0
    assert postgres_pids(data_dir), "the first daemon's server was stopped"
    assert "left running" in second.log(), second.log()
    completes_a_batch(first)
    # The last user stops it.
    assert first.stop() == 0
    assert not postgres_pids(data_dir), first.log()


def test_second_run_on_a_busy_port_leaves_the_first_one_working(
    daemons: DaemonFactory, data_dir: pathlib.Path
) -> None:
    """The quick-start command run twice in one directory."""
    first = start_embedded(daemons, "first", data_dir)
    first.wait_ready(90)
    again = start_embedded(daemons, "again", data_dir, extra={"server": {"port": first.port}})
    assert again.wait_exit(60) == EX_CONFIG, again.log()
    assert "Traceback" not in again.log(), again.log()
    assert postgres_pids(data_dir), "the failed second run stopped the first one's server"
    completes_a_batch(first)
