"""A daemon never looks alive while it cannot make progress.

- The embedded server it owns is killed (what an OOM kill does): the daemon
  restarts it and work resumes; if it cannot, the daemon exits non-zero (so
  systemd restarts it) and /healthz says why in the meantime.
- Its heartbeat cannot be written for longer than worker.dead_after (the other
  daemons now treat it as dead): /healthz answers 503 and the systemd watchdog
  is no longer fed, so systemd restarts it; both recover when the heartbeat does.
"""

from __future__ import annotations

import asyncio
import os
import pathlib
import signal
import socket
import threading
import time

import asyncpg

from tests.conftest import DaemonFactory
from tests.daemon import Daemon, request, wait_for
from tests.system.embedded_daemons import completes_a_batch, start_embedded


def _postmaster(data_dir: pathlib.Path) -> int:
    return int((data_dir / "postmaster.pid").read_text().split()[0])


def _healthz(d: Daemon) -> tuple[int, object]:
    status, body, _ = request("GET", d.url + "/healthz")
    return status, body


def test_killed_embedded_server_is_restarted_and_work_resumes(
    daemons: DaemonFactory, data_dir: pathlib.Path
) -> None:
    d = start_embedded(daemons, "owner", data_dir)
    d.wait_ready(90)
    completes_a_batch(d)
    old = _postmaster(data_dir)
    os.kill(old, signal.SIGKILL)

    wait_for(lambda: "embedded.restarted" in d.log(), 60, 0.1, "the server restarted")
    assert "embedded.died" in d.log(), d.log()
    assert _postmaster(data_dir) != old
    completes_a_batch(d)
    assert _healthz(d) == (200, {"status": "ok"})
    assert d.proc is not None and d.proc.poll() is None


def test_embedded_server_that_cannot_restart_ends_the_daemon(
    daemons: DaemonFactory, data_dir: pathlib.Path
) -> None:
    d = start_embedded(daemons, "owner", data_dir)
    d.wait_ready(90)
    # The next start of this server fails: PostgreSQL refuses an unknown setting.
    with open(data_dir / "postgresql.auto.conf", "a") as f:
        f.write("\nno_such_setting_for_this_test = 1\n")
    os.kill(_postmaster(data_dir), signal.SIGKILL)

    def unhealthy() -> bool:
        status, body = _healthz(d)
        return status == 503 and isinstance(body, dict) and "is down" in body["reasons"][0]

    wait_for(unhealthy, 30, 0.05, "/healthz 503 while the server is down")
    code = d.wait_exit(120)
    assert code not in (0, 78), (code, d.log())
    assert "died and could not be restarted" in d.log(), d.log()


def _pings(sock: socket.socket, within: float = 1.0) -> int:
    """WATCHDOG=1 messages received in the next ``within`` seconds (five intervals)."""
    _drain(sock)
    n = 0
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            n += sock.recv(4096) == b"WATCHDOG=1"
        except TimeoutError:
            pass
    return n


def _drain(sock: socket.socket) -> None:
    while True:
        try:
            sock.recv(4096)
        except TimeoutError:
            return


def test_stalled_heartbeat_is_unhealthy_and_starves_the_watchdog(
    daemons: DaemonFactory, db_url: str, notify_socket: tuple[str, socket.socket]
) -> None:
    path, sock = notify_socket
    d = daemons("a", env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000"})
    wait_for(lambda: _pings(sock) >= 3, 10, 0, "WATCHDOG=1 pings")
    assert _healthz(d) == (200, {"status": "ok"})

    # Hold a lock that blocks every heartbeat write (dead_after is 3 s in tests).
    locked, release = threading.Event(), threading.Event()

    def hold() -> None:
        async def go() -> None:
            conn = await asyncpg.connect(db_url)
            try:
                async with conn.transaction():
                    await conn.execute("LOCK TABLE supervisor.workers IN ACCESS EXCLUSIVE MODE")
                    locked.set()
                    await asyncio.to_thread(release.wait, 60)
            finally:
                await conn.close()

        asyncio.run(go())

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert locked.wait(10)

        def unhealthy() -> bool:
            status, body = _healthz(d)
            return status == 503 and "no heartbeat written" in str(body)

        wait_for(unhealthy, 15, 0.1, "/healthz 503 once dead_after has passed")
        # Five watchdog intervals without a single ping; the daemon itself is alive.
        assert _pings(sock) == 0
        assert unhealthy()
        assert d.proc is not None and d.proc.poll() is None
    finally:
        release.set()
        holder.join()
    wait_for(lambda: _healthz(d)[0] == 200, 15, 0.1, "/healthz 200 again")
    wait_for(lambda: _pings(sock) >= 3, 10, 0, "WATCHDOG=1 pings again")
