"""Durable completion callbacks.

When a batch turns terminal with a callback handler, the same transaction sets
``callback.state = pending``. This component claims pending callbacks (SKIP
LOCKED, fenced by lease and attempt like items), runs the handler with
``{"batch": <batch JSON>, "summary": <summary>}`` through the executor's
invoke path (same timeout, retry and error recording), and records the
outcome. A failing callback never changes the batch's status. At shutdown a
running callback goes back to pending.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING

import anyio
import anyio.abc

from supervisor import batches, executor, models, states, store, tracecontext
from supervisor import db as dbm
from supervisor.config import Config
from supervisor.errors import DatabaseUnavailable
from supervisor.events import Wakeup
from supervisor.handlers import Handler
from supervisor.metrics import Metrics

if TYPE_CHECKING:
    from supervisor.otel import Tracer

log = logging.getLogger(__name__)
MAX_PARALLEL = 4


def wakes_callbacks(payload: str, handlers: Mapping[str, object]) -> bool:
    """Whether a wake-up may concern callbacks (see :meth:`Callbacks.wake`)."""
    return payload == "callback" or payload not in handlers


class Callbacks:
    def __init__(
        self,
        cfg: Config,
        db: dbm.Database,
        handlers: Mapping[str, Handler],
        lease: str,
        metrics: Metrics,
        tracer: Tracer | None = None,
    ) -> None:
        self._cfg = cfg
        self._tracer = tracer  # None: tracing is off
        self._db = db
        self._q = store.Queries(db)
        self._handlers = handlers
        self._lease = lease
        self._metrics = metrics
        self._wakeup = Wakeup()
        self._claim_scope = anyio.CancelScope()
        self._running = 0
        self._active: set[uuid.UUID] = set()  # batch ids whose callback runs here

    def wake(self, payload: str = "") -> None:
        """A NOTIFY on the wake channel. One naming an item handler is sent for
        every submission (new items, not callbacks) and is ignored: claiming
        callbacks for each cost a round trip per batch. Anything else ('callback',
        a lost listen session, a probe) may mean a callback to deliver."""
        if wakes_callbacks(payload, self._handlers):
            self._wakeup.set()

    def stop_claiming(self) -> None:
        self._claim_scope.cancel()

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        async with anyio.create_task_group() as tg:
            task_status.started()
            with self._claim_scope:
                lost_reply = False
                while True:
                    free = MAX_PARALLEL - self._running
                    rows: list[store.BatchRow] = []
                    try:
                        if lost_reply:
                            # A claim may have committed while its reply was lost:
                            # hand back what runs under our lease but not here.
                            await self._q.release_orphan_callbacks(
                                lease=uuid.UUID(self._lease), running=list(self._active)
                            )
                            lost_reply = False
                        if free > 0:
                            # Shielded, as the dispatcher's claims: a claim cancelled
                            # as it committed would strand its callbacks `running`.
                            with anyio.CancelScope(shield=True):
                                rows = await self._q.claim_callbacks(
                                    limit=free,
                                    lease=uuid.UUID(self._lease),
                                    worker=self._cfg.worker.name,
                                )
                    except DatabaseUnavailable:
                        rows = []  # the dispatcher reports outages; poll again later
                        lost_reply = True
                    for row in rows:
                        self._running += 1
                        self._active.add(row.id)
                        tg.start_soon(self._run_one, row)
                    if not rows:
                        await self._wakeup.wait(self._cfg.worker.poll_interval_s * 2)
            # Soft stop: let running callbacks finish within the drain window.
            with anyio.move_on_after(self._cfg.worker.drain_timeout_s):
                while self._running:
                    await self._wakeup.wait(0.1)
            tg.cancel_scope.cancel()

    async def _run_one(self, row: store.BatchRow) -> None:
        attempt_no = row.callback_attempts
        handler = self._handlers.get(row.callback_handler or "")
        outcome = states.CallbackState.PENDING
        error: dict[str, object] | None = None
        delay = 0.0
        try:
            if handler is None:
                outcome = states.CallbackState.FAILED
                error = executor.error_entry(
                    attempt_no,
                    "HandlerNotConfigured",
                    f"no handler {row.callback_handler!r} in this daemon's configuration",
                    None,
                    self._cfg.worker.name,
                )
            else:
                payload = {
                    "batch": models.batch_json(row),
                    "summary": await batches.summary(self._db, row),
                }
                item = models.Item(
                    id=f"callback:{row.id}",
                    batch_id=str(row.id),
                    key=None,
                    payload=payload,
                    attempt=attempt_no,
                    max_attempts=handler.config.max_attempts,
                    handler=handler.config.name,
                    batch_metadata=models.loads(row.metadata),
                )
                traced = None
                if self._tracer is not None:
                    # A child of the batch's submission context, like its attempts.
                    item = dataclasses.replace(
                        item, trace=tracecontext.of_row(row.traceparent, row.tracestate)
                    )
                    traced = self._tracer.start("callback", item)
                    item = traced.item
                try:
                    result = await executor.invoke(handler, item, self._cfg.worker.name)
                    error = result.error
                    if result.outcome is states.Outcome.SUCCEEDED:
                        outcome = states.CallbackState.SUCCEEDED
                    elif (
                        result.outcome is states.Outcome.RETRY
                        and attempt_no < handler.config.max_attempts
                    ):
                        outcome = states.CallbackState.PENDING
                        delay = executor.clamp_delay(
                            result.delay_s
                            or handler.config.retry_backoff.delay(attempt_no, random.random())
                        )
                    else:
                        outcome = states.CallbackState.FAILED
                finally:
                    if traced is not None:
                        assert self._tracer is not None
                        label = "retry" if outcome is states.CallbackState.PENDING else outcome
                        failed = outcome is not states.CallbackState.SUCCEEDED
                        self._tracer.end(traced, str(label), error, failed=failed)
        except anyio.get_cancelled_exc_class():
            # shutdown: release it to be run again
            outcome, error = states.CallbackState.PENDING, None
            raise
        except DatabaseUnavailable as exc:
            outcome, error = (
                states.CallbackState.PENDING,
                executor.error_entry(
                    attempt_no, "DatabaseUnavailable", str(exc), None, self._cfg.worker.name
                ),
            )
            delay = 1.0
        finally:
            with anyio.CancelScope(shield=True):
                await self._finish(row, attempt_no, outcome, error, delay)
            self._running -= 1
            self._active.discard(row.id)
            self._wakeup.set()

    async def _finish(
        self,
        row: store.BatchRow,
        attempt_no: int,
        outcome: states.CallbackState,
        error: dict[str, object] | None,
        delay: float,
    ) -> None:
        try:
            await dbm.with_retry(
                lambda: self._q.finish_callback(
                    row.id,
                    lease=uuid.UUID(self._lease),
                    attempt=attempt_no,
                    state=outcome,
                    error=json.dumps(error) if error is not None else None,
                    delay_s=delay,
                    actor=self._cfg.worker.name,
                ),
                stop_after_s=30,
            )
        except DatabaseUnavailable as exc:
            # Left running under our lease: the reaper (or our restart) sets it pending again.
            log.warning("callbacks.finish_failed batch=%s error=%s", row.id, exc)
            return
        label = "retried" if outcome is states.CallbackState.PENDING else str(outcome)
        self._metrics.callbacks.labels(label).inc()
        log.info("callbacks.%s batch=%s attempt=%s", label, row.id, attempt_no)
