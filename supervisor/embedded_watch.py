"""Keeps the embedded PostgreSQL server this daemon owns alive.

An external database is someone else's to restart: the daemon waits for it
(not ready, outcomes kept). The embedded server is ours. If its postmaster
dies (an OOM kill), nothing else will bring it back, and a daemon that only
retried would look alive while processing nothing. So we check it every
second, restart it (PostgreSQL's crash recovery replays the WAL; nothing
committed is lost) and, if that keeps failing, raise so that the daemon exits
non-zero and systemd restarts it.
"""

from __future__ import annotations

import logging

import anyio
import anyio.abc

from supervisor import embedded
from supervisor.errors import SupervisorError

log = logging.getLogger(__name__)

CHECK_INTERVAL_S = 1.0
RESTART_ATTEMPTS = 3


class EmbeddedServerLost(SupervisorError):
    """The embedded server died and could not be started again."""


class EmbeddedWatch:
    def __init__(
        self,
        pg: embedded.EmbeddedPostgres,
        *,
        interval_s: float = CHECK_INTERVAL_S,
        attempts: int = RESTART_ATTEMPTS,
    ) -> None:
        self._pg = pg
        self._interval_s = interval_s
        self._attempts = attempts
        self.down_reason = ""  # non-empty while the server is known to be down

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        task_status.started()
        while True:
            await anyio.sleep(self._interval_s)
            if not await anyio.to_thread.run_sync(self._pg.is_running):
                await self._restart()

    async def _restart(self) -> None:
        """Start the server again (or adopt it, if another process on the same data
        directory got there first); raise EmbeddedServerLost after the last attempt."""
        data_dir = self._pg.data_dir
        self.down_reason = f"embedded PostgreSQL server for {data_dir} is down"
        log.error("embedded.died data_dir=%s: restarting it", data_dir)
        for attempt in range(1, self._attempts + 1):
            try:
                await anyio.to_thread.run_sync(self._pg.start)
            except Exception as exc:  # any failure to start it is the same verdict
                log.error("embedded.restart_failed attempt=%s error=%s", attempt, exc)
                if attempt == self._attempts:
                    raise EmbeddedServerLost(
                        f"the embedded PostgreSQL server for {data_dir} died and could not "
                        f"be restarted ({self._attempts} attempts): {exc}"
                    ) from exc
                await anyio.sleep(attempt)
            else:
                break
        self.down_reason = ""
        log.info("embedded.restarted data_dir=%s", data_dir)
