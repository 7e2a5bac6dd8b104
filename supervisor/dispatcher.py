"""The claim loop and the worker pool; owns the two-phase stop.

Claiming (``claim_items``) commits each item as ``running`` with its attempt
counted and this lease recorded before any handler sees it: persist before
work. Claimed items wait in a small prefetch window (``[worker] prefetch``) and
are run by ``[worker] concurrency`` long-lived workers. Each worker runs its
attempts inside one cancel scope of its own: stopping an attempt (its handler's
``timeout``, its batch stopped, the drain deadline) cancels that scope, and the
worker opens a new one for its next attempt. Timeouts are enforced by one
watchdog (:meth:`Dispatcher._watch_deadlines`, every TIMEOUT_TICK_S) rather than
a timer per attempt: a scope and a timer per attempt were ~15 % of the daemon's
CPU with fast handlers (bench/README.md). A handler's
``concurrency`` caps its workers in this daemon; the global caps
(``global_concurrency``, ``rate_limit``, a batch's ``max_concurrency``) are
enforced by the claim itself. A claim stays ours until its outcome is persisted
(see :meth:`Dispatcher.free_slots`).

Stop: :meth:`stop_claiming` is the soft stop (no new claims; what waits in the
prefetch window is released at once); running attempts get
``[worker] drain_timeout`` to finish (:meth:`skip_drain` ends the wait early),
then they are cancelled with reason RELEASED: back to queued
without spending the attempt.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc

from supervisor import db as dbm
from supervisor import executor, prefetch, progress, states, store, tracecontext
from supervisor.api import schemas
from supervisor.config import Config, HandlerConfig
from supervisor.errors import DatabaseUnavailable
from supervisor.events import Wakeup
from supervisor.executor import StopReason
from supervisor.handlers import Handler
from supervisor.models import Item, Progress
from supervisor.outbox import Outbox
from supervisor.ready import ReadyQueues

if TYPE_CHECKING:
    from supervisor.otel import Tracer

log = logging.getLogger(__name__)
CONTROL_CHECK_S = 2.0
THROTTLED_POLL_S = 0.05
RATE_BURST_S = 0.1  # a rate limit's bucket holds this many seconds' worth of starts
TIMEOUT_TICK_S = 0.02  # an attempt past its timeout is stopped within this long
TRACE_CACHE_MAX = 10_000  # batches whose submission trace context is remembered


AttemptKey = tuple[int, int]  # (item id, attempt number): one attempt of one item


@dataclass(slots=True)
class Running:
    """An attempt a worker runs now, and how to stop it."""

    batch_id: str
    scope: anyio.CancelScope  # the worker's scope: cancelling it stops this attempt
    deadline: float  # time.monotonic() past which it has timed out
    limit: float  # how far item.extend() may move the deadline (max_timeout)
    # items it adds to its batch (key, payload JSON, limit key), written with its success
    added: list[executor.Added] = dataclasses.field(default_factory=list)
    cost: float | None = None  # the cost it reported (item.report_cost), the last one


@dataclass(frozen=True, slots=True)
class Charge:
    """What a claim charged an attempt's key budget: its key, the period, the cost."""

    limit_key: str
    period_start: datetime
    cost: float


