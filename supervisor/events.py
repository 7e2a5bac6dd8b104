"""The LISTEN/NOTIFY bridge and in-process fan-out.

Every transition function in the database NOTIFYs: ``<schema>_wake`` (new
runnable work), ``<schema>_batch`` (``id:version:status`` of a changed batch),
``<schema>_control`` (``cancel:<batch id>``, ``pause:<batch id>``,
``cancel_item:<item id>:<attempt>``) and ``<schema>_schedule`` (a batch was
scheduled or rescheduled). One dedicated connection per daemon LISTENs and fans
out to the dispatcher (wake-ups, cancels), the delayed starter and to SSE streams
(per-batch wake-ups). Changes made by any daemon reach every daemon. When LISTEN
is unavailable (pooler in transaction mode, connection lost) the consumers fall
back to polling; ``listening`` says which mode is in force.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import asyncpg

from supervisor import db as dbm
from supervisor import states, store

log = logging.getLogger(__name__)
PROBE_TIMEOUT_S = 2.0
NO_NOTIFICATIONS_RETRY_S = 60.0


class Wakeup:
    """An auto-resetting event: ``set()`` from anywhere, ``wait()`` consumes it."""

    def __init__(self) -> None:
        self._event = anyio.Event()

    def set(self) -> None:
        self._event.set()

    async def wait(self, timeout: float | None = None) -> bool:  # noqa: ASYNC109 - a bounded wait is the point
        """Wait until set (or ``timeout`` seconds); True when it was set."""
        if not self._event.is_set():
            with anyio.move_on_after(timeout):
                await self._event.wait()
        fired = self._event.is_set()
        if fired:
            self._event = anyio.Event()
        return fired


class Bus:
    def __init__(self, db: dbm.Database, dsn: str, schema: str) -> None:
        self._db = db
        self._dsn = dsn
        self.channels = {
            "wake": f"{schema}_wake",
            "batch": f"{schema}_batch",
            "control": f"{schema}_control",
            "schedule": f"{schema}_schedule",
        }
        self.on_wake: Callable[[str], None] = lambda payload: None
        self.on_cancel: Callable[[str], None] = lambda batch_id: None
        self.on_pause: Callable[[str], None] = lambda batch_id: None
        self.on_schedule: Callable[[], None] = lambda: None
        self.on_cancel_item: Callable[[int, int], None] = lambda item_id, attempt: None
        self.on_batch_ended: Callable[[], None] = lambda: None
        self._subscribers: dict[str, set[Wakeup]] = defaultdict(set)
        self.listening = False
        self._lost = anyio.Event()
        self._closing = False
        self._probe: str | None = None
        self._probe_seen = anyio.Event()

    @contextlib.contextmanager
    def subscribe(self, batch_id: str) -> Iterator[Wakeup]:
        """A Wakeup set whenever ``batch_id`` changes (on any daemon)."""
        w = Wakeup()
        self._subscribers[batch_id].add(w)
        try:
            yield w
        finally:
            self._subscribers[batch_id].discard(w)
            if not self._subscribers[batch_id]:
                del self._subscribers[batch_id]

    def batch_changed(self, batch_id: str) -> None:
        for w in self._subscribers.get(batch_id, ()):
            w.set()

    def close_streams(self) -> None:
        """Wake every stream (used at drain so they notice and end)."""
        self._closing = True
        for ws in self._subscribers.values():
            for w in ws:
                w.set()

    @property
    def closing(self) -> bool:
        return self._closing

    def _dispatch(self, conn: Any, pid: int, channel: str, payload: object) -> None:
        payload = str(payload)
        if channel == self.channels["batch"]:
            batch_id, _, rest = payload.partition(":")
            self.batch_changed(batch_id)
            if states.is_batch_terminal(rest.rpartition(":")[2]):
                self.on_batch_ended()
        elif channel == self.channels["wake"]:
            if payload == self._probe:
                self._probe_seen.set()
                return
            self.on_wake(payload)
        elif channel == self.channels["schedule"]:
            self.on_schedule()
        elif channel == self.channels["control"]:
            action, _, batch_id = payload.partition(":")
            if action == "cancel":
                self.on_cancel(batch_id)
            elif action == "pause":
                self.on_pause(batch_id)
            elif action == "cancel_item":
                item_id, _, attempt = batch_id.partition(":")
                if item_id.isdigit() and attempt.isdigit():
                    self.on_cancel_item(int(item_id), int(attempt))

    def _terminated(self, conn: Any) -> None:
        self._lost.set()

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Keep one LISTEN connection open; reconnect with backoff when it drops."""
        started = False
        delay = 0.1
        while True:
            conn: asyncpg.Connection | None = None
            try:
                conn = await self._db.listen_connection(self._dsn)
                self._lost = anyio.Event()
                conn.add_termination_listener(self._terminated)
                for ch in self.channels.values():
                    await conn.add_listener(ch, self._dispatch)
                if await self._delivers():
                    self.listening = True
                    delay = 0.1
                    log.info("events.listening channels=%s", ",".join(self.channels.values()))
                    # Anything may have changed while we were not listening.
                    self.on_wake("reconnect")
                    self.on_schedule()
                    for bid in list(self._subscribers):
                        self.batch_changed(bid)
                    if not started:
                        started = True
                        task_status.started()
                    while not self._lost.is_set() and not conn.is_closed():
                        with anyio.move_on_after(1.0):
                            await self._lost.wait()
                    log.warning("events.lost: LISTEN connection closed; polling until it is back")
                else:
                    log.warning(
                        "events.no_notifications: LISTEN succeeded but a NOTIFY did not arrive "
                        "within %ss (a pooler in transaction mode?); polling. Set [database] "
                        "listen_url to a direct session for instant wake-ups",
                        PROBE_TIMEOUT_S,
                    )
                    delay = NO_NOTIFICATIONS_RETRY_S
            except Exception as exc:
                # Not fatal: streams and the dispatcher poll while LISTEN is down.
                if not dbm.is_transient(exc):
                    raise
                log.warning("events.unavailable error=%s", exc)
            finally:
                self.listening = False
                if conn is not None:
                    with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                        # best effort close of a connection that may already be dead
                        with anyio.move_on_after(2):
                            await conn.close()
            if not started:
                started = True
                task_status.started()
            await anyio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def _delivers(self) -> bool:
        """Whether a NOTIFY sent through the pool reaches our LISTEN session. Behind a
        pooler in transaction mode LISTEN succeeds on some server connection but its
        notifications never reach us; believing we listen would stall every consumer
        on its long idle wait instead of polling."""
        self._probe = f"probe:{uuid.uuid4()}"
        self._probe_seen = anyio.Event()
        try:
            await store.Queries(self._db).notify_wake(self._probe)
            with anyio.move_on_after(PROBE_TIMEOUT_S):
                await self._probe_seen.wait()
            return self._probe_seen.is_set()
        finally:
            self._probe = None
