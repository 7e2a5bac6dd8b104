"""Deletes terminal batches older than ``[retention] finished_after``, with
their items and audit log, and schedule runs as old (but never a schedule's
latest slot, which the next slot is counted from), in bounded chunks so no
single transaction is huge."""

from __future__ import annotations

import logging

import anyio
import anyio.abc

from supervisor import db as dbm
from supervisor import store
from supervisor.config import Config
from supervisor.errors import DatabaseUnavailable

log = logging.getLogger(__name__)
CHUNK = 100


class Retention:
    def __init__(self, cfg: Config, db: dbm.Database) -> None:
        self._cfg = cfg
        self._db = db
        self._q = store.Queries(db)

    async def sweep(self) -> int:
        """Delete everything due, chunk by chunk; returns the number of batches deleted."""
        total = 0
        while True:
            deleted = await self._q.retention_delete(
                finished_before_s=self._cfg.retention.finished_after_s, limit=CHUNK
            )
            total += deleted
            if deleted < CHUNK:
                break
        runs = 0
        while True:
            deleted = await self._q.retention_delete_schedule_runs(
                created_before_s=self._cfg.retention.finished_after_s, limit=CHUNK
            )
            runs += deleted
            if deleted < CHUNK:
                break
        if total or runs:
            log.info("retention.deleted batches=%s schedule_runs=%s", total, runs)
        return total

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        task_status.started()
        while True:
            try:
                await self.sweep()
            except DatabaseUnavailable as exc:
                log.warning("retention.failed error=%s", exc)
            await anyio.sleep(self._cfg.retention.interval_s)
