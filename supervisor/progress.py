"""Progress reported from inside running attempts, written in the background.

A handler reports how far its item has got (``item.progress(done, total, note)``
in python, a progress line on an exec command's stdout). :meth:`Reports.report`
keeps only the latest report of each attempt, in memory, from any thread; the
:meth:`Reports.run` component writes what changed every FLUSH_S, all attempts in
one statement (``record_progress``: one jsonb value per item, overwritten, fenced
by lease and attempt like outcomes). So a report costs the handler a dict write,
never a database round trip, and a handler reporting in a tight loop costs the
database nothing more than one that reports twice a second.

Progress is advisory: a report lost to an outage or a crash changes no outcome,
and one written after its attempt ended matches nothing. When the database is
away the latest reports wait, newer ones replacing older, and are written when
it is back.

The age of each running attempt's last report is kept too, for the stalled
progress gauge (:meth:`Reports.stalled_s`): an attempt that reported once and
then went quiet for longer than its usual pace is the thing to alert on.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from datetime import UTC, datetime

import anyio
import anyio.abc

from supervisor import executor, models, store
from supervisor.errors import DatabaseUnavailable
from supervisor.models import Progress

log = logging.getLogger(__name__)
FLUSH_S = 0.5


def stored(p: Progress, attempt: int, reported_at: float) -> str:
    """The stored value (jsonb text): the report, its attempt and when it was made
    (a note with what PostgreSQL cannot store spelled out, like error texts)."""
    return models.compact_json(
        {
            "done": p.done,
            "total": p.total,
            "note": None if p.note is None else executor.storable_text(p.note),
            "attempt": attempt,
            "reported_at": models.rfc3339(datetime.fromtimestamp(reported_at, UTC)),
        }
    )


class Reports:
    def __init__(self, q: store.Queries, lease: uuid.UUID) -> None:
        self._q = q
        self._lease = lease
        self._lock = threading.Lock()  # sync handlers report from their threads
        # item id -> (attempt, stored JSON text), not yet written
        self._pending: dict[int, tuple[int, str]] = {}
        # item id -> (handler, monotonic time of its last report), while it runs
        self._last: dict[int, tuple[str, float]] = {}
        self._wakeup = anyio.Event()
        self.written = 0  # reports written (items updated), for tests and logs

    def report(self, item_id: int, attempt: int, handler: str, p: Progress) -> None:
        """The latest report of a running attempt (any thread; no I/O)."""
        text = stored(p, attempt, time.time())
        with self._lock:
            self._pending[item_id] = (attempt, text)
            self._last[item_id] = (handler, time.monotonic())

    def ended(self, item_id: int) -> None:
        """The attempt is over: it no longer counts as stalled. A report still
        pending is written anyway and matches nothing if the outcome came first."""
        with self._lock:
            self._last.pop(item_id, None)

    def stalled_s(self) -> dict[str, float]:
        """Per handler: the longest time a running attempt has gone without a
        report, among the attempts that reported at least once."""
        now = time.monotonic()
        out: dict[str, float] = {}
        with self._lock:
            for handler, at in self._last.values():
                out[handler] = max(out.get(handler, 0.0), now - at)
        return out

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        task_status.started()
        while True:
            await anyio.sleep(FLUSH_S)
            await self.flush()

    async def flush(self) -> None:
        """Write the pending reports; on an outage keep them for the next round
        (a newer report of the same attempt replaces the kept one)."""
        with self._lock:
            batch, self._pending = self._pending, {}
        if not batch:
            return
        ids = list(batch)
        try:
            self.written += await self._q.record_progress(
                lease=self._lease,
                ids=ids,
                attempts=[batch[i][0] for i in ids],
                progress=[batch[i][1] for i in ids],
            )
        except DatabaseUnavailable as exc:
            log.debug("progress.write_failed items=%s error=%s", len(ids), exc)
            with self._lock:
                for item_id, value in batch.items():
                    self._pending.setdefault(item_id, value)
        except Exception as exc:
            # Not an outage: PostgreSQL refused these values. Progress is advisory,
            # so drop them rather than retry them forever or end the daemon.
            log.error(
                "progress.rejected items=%s error=%s: %s; these reports are dropped",
                len(ids),
                type(exc).__name__,
                executor.storable_text(str(exc))[:500],
            )
