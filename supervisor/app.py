"""The composition root: starts the database (embedded or configured), migrates,
checks handlers, and runs every component in one task group; owns the signals
and the two-phase stop.

Start order (each ``await tg.start`` returns once the component is ready):
API (probes answer while the database is still coming) → embedded-server watch
(if we own the server) → migrate → events bus → outbox → progress writer →
heartbeat (registers, reclaims a gone predecessor) → reaper → delayed starter →
pipelines → metrics sampler → retention → watchdog → schedules → callbacks →
dispatcher → READY=1.

Stop (SIGTERM/SIGINT): draining (readyz 503, workers row, metrics, STOPPING=1)
→ schedules stop firing → dispatcher and callbacks stop claiming → running items get drain_timeout
(a second signal skips the wait) → what still runs is released → every outcome
is written → deregister → API and the rest stop → embedded server stops → exit 0.
"""

from __future__ import annotations

import functools
import logging
import signal
import uuid
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import anyio
import anyio.abc
import anyio.to_thread

from supervisor import (
    callbacks,
    delayed,
    dispatcher,
    embedded,
    embedded_watch,
    events,
    handlers,
    heartbeat,
    pipelines,
    progress,
    reaper,
    retention,
    schedules,
    states,
    store,
    systemd,
)
from supervisor import db as dbm
from supervisor import metrics as metrics_mod
from supervisor import outbox as outbox_mod
from supervisor.api.auth import Authenticator
from supervisor.api.context import ApiContext
from supervisor.api.server import ApiServer
from supervisor.config import Config
from supervisor.errors import DatabaseUnavailable
from supervisor.executor import OutcomeRecord
from supervisor.handlers import python as python_handler

if TYPE_CHECKING:
    from supervisor.otel import Tracer

log = logging.getLogger(__name__)
OUTBOX_FLUSH_TIMEOUT_S = 30.0
TRACE_FLUSH_TIMEOUT_S = 5.0


def _abandoned(h: python_handler.PythonHandler) -> int:
    return h.abandoned_threads