class Dispatcher:
    def __init__(
        self,
        cfg: Config,
        db: dbm.Database,
        handlers: Mapping[str, Handler],
        outbox: Outbox,
        lease: str,
        reports: progress.Reports,
        tracer: Tracer | None = None,
    ) -> None:
        self._cfg = cfg
        # None: tracing is off, and nothing below allocates anything for it
        self._tracer = tracer
        # batch id -> the trace context it was submitted under (None: it has none)
        self._traces: dict[str, tracecontext.TraceContext | None] = {}
        self._db = db
        self._q = store.Queries(db)
        self._handlers = handlers
        self._outbox = outbox
        self._reports = reports
        self._lease = lease
        self._lease_id = uuid.UUID(lease)
        self._worker = cfg.worker.name
        self._window = prefetch.Window(cfg.worker.concurrency, cfg.worker.prefetch)
        # claimed, not started
        caps = {n: h.config.concurrency for n, h in handlers.items() if h.config.concurrency}
        self._ready = ReadyQueues(handlers, caps)
        self._idle_workers: list[anyio.Event] = []
        self.in_flight = 0  # handlers running now
        self.per_handler: Counter[str] = Counter()
        self.owned = 0  # attempts claimed by us and not yet handed to the outbox
        self._owned_per_handler: Counter[str] = Counter()
        # Keyed by (item id, attempt): a retried item may be claimed again by us
        # while its cancelled attempt (deaf to the stop) still runs.
        self._running: dict[AttemptKey, Running] = {}
        # why an attempt of ours was stopped (absent: the task group's own cancellation)
        self._reasons: dict[AttemptKey, StopReason] = {}
        self._wakeup = Wakeup()
        # handler -> monotonic time until which its claims are skipped: its last
        # claim found nothing runnable (see _claim_loop)
        self._nothing_until: dict[str, float] = {}
        self._idle = anyio.Event()
        self._claim_scope = anyio.CancelScope()
        self._drain_scope = anyio.CancelScope()
        self._stopping = False
        self._orphan_check = False
        # each keyed claim's items as (limit key, seconds runnable): the metrics
        self.on_keyed_claim: Callable[[str, list[tuple[str, float]]], None] | None = None
        # claimed attempts charged to a key budget, until their outcome is handed over
        self._charges: dict[AttemptKey, Charge] = {}
        self._retry_due: float | None = None
        self._meta_cache: dict[str, Any] = {}
        self.db_ok = True
        self.claiming = False
        self.released = 0

    # -- control from outside -------------------------------------------------

    def wake(self, payload: str = "") -> None:
        """A NOTIFY on the wake channel: a handler's name (new, resumed or retried
        work of that handler) or anything else (look at every handler again)."""
        if payload in self._nothing_until:
            del self._nothing_until[payload]
        elif payload not in self._handlers:
            self._nothing_until.clear()
        self._wakeup.set()

    def written(self, handlers: set[str]) -> None:
        """Outcomes of these handlers were persisted: their slots are free, and
        their batches may have runnable items again (retries, max_concurrency)."""
        for name in handlers:
            self._nothing_until.pop(name, None)
        self._wakeup.set()

    def retry_due_in(self, delay_s: float) -> None:
        """An item we wrote back as a retry becomes runnable in ``delay_s``: look
        again then instead of waiting for the next poll."""
        due = time.monotonic() + delay_s
        if self._retry_due is None or due < self._retry_due:
            self._retry_due = due

    def stop_claiming(self) -> None:
        """Soft stop: claim nothing more and release what waits in the prefetch
        window at once (it never started). Harmless before start or twice."""
        self._stopping = True
        self._claim_scope.cancel()
        self._drop_ready(lambda item: True, StopReason.RELEASED)
        self._wake_workers(len(self._idle_workers))

    def skip_drain(self) -> None:
        """Second signal: stop waiting for running items; release them now."""
        self.stop_claiming()
        self._drain_scope.cancel()

    def cancel_batch(self, batch_id: str) -> int:
        """Stop this daemon's attempts (running or waiting) of a batch being stopped."""
        n = self._drop_ready(lambda item: item.batch_id == batch_id, StopReason.CANCELLED)
        for key, run in list(self._running.items()):
            if run.batch_id == batch_id and self._stop(key, run, StopReason.CANCELLED):
                n += 1
        if n:
            log.info("dispatcher.cancel batch=%s stopped=%s", batch_id, n)
        return n

    def cancel_item(self, item_id: int, attempt: int) -> bool:
        """Stop this attempt of an item that was cancelled (running or waiting for
        a worker). Its outcome is fenced in the database already; stopping it only
        frees the slot. Another attempt of the item (retried and claimed again
        since) is left alone."""
        n = self._drop_ready(
            lambda item: int(item.id) == item_id and item.attempt == attempt, StopReason.CANCELLED
        )
        run = self._running.get((item_id, attempt))
        if run is not None:
            n += self._stop((item_id, attempt), run, StopReason.CANCELLED)
        if n:
            log.info("dispatcher.cancel_item item=%s attempt=%s", item_id, attempt)
        return n > 0

    def release_waiting(self, batch_id: str) -> int:
        """A batch was paused: hand back its claimed items that have not started
        (released: queued again, the attempt not counted); running ones finish."""
        n = self._drop_ready(lambda item: item.batch_id == batch_id, StopReason.RELEASED)
        if n:
            log.info("dispatcher.released_paused batch=%s items=%s", batch_id, n)
        return n

    def waiting(self, handler: str) -> int:
        """Items of ``handler`` claimed by us that wait for a worker (not started)."""
        return self._ready.waiting(handler)

    def free_slots(self) -> int:
        """How many more items we may claim: the prefetch window (see
        :mod:`supervisor.prefetch`) minus what we hold. A claim stays ours until
        its outcome is persisted, so the attempts this daemon has `running` in the
        database never exceed the window (plus, while an "auto" window is grown,
        that growth again: outcomes being written)."""
        self._window.sample()
        window = self._window.size()
        # Outcomes waiting for their write count too, except that a window grown for
        # fast handlers lets its growth's worth of them be written while the next
        # claim runs (claims and writes overlap instead of taking turns).
        growth = window - self._window.base
        return window - self.owned - max(0, self._outbox.pending - growth)

    # -- the component ----------------------------------------------------------

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        async with anyio.create_task_group() as work:
            for _ in range(self._cfg.worker.concurrency):
                work.start_soon(self._work)
            work.start_soon(self._watch_stopping_batches)
            work.start_soon(self._watch_deadlines)
            task_status.started()
            with self._claim_scope:
                self.claiming = True
                await self._claim_loop()
            self.claiming = False
            self.stop_claiming()  # also releases what still waits for a worker
            if self.in_flight:
                log.info(
                    "dispatcher.draining in_flight=%s timeout=%ss",
                    self.in_flight,
                    self._cfg.worker.drain_timeout_s,
                )
            with self._drain_scope, anyio.move_on_after(self._cfg.worker.drain_timeout_s):
                while self.owned:
                    self._idle = anyio.Event()
                    await self._idle.wait()
            self.released = self.in_flight
            for key, run in list(self._running.items()):
                self._stop(key, run, StopReason.RELEASED)
            work.cancel_scope.cancel()
        if self.released:
            log.info(
                "dispatcher.released items=%s (back to queued, attempt not counted)", self.released
            )

    async def _claim_loop(self) -> None:
        names = list(self._handlers)
        batch_size = self._cfg.worker.claim_batch_size
        turn = 0
        failures = 0
        # Items queued before their handler had a key limit have no key, and a
        # keyed claim does not see them: give them theirs first.
        unkeyed = [n for n in names if self._handlers[n].config.key_limit is not None]
        while True:
            if unkeyed:
                try:
                    await self._assign_limit_keys(unkeyed)
                except DatabaseUnavailable:
                    await anyio.sleep(0.2 + random.random() * 0.3)
                    continue  # still away; try again before claiming anything
                unkeyed = []
            if self._orphan_check:
                try:
                    await self._release_orphans()
                except DatabaseUnavailable:
                    await anyio.sleep(0.2 + random.random() * 0.3)
                    continue  # still away; try again before claiming anything
            free = self.free_slots()
            if free <= 0:
                await self._wakeup.wait()
                continue
            claimed = 0
            saturated = False
            throttled = False  # a handler capped by rate or global limits got less than asked
            turn += 1
            now = time.monotonic()
            try:
                for name in (
                    names[turn % len(names) :] + names[: turn % len(names)] if names else []
                ):
                    if self._stopping:
                        break
                    if self._nothing_until.get(name, 0.0) > now:
                        continue  # found nothing last time, and nothing has changed since
                    hcfg = self._handlers[name].config
                    n = min(free - claimed, batch_size)
                    if hcfg.concurrency is not None:
                        # The cap bounds what we claim, not only what runs: a claim
                        # is `running` in the batch's counts, and items waiting here
                        # while other daemons have free workers would be held back.
                        n = min(n, hcfg.concurrency - self._owned_per_handler[name])
                    if n <= 0:
                        continue
                    # Shielded: a soft stop that cancelled a claim as it committed
                    # would leave its items running under our lease with no one on
                    # them. What it returns is enqueued; the stop releases it.
                    with anyio.CancelScope(shield=True):
                        rows = await self._claim(hcfg, n)
                        if self._tracer is not None and rows:
                            await self._load_traces(rows)
                    for row in rows:
                        self._enqueue(name, row)
                    claimed += len(rows)
                    saturated = saturated or len(rows) == n
                    # Keyed limits count as limits: another daemon's finished item
                    # frees a key's slot, and a key's tokens refill, unannounced.
                    limited = (
                        hcfg.rate_per_s is not None
                        or hcfg.global_concurrency is not None
                        or hcfg.key_limit is not None
                    )
                    throttled = throttled or (limited and len(rows) < n)
                    if not rows and not limited:
                        # Skip this handler's claim round trip until something says
                        # it has work: a wake-up naming it, its outcomes written (retries,
                        # max_concurrency slots), a poll timeout, or a poll interval.
                        self._nothing_until[name] = now + self._cfg.worker.poll_interval_s
                if claimed:
                    self._wake_workers(claimed)
                self.db_ok = True
                failures = 0
            except DatabaseUnavailable as exc:
                self.db_ok = False
                # The claim may have committed with its reply lost: reconcile before
                # the next claim (see _release_orphans).
                self._orphan_check = True
                failures += 1
                delay = min(5.0, 0.1 * 2 ** min(failures, 6)) * (0.5 + random.random())
                log.warning("dispatcher.claim_failed error=%s retry_in=%.2fs", exc, delay)
                await anyio.sleep(delay)
                continue
            if saturated and self.free_slots() > 0:
                continue  # probably more runnable work: claim again at once
            poll = self._cfg.worker.poll_interval_s * (0.8 + 0.4 * random.random())
            if throttled:
                # Tokens refill and other daemons free global slots without telling us.
                poll = min(poll, THROTTLED_POLL_S)
            if self._retry_due is not None:
                poll = min(poll, max(0.0, self._retry_due - time.monotonic()) + 0.002)
                self._retry_due = None
            if not await self._wakeup.wait(poll):
                self._nothing_until.clear()  # the poll: look at every handler again
            # Woken by finished items: let a few more finish so claims stay batched.
            deadline = time.monotonic() + 0.005
            refill = max(1, min(batch_size, self._window.size() // 4))
            while self.free_slots() < refill and time.monotonic() < deadline:
                await self._wakeup.wait(max(0.0, deadline - time.monotonic()))

    async def _assign_limit_keys(self, names: list[str]) -> None:
        for name in names:
            kl = self._handlers[name].config.key_limit
            assert kl is not None
            n = await self._q.assign_limit_keys(handler=name, tokens=kl.tokens)
            if n:
                log.info("dispatcher.limit_keys_assigned handler=%s items=%s", name, n)

    async def _claim(self, hcfg: HandlerConfig, n: int) -> list[store.ClaimedItem]:
        """Up to ``n`` items of one handler: ``claim_items``, or ``claim_keyed_items``
        for a handler with a key limit (only those pay for the keys)."""
        burst = max(1.0, (hcfg.rate_per_s or 0.0) * RATE_BURST_S)
        kl = hcfg.key_limit
        if kl is None:
            return await self._q.claim_items(
                handler=hcfg.name,
                limit=n,
                worker=self._worker,
                lease=self._lease_id,
                global_cap=hcfg.global_concurrency,
                rate=hcfg.rate_per_s,
                burst=burst,
            )
        rows = await self._q.claim_keyed_items(
            handler=hcfg.name,
            limit=n,
            worker=self._worker,
            lease=self._lease_id,
            global_cap=hcfg.global_concurrency,
            rate=hcfg.rate_per_s,
            burst=burst,
            key_cap=kl.concurrency,
            key_rate=kl.rate_per_s,
            key_burst=kl.burst,
            budget=kl.budget,
            budget_period_s=kl.budget_period_s,
            cost_path=kl.cost_tokens,
        )
        for r in rows:
            if r.cost is not None and r.budget_period_start is not None:
                self._charges[(r.id, r.attempts)] = Charge(
                    r.limit_key, r.budget_period_start, r.cost
                )
        if rows and self.on_keyed_claim is not None:
            self.on_keyed_claim(hcfg.name, [(r.limit_key, r.waited_s) for r in rows])
        return list(rows)

    async def _load_traces(self, rows: list[store.ClaimedItem]) -> None:
        """Remember the submission trace context of the batches these claimed
        items belong to (tracing only; one query per claim that meets new batches)."""
        new = {r.batch_id for r in rows if str(r.batch_id) not in self._traces}
        if not new:
            return
        try:
            found = await self._q.batch_trace_contexts(list(new))
        except DatabaseUnavailable as exc:
            # Their spans start new traces instead: a lost link is no reason to
            # hold back claimed work.
            log.warning("dispatcher.trace_contexts_unavailable error=%s", exc)
            return
        if len(self._traces) + len(new) > TRACE_CACHE_MAX:
            self._traces.clear()  # items already waiting carry theirs (Item.trace)
        for batch_id in new:
            tc = found.get(batch_id)
            self._traces[str(batch_id)] = tracecontext.of_row(*tc) if tc else None

    async def _release_orphans(self) -> None:
        """After a failed claim: items the database says we run but we do not know.

        A claim whose commit succeeded while its reply was lost (the connection died
        at that moment) leaves items `running` under our live lease that no worker
        runs and no reaper would ever reclaim. No other claim of ours is in flight
        here (the claim loop is the only claimer), so whatever we do not hold is
        such an orphan: release it (queued again, the attempt not counted)."""
        rows = await self._q.running_items_of_lease(self._lease_id)
        known = self._outbox.pending_ids() | self._ready.ids()
        orphans = [r for r in rows if r.id not in known and (r.id, r.attempts) not in self._running]
        for r in orphans:
            self._outbox.put(
                executor.unstarted_release(
                    r.id, str(r.batch_id), r.attempts, r.handler, self._lease
                )
            )
        if orphans:
            log.warning(
                "dispatcher.orphans_released items=%s: claimed in a transaction whose reply "
                "was lost; handed back without spending the attempt",
                len(orphans),
            )
        self._orphan_check = False

    # -- claimed items waiting for a worker ---------------------------------------

    def _enqueue(self, handler: str, row: store.ClaimedItem) -> None:
        meta_text = row.batch_metadata
        meta = self._meta_cache.get(meta_text)
        if meta is None:
            meta = json.loads(meta_text) if meta_text else {}
            if len(self._meta_cache) > 1000:
                self._meta_cache.clear()
            self._meta_cache[meta_text] = meta
        item = Item(
            id=str(row.id),
            batch_id=str(row.batch_id),
            key=row.key,
            payload=json.loads(row.payload),
            attempt=row.attempts,
            max_attempts=row.max_attempts,
            handler=handler,
            batch_metadata=meta,
            controls=self,
            # with tracing on: the submission's context, the parent of the attempt's span
            trace=self._traces.get(str(row.batch_id)) if self._tracer is not None else None,
        )
        self._ready.put(item)
        self.owned += 1
        self._owned_per_handler[handler] += 1

    def _drop_ready(self, which: Callable[[Item], bool], reason: StopReason) -> int:
        """Hand back claimed items that have not started (cancelled or released)."""
        dropped = self._ready.drop(which)
        for item in dropped:  # after the queues are consistent: _finish may wake workers
            self._finish(
                item, executor.cancelled_attempt(item, reason, self._worker), time.monotonic()
            )
        return len(dropped)

    def _wake_workers(self, n: int) -> None:
        while n > 0 and self._idle_workers:
            self._idle_workers.pop().set()
            n -= 1

    # -- workers ------------------------------------------------------------------

    async def _work(self) -> None:
        """One of ``concurrency`` workers: run claimed items one after another,
        inside a cancel scope that lives until one of its attempts is stopped."""
        while True:
            with anyio.CancelScope() as scope:
                while not scope.cancel_called:
                    item = self._ready.take(self.per_handler)
                    if item is None:
                        if self._stopping:
                            return
                        ready = anyio.Event()
                        self._idle_workers.append(ready)
                        await ready.wait()
                        continue
                    await self._run_item(item, scope)
            # An attempt of ours was stopped (its outcome is recorded): a fresh scope.

    async def _run_item(self, item: Item, scope: anyio.CancelScope) -> None:
        key = (int(item.id), item.attempt)
        handler = self._handlers[item.handler]
        started = time.monotonic()
        result: executor.Attempt | None = None
        self.in_flight += 1
        self.per_handler[item.handler] += 1
        hcfg = handler.config
        run = Running(item.batch_id, scope, started + hcfg.timeout_s, started + hcfg.max_timeout_s)
        self._running[key] = run
        traced = None
        if self._tracer is not None:
            traced = self._tracer.start("attempt", item)
            item = traced.item  # carries the span's context, for the handler to pass on
        try:
            result = await executor.attempt(handler, item, self._worker)
        except anyio.get_cancelled_exc_class():
            # Who stopped it says what it means; no reason: the task group is
            # being torn down (shutdown).
            reason = self._reasons.get(key, StopReason.RELEASED)
            if reason is StopReason.TIMEOUT:
                result = executor.timed_out(handler, item, self._worker)
            else:
                ran_s = time.monotonic() - started
                result = executor.cancelled_attempt(item, reason, self._worker, ran_s)
            raise
        finally:
            del self._running[key]
            self._reasons.pop(key, None)
            self._reports.ended(key[0])
            self.in_flight -= 1
            self._window.finished()
            self.per_handler[item.handler] -= 1
            if result is not None:
                self._finish(item, result, started, run.added, run.cost)
            if traced is not None:
                assert self._tracer is not None
                self._tracer.end_attempt(traced, result)

    # -- what a running attempt may ask (models.AttemptControls) ---------------------

    def report_progress(self, item: Item, report: Progress) -> None:
        """Keep the attempt's latest report for the next progress write (any thread)."""
        self._reports.report(int(item.id), item.attempt, item.handler, report)

    def extend(self, item: Item, seconds: float) -> float:
        """Move a running attempt's deadline to ``seconds`` from now, within its
        handler's ``max_timeout``; returns the seconds it has left. Callable from a
        handler's thread: it only replaces one float the watchdog reads."""
        run = self._running.get((int(item.id), item.attempt))
        now = time.monotonic()
        if run is None:
            return 0.0  # the attempt is over (stopped meanwhile)
        wanted = now + seconds
        if wanted > run.limit:
            log.warning(
                "attempt.extend_capped item=%s handler=%s asked=%.0fs: past "
                "handlers.%s.max_timeout; the attempt has %.0fs left",
                item.id,
                item.handler,
                seconds,
                item.handler,
                max(0.0, run.limit - now),
            )
            wanted = run.limit
        run.deadline = max(run.deadline, wanted)
        return max(0.0, run.deadline - now)

    def report_cost(self, item: Item, cost: float) -> None:
        """Keep the cost a running attempt reports for its outcome (any thread: one
        attribute written)."""
        run = self._running.get((int(item.id), item.attempt))
        if run is not None:
            run.cost = cost

    def add_items(self, item: Item, entries: Iterable[Any]) -> int:
        """Validate items a running attempt adds to its batch and keep them for its
        outcome write (see :mod:`supervisor.outbox`); raises ValueError naming a
        bad entry, or the attempt being over. Callable from a handler's thread."""
        errors: list[dict[str, str]] = []
        kl = self._handlers[item.handler].config.key_limit
        limit_keys: list[str] = []
        parsed = schemas.item_entries(
            list(entries),
            errors,
            path="",
            dedupe=True,
            key_limit=(kl.key, kl.tokens) if kl is not None else None,
            limit_keys=limit_keys,
            cost=(kl.cost, kl.cost_tokens)
            if kl is not None and kl.budget is not None and kl.cost and kl.cost_tokens
            else None,
        )
        if errors:
            raise ValueError(
                "add_items: " + "; ".join(f"item {e['path']}: {e['message']}" for e in errors[:5])
            )
        run = self._running.get((int(item.id), item.attempt))
        if run is None:
            raise RuntimeError("add_items: this attempt is over (stopped or finished)")
        if len(run.added) + len(parsed) > self._cfg.server.max_items_per_batch:
            raise ValueError(
                f"add_items: more than {self._cfg.server.max_items_per_batch} items added by "
                "one attempt ([server] max_items_per_batch)"
            )
        if kl is None:
            run.added.extend((key, payload, None) for key, payload in parsed)
        else:
            run.added.extend(
                (key, payload, lk) for (key, payload), lk in zip(parsed, limit_keys, strict=True)
            )
        return len(parsed)

    def _stop(self, key: AttemptKey, run: Running, reason: StopReason) -> bool:
        """Stop one running attempt: record why, then cancel its worker's scope
        (which runs nothing else meanwhile: the worker is inside this attempt).
        The first reason stands; returns False if it was already being stopped."""
        if key in self._reasons:
            return False
        self._reasons[key] = reason
        run.scope.cancel()
        return True

    async def _watch_deadlines(self) -> None:
        """Stop attempts that ran past their handler's timeout."""
        while True:
            await anyio.sleep(TIMEOUT_TICK_S)
            now = time.monotonic()
            late = [(k, r) for k, r in self._running.items() if r.deadline <= now]
            for key, run in late:
                self._stop(key, run, StopReason.TIMEOUT)

    def _finish(
        self,
        item: Item,
        result: executor.Attempt,
        started: float,
        added: list[executor.Added] | None = None,
        cost: float | None = None,
    ) -> None:
        """Hand an outcome to the outbox; the claim stays counted until it is written.
        A reported cost corrects its key budget's charge."""
        charge = self._charges.pop((int(item.id), item.attempt), None)
        correction = None
        if charge is not None and cost is not None and cost != charge.cost:
            correction = executor.CostCorrection(
                charge.limit_key, charge.period_start, cost - charge.cost
            )
        self._outbox.put(
            executor.record(item, self._lease, result, started, added or (), correction)
        )
        self.owned -= 1
        self._owned_per_handler[item.handler] -= 1
        if self._ready and self._idle_workers:
            self._wake_workers(1)  # a handler cap may have opened for a waiting item
        self._wakeup.set()
        if not self.owned:
            self._idle.set()

    async def _watch_stopping_batches(self) -> None:
        """Backstop for a missed cancel or pause NOTIFY: ask the database which of
        our claimed items belong to batches being stopped or paused, and which of
        our attempts it no longer runs under our lease (an item cancelled)."""
        while True:
            await anyio.sleep(CONTROL_CHECK_S)
            if not self.owned:
                continue
            attempts = list(self._running)
            attempts += [(int(i.id), i.attempt) for i in self._ready.items()]
            try:
                rows = await self._q.stopping_batches_of_lease(self._lease_id)
                gone = await self._q.attempts_not_running(self._lease_id, attempts)
            except DatabaseUnavailable:
                continue  # the claim loop reports the outage; try again next round
            for r in rows:
                if r.status == states.BatchStatus.PAUSED:
                    self.release_waiting(str(r.batch_id))
                else:
                    self.cancel_batch(str(r.batch_id))
            for item_id, attempt in gone:
                self.cancel_item(item_id, attempt)


def status_line(d: Dispatcher) -> str:
    by = ", ".join(f"{h}={n}" for h, n in sorted(d.per_handler.items()) if n)
    state = "claiming" if d.claiming else "not claiming"
    db = "ok" if d.db_ok else "unavailable"
    return f"{d.in_flight} in flight ({by or 'idle'}); {state}; db {db}"
