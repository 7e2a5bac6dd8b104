"""Worker registration and heartbeats.

The daemon registers its lease (one UUID per process) under its worker name,
reclaims at once what an earlier process with the same name left running (a
restart: no need to wait for ``dead_after``), and refreshes ``heartbeat_at``
every ``[worker] heartbeat_interval``. If its row was reaped while it was
stalled, it registers again; its stale attempts are already fenced off.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Callable

import anyio
import anyio.abc

from supervisor import db as dbm
from supervisor.config import Config
from supervisor.errors import DatabaseUnavailable
from supervisor.events import Wakeup

log = logging.getLogger(__name__)


class Heartbeat:
    def __init__(
        self,
        cfg: Config,
        db: dbm.Database,
        lease: str,
        state: Callable[[], str],
        in_flight: Callable[[], int],
        on_reclaimed: Callable[[list[dbm.Record]], None],
    ) -> None:
        self._cfg = cfg
        self._db = db
        self.lease = lease
        self._state = state
        self._in_flight = in_flight
        self._on_reclaimed = on_reclaimed
        self._wakeup = Wakeup()
        self._lock = anyio.Lock()  # a beat never races the final deregistration
        self._deregistered = False
        self.ok = False

    def wake(self) -> None:
        """Beat now (e.g. to publish the draining state at once)."""
        self._wakeup.set()

    async def register(self) -> None:
        """Register and reclaim the previous incarnation's items (with retry)."""
        w = self._cfg.worker

        async def _do() -> None:
            await self._insert_row()
            old = [
                r["id"]
                for r in await self._db.fetch(
                    "previous_incarnations", w.name, uuid.UUID(self.lease)
                )
            ]
            if old:
                rows = await self._db.fetch("reclaim_leases", old, w.name)
                await self._db.execute("delete_workers", old)
                self._on_reclaimed(rows)
                n = sum(1 for r in rows if r["kind"] == "item")
                log.info(
                    "heartbeat.reclaimed_previous name=%s leases=%s items=%s", w.name, len(old), n
                )

        await dbm.with_retry(_do)
        self.ok = True
        log.info("heartbeat.registered name=%s lease=%s", w.name, self.lease)

    async def beat(self) -> None:
        async with self._lock:
            if not self._deregistered:
                await self._beat()

    async def _beat(self) -> None:
        row = await self._db.fetchrow(
            "heartbeat", uuid.UUID(self.lease), self._state(), self._in_flight()
        )
        if row is None:
            log.warning(
                "heartbeat.reregister: our worker row was reaped (stalled past "
                "dead_after?); registering again"
            )
            await self._insert_row()

    async def _insert_row(self) -> None:
        w = self._cfg.worker
        await self._db.execute(
            "register_worker",
            uuid.UUID(self.lease),
            w.name,
            socket.gethostname(),
            os.getpid(),
            w.concurrency,
        )

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        task_status.started()
        while True:
            await self._wakeup.wait(self._cfg.worker.heartbeat_interval_s)
            try:
                await self.beat()
                self.ok = True
            except DatabaseUnavailable as exc:
                self.ok = False
                log.warning("heartbeat.failed error=%s", exc)

    async def deregister(self) -> None:
        async with self._lock:
            self._deregistered = True
            await self._deregister()

    async def _deregister(self) -> None:
        try:
            await dbm.with_retry(
                lambda: self._db.execute("deregister_worker", uuid.UUID(self.lease)),
                stop_after_s=5,
            )
            log.info("heartbeat.deregistered lease=%s", self.lease)
        except DatabaseUnavailable as exc:
            # The reaper of another daemon (or our next start) cleans the row up.
            log.warning("heartbeat.deregister_failed error=%s", exc)