class Daemon:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.lease = str(uuid.uuid4())
        self.metrics = metrics_mod.Metrics()
        self.state = "starting"
        self.pg: embedded.EmbeddedPostgres | None = None
        self.api: ApiServer | None = None
        self.plans: dict[str, schedules.Plan] = {}
        self._on_first_signal: Callable[[], None] = lambda: None
        self._on_second_signal: Callable[[], None] = lambda: None
        self._functions: dict[str, pipelines.ItemsFunction] = {}
        self.tracer: Tracer | None = None  # [telemetry] tracing on: built by run()

    # -- readiness ----------------------------------------------------------------

    async def readiness(
        self, db: dbm.Database, disp: dispatcher.Dispatcher
    ) -> tuple[bool, list[str]]:
        reasons: list[str] = []
        if self.state != "running":
            reasons.append(f"worker is {self.state}")
        try:
            with anyio.fail_after(2):
                version, latest = await dbm.schema_status(db)
            if version != latest:
                reasons.append(f"schema at version {version}, expected {latest}")
        except (DatabaseUnavailable, TimeoutError) as exc:
            # The probe is public: the error (host, port, role) goes to the log only.
            log.debug("app.readiness database error=%s", exc)
            reasons.append("database unreachable")
        if not disp.db_ok:
            reasons.append("database unavailable to the dispatcher")
        return not reasons, reasons

    # -- run ----------------------------------------------------------------------

    async def run(self) -> int:
        built = handlers.build_all(self.cfg)  # a broken handler stops us before anything starts
        self.plans = schedules.build_all(self.cfg)  # so does a schedule's bad items
        self._functions = pipelines.load_functions(self.cfg)  # so does a broken items function
        if self.cfg.telemetry.tracing:
            # Imported only now: without the otel extra a daemon that does not trace
            # never loads OpenTelemetry (config checked the extra is installed).
            from supervisor import otel

            self.tracer = otel.Tracer.configured(self.cfg.telemetry, self.cfg.worker.name)
        main = anyio.CancelScope()
        self._on_first_signal = main.cancel  # before we serve, a signal just aborts start-up
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._signals)
                try:
                    with main:
                        async with embedded.database_url(self.cfg) as served:
                            self.pg = served.server
                            await self._run(served.url, built)
                finally:
                    tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await handlers.close_all(built)
                if self.tracer is not None:
                    await self._stop_tracing(self.tracer)
        return 0

    async def _stop_tracing(self, tracer: Tracer) -> None:
        """Export the spans still buffered, for at most TRACE_FLUSH_TIMEOUT_S (an
        unreachable collector must not hold the exit)."""
        with anyio.move_on_after(TRACE_FLUSH_TIMEOUT_S) as scope:
            await anyio.to_thread.run_sync(tracer.shutdown, abandon_on_cancel=True)
        if scope.cancelled_caught:
            log.warning("tracing.flush_timeout: spans unexported after %ss", TRACE_FLUSH_TIMEOUT_S)

    async def _signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            first = True
            async for signum in signals:
                name = signal.Signals(signum).name
                if first:
                    log.info("app.signal signal=%s: draining", name)
                    first = False
                    self._on_first_signal()
                else:
                    log.info("app.signal signal=%s: skipping the drain wait", name)
                    self._on_second_signal()

    async def _run(self, dsn: str, built: dict[str, handlers.Handler]) -> int:
        db = await dbm.Database.connect(self.cfg, dsn, on_error=self.metrics.db_error)
        api_db = await dbm.Database.connect(
            self.cfg, dsn, on_error=self.metrics.db_error, max_size=self.cfg.database.api_pool_max
        )
        try:
            return await self._serve(db, api_db, dsn, built)
        finally:
            await api_db.close()
            await db.close()

    async def _serve(
        self,
        db: dbm.Database,
        api_db: dbm.Database,
        dsn: str,
        built: dict[str, handlers.Handler],
    ) -> int:
        cfg = self.cfg
        actor = cfg.worker.name

        def applied(chunk: Sequence[OutcomeRecord], result: store.Transitions) -> None:
            self.metrics.applied(chunk, result)
            disp.written({rec.handler for rec in chunk})  # persisted outcomes free their slots
            for rec in chunk:
                if (
                    rec.outcome is states.Outcome.RETRY
                    and result.status_of(rec.item_id) == "queued"
                ):
                    disp.retry_due_in(rec.delay_s)

        ob = outbox_mod.Outbox(db, actor, applied, cfg.server.max_items_per_batch)
        reports = progress.Reports(store.Queries(db), uuid.UUID(self.lease))
        disp = dispatcher.Dispatcher(cfg, db, built, ob, self.lease, reports, self.tracer)
        disp.on_keyed_claim = self.metrics.limit_waited
        self.metrics.track_progress_stalls(built, reports.stalled_s)
        self.metrics.track_in_flight(built, lambda handler: disp.per_handler[handler], disp.waiting)
        for name, h in built.items():
            if isinstance(h, python_handler.PythonHandler):
                self.metrics.track_abandoned_threads(name, functools.partial(_abandoned, h))
        bus = events.Bus(db, cfg.database.listen_url or dsn, cfg.database.schema)
        cbs = callbacks.Callbacks(cfg, db, built, self.lease, self.metrics, self.tracer)
        timer = schedules.Schedules(cfg, db, self.plans)

        pipes = pipelines.Pipelines(cfg, db, self._functions, lambda: bus.listening)
        bus.on_batch_ended = pipes.wake

        def on_wake(payload: str) -> None:
            disp.wake(payload)
            cbs.wake(payload)
            if payload == "reconnect":  # anything may have ended while we were not listening
                pipes.wake()

        bus.on_wake = on_wake

        def on_cancel(batch_id: str) -> None:
            disp.cancel_batch(batch_id)

        bus.on_cancel = on_cancel

        def on_pause(batch_id: str) -> None:
            disp.release_waiting(batch_id)

        bus.on_pause = on_pause
        sched = delayed.DelayedStarter(cfg, db, lambda: bus.listening)
        bus.on_schedule = sched.wake

        def on_cancel_item(item_id: int, attempt: int) -> None:
            disp.cancel_item(item_id, attempt)

        bus.on_cancel_item = on_cancel_item

        def reclaimed(done: store.Transitions) -> None:
            counts: dict[str, int] = {}
            for handler in done.handlers.values():
                counts[handler] = counts.get(handler, 0) + 1
            for batch in done.finished:
                self.metrics.finished(batch.status, batch.seconds)
            self.metrics.reclaimed(counts)

        hb = heartbeat.Heartbeat(
            cfg, db, self.lease, lambda: self.state, lambda: disp.in_flight, reclaimed
        )
        watch = embedded_watch.EmbeddedWatch(self.pg) if self.pg is not None else None

        def health() -> list[str]:
            reasons = [watch.down_reason] if watch is not None and watch.down_reason else []
            return reasons + ([s] if (s := hb.stalled()) else [])

        ctx = ApiContext(
            cfg=cfg,
            db=api_db,
            bus=bus,
            metrics=self.metrics,
            auth=Authenticator(cfg.tokens),
            readiness=lambda: self.readiness(db, disp),
            serving=lambda: self.state in ("running", "draining"),
            draining=lambda: self.state == "draining",
            health=health,
            plans=self.plans,
        )
        self.api = ApiServer(ctx)

        def drain() -> None:
            self._set_state("draining")
            systemd.notify("STOPPING=1")
            hb.wake()
            bus.close_streams()
            timer.stop()
            disp.stop_claiming()
            cbs.stop_claiming()

        async with anyio.create_task_group() as root:
            # Serve the probes first: while the database is unreachable at start-up
            # /healthz answers and /readyz says why we are not ready.
            await root.start(self.api.run)
            if watch is not None:
                await root.start(watch.run)
            migrated = await dbm.with_retry(lambda: dbm.migrate(db))
            if migrated:
                log.info("app.migrated versions=%s", migrated)
            await root.start(bus.run)
            await root.start(ob.run)
            await root.start(reports.run)
            await hb.register()
            await root.start(hb.run)
            await root.start(reaper.Reaper(cfg, db, reclaimed).run)
            await root.start(sched.run)
            await root.start(pipes.run)
            sample_s = cfg.server.metrics_sample_interval_s
            sampler = metrics_mod.QueueSampler(db, self.metrics, sample_s)
            await root.start(sampler.run)
            await root.start(retention.Retention(cfg, db).run)
            await root.start(systemd.Watchdog(lambda: dispatcher.status_line(disp), health).run)
            await root.start(timer.run)
            async with anyio.create_task_group() as work:
                await work.start(cbs.run)
                await work.start(disp.run)
                self._on_first_signal = drain
                self._on_second_signal = disp.skip_drain
                self._set_state("running")
                systemd.notify("READY=1")
                log.info(
                    "app.ready worker=%s lease=%s port=%s concurrency=%s",
                    cfg.worker.name,
                    self.lease,
                    self.api.port,
                    cfg.worker.concurrency,
                )
            # The work group has ended: every attempt finished or was released.
            with anyio.CancelScope(shield=True):
                with anyio.move_on_after(OUTBOX_FLUSH_TIMEOUT_S) as flush:
                    await ob.wait_empty()
                if flush.cancelled_caught:
                    log.error(
                        "app.outcomes_unwritten count=%s: the database stayed away; the "
                        "items stay running and are reclaimed on restart",
                        ob.pending,
                    )
                self._set_state("stopped")
                await hb.deregister()
            root.cancel_scope.cancel()
        log.info("app.stopped released=%s", disp.released)
        return 0

    def _set_state(self, state: str) -> None:
        self.state = state
        self.metrics.set_state(state)
