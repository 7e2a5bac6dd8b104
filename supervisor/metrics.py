"""Prometheus metrics (names are part of the contract), one registry per daemon.

Fed by the components at the points where things actually happen: the outbox
after a write lands (item outcomes, finished batches), the dispatcher (in
flight), the database wrapper (errors), the app (worker state) and a sampler
that reads queue depth and lag from the database.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import anyio
import anyio.abc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from supervisor import __version__, states, store
from supervisor import db as dbm
from supervisor.errors import DatabaseUnavailable
from supervisor.executor import OutcomeRecord
from supervisor.outbox import metric_outcome
from supervisor.store import Transitions

log = logging.getLogger(__name__)
PREFIX = "batch_supervisor_"
WORKER_STATES = ("starting", "running", "draining", "stopped")
# Every value of items_total's outcome label (see outbox.metric_outcome).
ITEM_OUTCOMES = ("succeeded", "failed", "retried", "cancelled", "released", "reclaimed")
UNFINISHED_BATCH_STATES = tuple(
    s.value for s in states.BatchStatus if s not in states.BATCH_TERMINAL
)
# Limit keys are payload values (domains, API keys): unbounded. Each handler gets
# a series for its first KEY_SERIES_MAX keys and folds the rest into OTHER_KEY.
KEY_SERIES_MAX = 20
OTHER_KEY = "_other"
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.items = Counter(
            PREFIX + "items_total", "Item attempts by outcome.", ["handler", "outcome"], registry=r
        )
        self.key_throttles = Counter(
            PREFIX + "key_throttles_total",
            "Limit keys paused by their handler's backpressure (RetryAfter scope='key', "
            "an http 429 with Retry-After).",
            ["handler"],
            registry=r,
        )
        self.limit_wait = Histogram(
            PREFIX + "limit_wait_seconds",
            "Items of handlers with a key limit: time from runnable (queued, retry "
            "due) to claimed, where a key's limits hold them.",
            ["handler"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.key_limit_wait = Counter(
            PREFIX + "key_limit_wait_seconds_total",
            "limit_wait_seconds summed per limit key: the first "
            f"{KEY_SERIES_MAX} keys seen per handler, the others as limit_key={OTHER_KEY!r}.",
            ["handler", "limit_key"],
            registry=r,
        )
        self._key_series: dict[str, dict[str, Any]] = {}
        self.item_duration = Histogram(
            PREFIX + "item_duration_seconds",
            "Handler attempt duration.",
            ["handler", "outcome"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            PREFIX + "items_in_flight", "Items running in this daemon.", ["handler"], registry=r
        )
        self.claimed_waiting = Gauge(
            PREFIX + "items_claimed_waiting",
            "Items this daemon has claimed that wait for a worker (not started yet).",
            ["handler"],
            registry=r,
        )
        self.paused = Gauge(
            PREFIX + "items_paused",
            "Queued items of paused batches (sampled).",
            ["handler"],
            registry=r,
        )
        self.oldest_running = Gauge(
            PREFIX + "oldest_running_attempt_seconds",
            "Age of the oldest running attempt, any daemon (sampled).",
            ["handler"],
            registry=r,
        )
        self.oldest_batch = Gauge(
            PREFIX + "oldest_unfinished_batch_seconds",
            "Age of the oldest batch that is not terminal, by status (sampled).",
            ["status"],
            registry=r,
        )
        self.threads_abandoned = Gauge(
            PREFIX + "handler_threads_abandoned",
            "Threads of plain-def python handlers still running after their attempt ended.",
            ["handler"],
            registry=r,
        )
        self.progress_stalled = Gauge(
            PREFIX + "progress_stalled_seconds",
            "Longest time a running attempt of this daemon has gone without a progress "
            "report, among attempts that reported at least once (0: none).",
            ["handler"],
            registry=r,
        )
        self.queued = Gauge(
            PREFIX + "items_queued",
            "Runnable items in the database (sampled).",
            ["handler"],
            registry=r,
        )
        self.queue_lag = Gauge(
            PREFIX + "queue_lag_seconds",
            "Age of the oldest runnable queued item (sampled).",
            ["handler"],
            registry=r,
        )
        self.batches_finished = Counter(
            PREFIX + "batches_finished_total",
            "Batches that reached a terminal state.",
            ["status"],
            registry=r,
        )
        self.batch_duration = Histogram(
            PREFIX + "batch_duration_seconds",
            "Batch duration from creation to terminal state.",
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.callbacks = Counter(
            PREFIX + "callbacks_total", "Completion callback attempts.", ["outcome"], registry=r
        )
        self.db_errors = Counter(
            PREFIX + "db_errors_total", "Transient database errors.", ["operation"], registry=r
        )
        self.worker_state = Gauge(
            PREFIX + "worker_state", "1 for the current worker state.", ["state"], registry=r
        )
        self.build_info = Gauge(
            PREFIX + "build_info", "Build information.", ["version"], registry=r
        )
        self.build_info.labels(__version__).set(1)
        self._duration_children: dict[tuple[str, str], Any] = {}
        self.set_state("starting")

    def set_state(self, state: str) -> None:
        for s in WORKER_STATES:
            self.worker_state.labels(s).set(1 if s == state else 0)

    def track_in_flight(
        self,
        handlers: Iterable[str],
        running: Callable[[str], int],
        waiting: Callable[[str], int],
    ) -> None:
        """The in-flight and claimed-waiting gauges read the dispatcher's counts when
        scraped: nothing to do per attempt on the hot path. Every handler's item
        counters start at 0, so that ``rate()`` and ``increase()`` see a freshly
        started daemon that finishes nothing (a stuck queue after a restart)."""
        for name in handlers:
            self.in_flight.labels(name).set_function(functools.partial(running, name))
            self.claimed_waiting.labels(name).set_function(functools.partial(waiting, name))
            for outcome in ITEM_OUTCOMES:
                self.items.labels(name, outcome)

    def track_abandoned_threads(self, handler: str, count: Callable[[], int]) -> None:
        self.threads_abandoned.labels(handler).set_function(count)

    def track_progress_stalls(
        self, handlers: Iterable[str], stalled_s: Callable[[], Mapping[str, float]]
    ) -> None:
        """The stalled-progress gauge reads the progress reports when scraped."""
        for name in handlers:
            self.progress_stalled.labels(name).set_function(
                functools.partial(lambda h: stalled_s().get(h, 0.0), name)
            )

    def limit_waited(self, handler: str, waits: Sequence[tuple[str, float]]) -> None:
        """A keyed claim's items: each (limit key, seconds it had been runnable)."""
        if not waits:
            return
        hist = self.limit_wait.labels(handler)
        series = self._key_series.setdefault(handler, {})
        for limit_key, seconds in waits:
            hist.observe(seconds)
            child = series.get(limit_key)
            if child is None:
                # A key keeps its series once it has one: moving a key between
                # its own series and OTHER_KEY would make both counters jump.
                label = limit_key if len(series) < KEY_SERIES_MAX else OTHER_KEY
                child = self.key_limit_wait.labels(handler, label)
                if label != OTHER_KEY:
                    series[limit_key] = child
            child.inc(seconds)

    def db_error(self, operation: str) -> None:
        self.db_errors.labels(operation).inc()

    def applied(self, chunk: Sequence[OutcomeRecord], applied: Transitions) -> None:
        # Label lookups are the expensive part: resolve each (handler, outcome) once.
        counts: dict[tuple[str, str], int] = {}
        for rec in chunk:
            status = applied.status_of(rec.item_id)
            if status is None:
                continue  # fenced: counted by the outbox log, not as an outcome
            key = (rec.handler, metric_outcome(rec, status))
            counts[key] = counts.get(key, 0) + 1
            hist = self._duration_children.get(key)
            if hist is None:
                hist = self._duration_children[key] = self.item_duration.labels(*key)
            hist.observe(rec.duration_s)
        for key, n in counts.items():
            self.items.labels(*key).inc(n)
        for rec in chunk:
            if rec.throttle_key is not None:  # written with the outcome, fenced or not
                self.key_throttles.labels(rec.handler).inc()
        for done in applied.finished:
            self.finished(done.status, done.seconds)

    def finished(self, status: str, seconds: float) -> None:
        self.batches_finished.labels(status).inc()
        self.batch_duration.observe(seconds)

    def reclaimed(self, handler_counts: dict[str, int]) -> None:
        for handler, n in handler_counts.items():
            self.items.labels(handler, "reclaimed").inc(n)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class QueueSampler:
    """Samples queue depth and lag per handler from the database."""

    def __init__(self, db: dbm.Database, metrics: Metrics, interval_s: float = 5.0) -> None:
        self._db = db
        self._metrics = metrics
        self._interval = interval_s

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        task_status.started()
        seen: set[str] = set()
        while True:
            try:
                # One snapshot: read apart, an item claimed between the reads was
                # counted as queued and as running at once.
                async with self._db.transaction("metrics_sample", snapshot=True) as tx:
                    q = store.Queries(tx)
                    rows: list[store.QueueStats] | None = await q.queue_stats()
                    running = await q.running_stats()
                    batches = await q.unfinished_batch_stats()
            except DatabaseUnavailable:
                rows = None  # keep the last sample; the outage is reported elsewhere
            if rows is not None:
                m = self._metrics
                oldest = {r.handler: float(r.oldest or 0) for r in running}
                now = {r.handler for r in rows} | set(oldest)
                by_handler = {r.handler: r for r in rows}
                for h in now | seen:
                    r = by_handler.get(h)
                    m.queued.labels(h).set((r.queued or 0) if r else 0)
                    m.paused.labels(h).set((r.paused or 0) if r else 0)
                    m.queue_lag.labels(h).set(float(r.lag or 0) if r else 0.0)
                    m.oldest_running.labels(h).set(oldest.get(h, 0.0))
                ages = {b.status: float(b.oldest or 0) for b in batches}
                for status in UNFINISHED_BATCH_STATES:
                    m.oldest_batch.labels(status).set(ages.get(status, 0.0))
                seen |= now
            await anyio.sleep(self._interval)
