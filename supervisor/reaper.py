"""Reclaims items of dead daemons.

Any live daemon may reap; a transaction-scoped advisory lock makes sure only
one does at a time. A lease is dead when its worker's heartbeat is older than
``[worker] dead_after`` or its worker row is gone. Its running items go back
through the fenced outcome path as ``lost``: queued again with a ``WorkerLost``
error for the attempt, or failed when attempts are spent (cancelled if their
batch is stopping); its running callbacks go back to pending.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import anyio
import anyio.abc

from supervisor import db as dbm
from supervisor import store
from supervisor.config import Config
from supervisor.errors import DatabaseUnavailable

log = logging.getLogger(__name__)


class Reaper:
    def __init__(
        self, cfg: Config, db: dbm.Database, on_reclaimed: Callable[[store.Transitions], None]
    ) -> None:
        self._cfg = cfg
        self._db = db
        self._on_reclaimed = on_reclaimed

    async def reap_once(self, *, reclaim: bool = True) -> int:
        """One pass; returns the number of items reclaimed. ``reclaim=False`` only
        checks that the database answers (see :meth:`run`)."""
        async with self._db.transaction("reap") as tx:
            q = store.Queries(tx)
            await q.bound_idle_transaction()
            if not await q.try_reaper_lock() or not reclaim:
                return 0
            dead = await q.dead_leases(dead_after_s=self._cfg.worker.dead_after_s)
            if not dead:
                return 0
            done = await q.reclaim_leases(dead, actor=f"reaper:{self._cfg.worker.name}")
            await q.delete_workers(dead)
        self._on_reclaimed(done)
        n = len(done.statuses)
        log.info("reaper.reclaimed dead_leases=%s items=%s", len(dead), n)
        return n

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        task_status.started()
        # After a database outage every heartbeat is stale at once, ours included: only
        # judge others dead once we have been in touch for dead_after ourselves, so
        # that live daemons (and this one) get to beat first and keep their results.
        in_touch_since: float | None = time.monotonic()
        while True:
            await anyio.sleep(self._cfg.worker.heartbeat_interval_s)
            now = time.monotonic()
            trusted = in_touch_since is not None and (
                now - in_touch_since >= self._cfg.worker.dead_after_s
            )
            try:
                await self.reap_once(reclaim=trusted)
                in_touch_since = now if in_touch_since is None else in_touch_since
            except DatabaseUnavailable as exc:
                in_touch_since = None
                log.warning("reaper.failed error=%s", exc)
