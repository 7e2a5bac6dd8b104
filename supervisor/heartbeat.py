"""Worker registration and heartbeats.

The daemon registers its lease (one UUID per process) under its worker name,
reclaims at once what an earlier process with the same name left running (a
restart: no need to wait for ``dead_after``), and refreshes ``heartbeat_at``
every ``[worker] heartbeat_interval``. If its row was reaped while it was
stalled, it registers again; its stale attempts are already fenced off.
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
import uuid
from collections.abc import Callable

import anyio
import anyio.abc

from supervisor import db as dbm
from supervisor import store
from supervisor.config import Config
from supervisor.errors import ConfigError, DatabaseUnavailable
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
        on_reclaimed: Callable[[store.Transitions], None],
    ) -> None:
        self._cfg = cfg
        self._db = db
        self._q = store.Queries(db)
        self.lease = lease
        self._state = state
        self._in_flight = in_flight
        self._on_reclaimed = on_reclaimed
        self._wakeup = Wakeup()
        self._lock = anyio.Lock()  # a beat never races the final deregistration
        self._deregistered = False
        self._last_ok: float | None = None  # anyio clock of the last successful beat

    def wake(self) -> None:
        """Beat now (e.g. to publish the draining state at once)."""
        self._wakeup.set()

    async def register(self) -> None:
        """Register under the worker name, reclaiming what gone predecessors left.

        Raises ConfigError if a live daemon holds the name: two daemons under
        one name would reclaim each other's live work.
        """
        w = self._cfg.worker
        deadline = anyio.current_time() + w.dead_after_s + w.heartbeat_interval_s
        seen: dict[uuid.UUID, object] = {}  # heartbeat_at first seen for an unprovable row
        while True:
            result = await dbm.with_retry(lambda: self._try_register(seen))
            if result is None:
                break
            if anyio.current_time() > deadline:  # cannot happen while it beats; belt and braces
                raise _name_in_use(w.name, result, "its heartbeat did not go stale")
            log.info(
                "heartbeat.name_wait name=%s host=%s pid=%s: another registration holds "
                "this name; waiting up to worker.dead_after for it to go stale",
                w.name,
                result.host,
                result.pid,
            )
            await anyio.sleep(min(w.heartbeat_interval_s, 1.0))
        self._last_ok = anyio.current_time()
        log.info("heartbeat.registered name=%s lease=%s", w.name, self.lease)

    async def _try_register(self, seen: dict[uuid.UUID, object]) -> store.WorkerRegistration | None:
        """One attempt under the name's lock: register and reclaim, or return the
        registration that is not yet provably gone (the caller waits and asks again)."""
        w = self._cfg.worker
        me = uuid.UUID(self.lease)
        async with self._db.transaction("register") as tx:
            q = store.Queries(tx)
            await q.lock_worker_name(w.name)
            gone: list[uuid.UUID] = []
            pending: store.WorkerRegistration | None = None
            for r in await q.workers_named(w.name, besides=me):
                verdict = _predecessor(r, w.dead_after_s, seen.setdefault(r.id, r.heartbeat_at))
                if verdict == "live":
                    raise _name_in_use(w.name, r, "it is still heartbeating")
                if verdict == "gone":
                    gone.append(r.id)
                else:
                    pending = r
            if pending is not None:
                return pending
            gone += await q.orphan_leases_of_name(w.name, besides=me)
            await self._insert_row(q)
            if gone:
                done = await q.reclaim_leases(gone, actor=w.name)
                await q.delete_workers(gone)
        if gone:
            self._on_reclaimed(done)
            log.info(
                "heartbeat.reclaimed_previous name=%s leases=%s items=%s",
                w.name,
                len(gone),
                len(done.statuses),
            )
        return None

    async def beat(self) -> None:
        async with self._lock:
            if not self._deregistered:
                await self._beat()

    async def _beat(self) -> None:
        alive = await self._q.heartbeat(
            lease=uuid.UUID(self.lease), state=self._state(), in_flight=self._in_flight()
        )
        if not alive:
            log.warning(
                "heartbeat.reregister: our worker row was reaped (stalled past "
                "dead_after?); registering again"
            )
            await self._insert_row(self._q)

    async def _insert_row(self, q: store.Queries) -> None:
        w = self._cfg.worker
        await q.register_worker(
            lease=uuid.UUID(self.lease),
            name=w.name,
            host=socket.gethostname(),
            pid=os.getpid(),
            concurrency=w.concurrency,
        )

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        task_status.started()
        while True:
            await self._wakeup.wait(self._cfg.worker.heartbeat_interval_s)
            try:
                await self.beat()
                self._last_ok = anyio.current_time()
            except DatabaseUnavailable as exc:
                log.warning("heartbeat.failed error=%s", exc)

    def stalled(self) -> str:
        """Why we count as dead to the other daemons, or "" (a heartbeat older than
        dead_after: our items are theirs to reclaim, our late writes are fenced)."""
        if self._last_ok is None or self._deregistered:
            return ""
        silent = anyio.current_time() - self._last_ok
        if silent <= self._cfg.worker.dead_after_s:
            return ""
        return f"no heartbeat written for {silent:.0f}s (worker.dead_after is exceeded)"

    async def deregister(self) -> None:
        async with self._lock:
            self._deregistered = True
            await self._deregister()

    async def _deregister(self) -> None:
        try:
            await dbm.with_retry(
                lambda: self._q.deregister_worker(uuid.UUID(self.lease)),
                stop_after_s=5,
            )
            log.info("heartbeat.deregistered lease=%s", self.lease)
        except DatabaseUnavailable as exc:
            # The reaper of another daemon (or our next start) cleans the row up.
            log.warning("heartbeat.deregister_failed error=%s", exc)


def _predecessor(r: store.WorkerRegistration, dead_after_s: float, first_heartbeat: object) -> str:
    """Classify another registration under our name: "gone" (provably: stale
    heartbeat, or its process on this host no longer exists or is ourselves),
    "live" (a daemon process on this host, or a heartbeat that moved since we
    first looked) or "unknown" (another host, fresh heartbeat: wait and see)."""
    if r.age_s > dead_after_s:
        return "gone"
    if r.heartbeat_at != first_heartbeat:
        return "live"
    if r.host == socket.gethostname():
        pid = r.pid
        if pid == os.getpid():
            return "gone"  # one pid is one process: an earlier life of ours (container restart)
        cmdline = _cmdline(pid)
        if cmdline is None:
            return "gone"
        if _is_daemon(cmdline):
            return "live"
    return "unknown"


def _cmdline(pid: int) -> list[bytes] | None:
    """The process's arguments, or None if no such process exists."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().split(b"\0")
    except FileNotFoundError:
        return None
    except OSError:
        return []  # exists, but unreadable: not known to be ours


def _is_daemon(args: list[bytes]) -> bool:
    """True if these are a batch-supervisor's arguments (console script or ``-m``)."""
    return any(a.endswith(b"batch-supervisor") for a in args) or any(
        a == b"-m" and b == b"supervisor" for a, b in itertools.pairwise(args)
    )


def _name_in_use(name: str, r: store.WorkerRegistration, why: str) -> ConfigError:
    return ConfigError(
        [
            f"worker.name: {name!r} is held by a live daemon (host {r.host}, pid {r.pid}, "
            f"heartbeat {r.age_s:.1f}s ago; {why}); give each daemon its own [worker] name "
            "or leave it unset"
        ]
    )
