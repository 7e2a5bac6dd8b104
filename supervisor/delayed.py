"""Starts delayed batches when their ``not_before`` comes.

A batch submitted with a future ``not_before`` is ``scheduled``: the claim does
not look at it (it takes queued and running batches only), so waiting costs the
claim nothing. Every daemon runs this component, which sleeps until the next
scheduled batch is due by the database's clock and then calls
``promote_scheduled``: the batches due stop being scheduled, set-based and SKIP
LOCKED, so daemons racing for them neither block nor repeat each other, and the
wake channel tells the claimers at once. New and moved schedules arrive on the
schedule channel; a daemon that starts promotes whatever fell due while none ran.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import anyio
import anyio.abc

from supervisor import db as dbm
from supervisor import store
from supervisor.config import Config
from supervisor.errors import DatabaseUnavailable
from supervisor.events import Wakeup

log = logging.getLogger(__name__)
PROMOTE_LIMIT = 1000  # batches per statement; more due ones follow at once
RETRY_S = 0.05  # a due batch someone else holds (or more than one statement's worth)
IDLE_S = 30.0  # with LISTEN working, the schedule channel announces every change


class DelayedStarter:
    def __init__(self, cfg: Config, db: dbm.Database, listening: Callable[[], bool]) -> None:
        self._cfg = cfg
        self._db = db
        self._listening = listening
        self._wakeup = Wakeup()
        self._actor = f"not_before:{cfg.worker.name}"

    def wake(self) -> None:
        """A batch was scheduled or its not_before moved: look again."""
        self._wakeup.set()

    async def promote_once(self) -> float | None:
        """Promote what is due; the seconds until the next scheduled batch is due
        (None: nothing is scheduled)."""
        return await store.Queries(self._db).promote_scheduled(
            actor=self._actor, limit=PROMOTE_LIMIT
        )

    def next_wait(self, due_in: float | None) -> float:
        """How long to sleep: until the next batch is due, but never longer than
        a missed announcement may go unnoticed (the poll interval while LISTEN is
        unavailable)."""
        cap = IDLE_S if self._listening() else self._cfg.worker.poll_interval_s
        if due_in is None:
            return cap
        return min(max(due_in, RETRY_S), cap)

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        task_status.started()
        while True:
            try:
                due_in = await self.promote_once()
            except DatabaseUnavailable as exc:
                # Not fatal: the schedule is in the database, and the next pass acts on it.
                log.warning("delayed.failed error=%s", exc)
                due_in = self._cfg.worker.poll_interval_s
            await self._wakeup.wait(self.next_wait(due_in))
