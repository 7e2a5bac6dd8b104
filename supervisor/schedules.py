"""Scheduled batches and pipeline runs (``[schedules.NAME]``): which slots of a
cron expression are due, firing one through the ordinary submission path (a
batch of ``handler``, or a run of ``pipeline``), and the component that sleeps
until the next slot of any schedule.

No daemon leads. Every daemon computes the same due slots from the database's
clock and the schedule's durable state (``since``, its latest slot with a run)
and tries to fire them; a slot is fired by the transaction that inserts its
``schedule_runs`` row and its batch together (``claim_schedule_slot`` first in
``batches.submit``'s transaction; for a pipeline, in ``pipeline_runs.submit``'s,
with the run and its first stage's batch), so of N daemons exactly one creates
the batch or run and the others find the slot taken.

Slot rules, evaluated at each tick with the database's ``now``:

- the due slots are those after the cursor (the later of ``since`` and the
  latest slot with a run) up to ``now``;
- the newest due slot fires as ``scheduled`` if it is at most ``grace`` old;
- every other due slot was missed (no daemon ran in time): ``catch_up =
  "latest"`` fires the newest of them once (kind ``catch_up``), ``"skip"``
  records it as ``missed``; either way the older ones are passed over, never
  fired one by one after a long outage.

Overlap (the schedule's previous batch still unfinished) is decided on the
schedule's exclusive key: ``skip`` submits with on_conflict reject and records
the slot as ``skipped`` when refused, ``queue`` submits with on_conflict queue,
``cancel`` cancels the earlier runs' unfinished batches in the slot's
transaction and then queues behind them (so the new batch starts once they
have stopped). A pipeline run cannot wait for its exclusive key, so a pipeline
schedule takes ``skip`` only (the configuration refuses the others): a running
run holding the key makes the slot ``skipped``.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import logging
import time
import zoneinfo
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import anyio.abc
import anyio.to_thread
import cronsim

from supervisor import batches, key_limits, models, pipeline_runs, store
from supervisor import db as dbm
from supervisor.api import schemas
from supervisor.api.problems import Problem
from supervisor.config import Config, ScheduleConfig
from supervisor.errors import ConfigError, DatabaseUnavailable

log = logging.getLogger(__name__)
# The longest sleep between ticks: the loop re-reads the database's clock and the
# schedules' state at least this often, whatever the next slot.
MAX_SLEEP_S = 30.0
# After a database error, the next try.
RETRY_S = 1.0
# Wake this long after a slot, so the database's clock has certainly passed it.
AFTER_SLOT_S = 0.005
_TINY = timedelta(microseconds=1)
# Worker threads of a daemon's plain-def items_from functions, apart from anyio's
# default pool that python handlers use: threads of hung functions (abandoned at
# their timeout) use these up, never the handlers' ones, and no more than these.
ITEMS_THREADS = 4


# ------------------------------------------------------------------------ slot arithmetic


def _zone(sched: ScheduleConfig) -> zoneinfo.ZoneInfo:
    return zoneinfo.ZoneInfo(sched.timezone)


def next_slot(sched: ScheduleConfig, after: datetime) -> datetime | None:
    """The first slot strictly after ``after`` (aware, any zone), in UTC; None
    if the expression never fires again."""
    try:
        return next(cronsim.CronSim(sched.cron, after.astimezone(_zone(sched)))).astimezone(UTC)
    except StopIteration:
        return None


def slot_at_or_before(sched: ScheduleConfig, t: datetime) -> datetime | None:
    """The latest slot at or before ``t``, in UTC (None before the first one)."""
    # Backwards, cronsim returns the first match strictly before its start, and a
    # start with microseconds is first truncated: start just after ``t``.
    start = t if t.microsecond else t + _TINY
    try:
        it = cronsim.CronSim(sched.cron, start.astimezone(_zone(sched)), reverse=True)
        return next(it).astimezone(UTC)
    except StopIteration:
        return None


@dataclasses.dataclass(frozen=True)
class Due:
    """A slot to act on: fire it as ``scheduled`` or ``catch_up``, or record it
    ``missed``."""

    slot_at: datetime
    kind: str  # "scheduled", "catch_up" or "missed"


def due_slots(sched: ScheduleConfig, *, cursor: datetime, now: datetime) -> list[Due]:
    """What to do at ``now`` for the slots after ``cursor`` (see the module's
    rules), oldest first."""
    first = next_slot(sched, cursor)
    if first is None or first > now:
        return []
    newest = slot_at_or_before(sched, now)
    if newest is None or newest < first:  # cannot be: first itself is at or before now
        newest = first
    on_time = (now - newest).total_seconds() <= sched.grace_s
    missed = newest if not on_time else (slot_at_or_before(sched, newest - _TINY))
    out: list[Due] = []
    if missed is not None and missed > cursor:
        out.append(Due(missed, "catch_up" if sched.catch_up == "latest" else "missed"))
    if on_time:
        out.append(Due(newest, "scheduled"))
    return out


# ------------------------------------------------------------------------ building batches


@dataclasses.dataclass(frozen=True)
class Slot:
    """What an ``items_from`` function is called with."""

    schedule: str
    slot_at: datetime  # in the schedule's time zone
    kind: str  # "scheduled", "catch_up" or "manual"


class ItemsFailed(Exception):
    """``items_from`` raised, or its items are not what POST /v1/batches accepts
    (``errors``: the validation errors, JSON Pointers into the batch's body)."""

    def __init__(self, text: str, errors: list[dict[str, str]] | None = None) -> None:
        super().__init__(text)
        self.errors = errors or []


class SlotTaken(Exception):
    """The slot already has a run (another daemon fired it), or the schedule was
    paused meanwhile: nothing was written."""


@dataclasses.dataclass(frozen=True)
class Plan:
    """A configured schedule, checked: its static items validated once, its
    ``items_from`` function imported."""

    cfg: ScheduleConfig
    items_from: Any = None  # the callable, when items come from one
    # its handler's (a pipeline's: its first stage's) key_limit key: items get limit keys
    key_pointer: str | None = None
    cost_pointer: str | None = None  # its key budget's cost: checked in each item

    def metadata(self, slot: Slot) -> dict[str, Any]:
        """The run's metadata: the configured one, and which slot fired it."""
        c = self.cfg
        return dict(c.metadata) | {
            "schedule": {
                "name": c.name,
                "slot_at": models.rfc3339(slot.slot_at.astimezone(UTC)),
                "kind": slot.kind,
            }
        }

    def body(self, items: list[Any], slot: Slot) -> dict[str, Any]:
        """The POST /v1/batches body of one run."""
        c = self.cfg
        body: dict[str, Any] = {
            "handler": c.handler,
            "items": items,
            "priority": c.priority,
            "metadata": self.metadata(slot),
            "exclusive_key": c.key,
        }
        if c.max_attempts is not None:
            body["max_attempts"] = c.max_attempts
        if c.overlap in ("queue", "cancel"):
            body["on_conflict"] = "queue"
        return body

    def submission(self, items: list[Any], slot: Slot, max_items: int) -> batches.NewBatch:
        """The validated submission, exactly as the API would validate it."""
        try:
            return schemas.submission(
                self.body(items, slot),
                header_key=None,
                handler_exists=lambda name: name == self.cfg.handler,
                max_items=max_items,
                key_pointer=lambda _handler: self.key_pointer,
                cost_pointer=lambda _handler: self.cost_pointer,
            )
        except Problem as exc:
            raise _items_failed(exc) from None

    def run_submission(self, items: list[Any], slot: Slot, max_items: int) -> pipeline_runs.NewRun:
        """A pipeline schedule's run, validated exactly as POST
        /v1/pipelines/{name}/runs would validate its body."""
        pointer = self.key_pointer
        body = {"items": items, "metadata": self.metadata(slot), "exclusive_key": self.cfg.key}
        try:
            return schemas.run_submission(
                body,
                pipeline=self.cfg.pipeline,
                header_key=None,
                max_items=max_items,
                key_limit=(pointer, key_limits.parse_pointer(pointer)) if pointer else None,
            )
        except Problem as exc:
            raise _items_failed(exc) from None

    def validate(self, items: list[Any], slot: Slot, max_items: int) -> None:
        """Raise ItemsFailed unless these items make a valid run."""
        if self.cfg.pipeline:
            self.run_submission(items, slot, max_items)
        else:
            self.submission(items, slot, max_items)

    async def items(self, slot: Slot, threads: anyio.CapacityLimiter) -> list[Any]:
        """The run's items: the static ones, or what ``items_from`` returns (a
        plain def runs in a thread of ``threads``)."""
        if self.items_from is None:
            return list(self.cfg.items)
        fn = self.items_from
        limit = self.cfg.items_timeout_s
        try:
            # A hung function must not stop this daemon's other schedules: past the
            # limit the run fails (a thread that never returns is abandoned).
            with anyio.fail_after(limit):
                if inspect.iscoroutinefunction(fn):
                    got = await fn(slot)
                else:
                    got = await anyio.to_thread.run_sync(
                        fn, slot, abandon_on_cancel=True, limiter=threads
                    )
            return list(got)
        except TimeoutError:
            raise ItemsFailed(
                f"items_from {self.cfg.items_from!r} did not return within {limit:g}s"
            ) from None
        except Exception as exc:  # the operator's code: its failure is this run's outcome
            raise ItemsFailed(
                f"items_from {self.cfg.items_from!r} raised {type(exc).__name__}: {exc}"
            ) from exc


def _items_failed(exc: Problem) -> ItemsFailed:
    errors = exc.errors or [{"path": "", "message": exc.detail}]
    return ItemsFailed("; ".join(f"{e['path'] or '/'}: {e['message']}" for e in errors[:5]), errors)


def _load(sched: ScheduleConfig) -> Any:
    module_name, _, attr = sched.items_from.partition(":")
    where = f"schedules.{sched.name}.items_from"
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:  # any import-time failure makes the schedule unusable
        raise ConfigError([f"{where}: cannot import {module_name!r}: {exc}"]) from exc
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError([f"{where}: module {module_name!r} has no attribute {attr!r}"])
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError([f"{where}: {attr!r} is not callable"])
    return obj


def build_all(cfg: Config) -> dict[str, Plan]:
    """Every configured schedule checked, or ConfigError listing every problem:
    static items are validated now (as the API would), not at 2 a.m."""
    plans: dict[str, Plan] = {}
    problems: list[str] = []
    probe = Slot("probe", datetime.now(UTC), "scheduled")
    for name, sched in cfg.schedules.items():
        try:
            handler = sched.handler
            if sched.pipeline:  # its items are the first stage's
                handler = cfg.pipelines[sched.pipeline].stages[0].handler
            hcfg = cfg.handlers.get(handler)
            kl = hcfg.key_limit if hcfg is not None else None
            plan = Plan(
                sched,
                _load(sched) if sched.items_from else None,
                kl.key if kl is not None else None,
                kl.cost if kl is not None and kl.budget is not None else None,
            )
            if plan.items_from is None:
                plan.validate(list(sched.items), probe, cfg.server.max_items_per_batch)
            plans[name] = plan
        except ConfigError as exc:
            problems += exc.problems
        except ItemsFailed as exc:
            for e in exc.errors or [{"path": "/items", "message": str(exc)}]:
                # The body's top-level field is the schedule's key of the same name.
                field = e["path"].split("/")[1] if e["path"].startswith("/") else "items"
                problems.append(f"schedules.{name}.{field}: {e['path']}: {e['message']}")
    if problems:
        raise ConfigError(problems)
    return plans


# ------------------------------------------------------------------------ firing


@dataclasses.dataclass(frozen=True)
class Fired:
    """What one attempt at a run did: its outcome (``created``, ``skipped``,
    ``missed``, ``failed``, or ``taken`` when another daemon had fired it), and
    the batch (or, for a pipeline schedule, the pipeline run) it created."""

    outcome: str
    batch: dict[str, Any] | None = None
    detail: str | None = None
    run: dict[str, Any] | None = None


async def fire(
    db: dbm.Database,
    cfg: Config,
    plan: Plan,
    *,
    slot_at: datetime | None,
    kind: str,
    worker: str,
    actor: str | None = None,
    threads: anyio.CapacityLimiter | None = None,
) -> Fired:
    """One run: ``kind`` "scheduled" or "catch_up" for a slot, "manual" (with
    ``slot_at`` None) for run-now, "missed" to record a passed-over slot.
    A manual run refused by the overlap policy raises ExclusiveKeyBusy (a
    pipeline schedule's: RunKeyBusy).
    ``threads``: for a plain-def items_from (default: a thread of its own)."""
    name = plan.cfg.name
    q = store.Queries(db)

    async def record(outcome: str, detail: str) -> Fired:
        if kind == "manual":
            return Fired(outcome, detail=detail)
        # A missed slot is the catch-up policy's to handle, as a run without a batch.
        run_kind = "catch_up" if kind == "missed" else kind
        verdict = await q.claim_schedule_slot(
            store.NewScheduleRun(name, slot_at, run_kind, outcome, None, detail, worker)
        )
        return Fired(outcome if verdict == "claimed" else "taken", detail=detail)

    if kind == "missed":
        return await record("missed", "no daemon fired it in time (catch_up = skip)")
    when = slot_at or datetime.now(UTC)
    slot = Slot(name, when.astimezone(_zone(plan.cfg)), kind)
    try:
        items = await plan.items(slot, threads or anyio.CapacityLimiter(1))
        if plan.cfg.pipeline:
            nr = plan.run_submission(items, slot, cfg.server.max_items_per_batch)
        else:
            nb = plan.submission(items, slot, cfg.server.max_items_per_batch)
    except ItemsFailed as exc:
        log.error("schedules.items_failed schedule=%s slot=%s: %s", name, when.isoformat(), exc)
        if kind == "manual":
            raise
        return await record("failed", str(exc))

    async def claim(tx: store.Queries, batch_id: Any = None, pipeline_run_id: Any = None) -> None:
        verdict = await tx.claim_schedule_slot(
            store.NewScheduleRun(
                name, slot_at, kind, "created", batch_id, None, worker, pipeline_run_id
            )
        )
        if verdict != "claimed":
            raise SlotTaken(verdict)
        if plan.cfg.overlap == "cancel":
            for earlier in await tx.schedule_unfinished_batches(name):
                await tx.cancel_batch(earlier, tenant=None, actor=f"schedule:{name}")

    who = actor or f"schedule:{name}"
    if plan.cfg.pipeline:
        # Overlap is "skip" (config refuses the others): a run holding the key refuses it.
        try:
            run, _ = await pipeline_runs.submit(
                db,
                cfg,
                nr,
                tenant=plan.cfg.tenant,
                actor=who,
                in_tx=lambda tx, run_id: claim(tx, pipeline_run_id=run_id),
            )
        except SlotTaken as exc:
            return Fired("taken", detail=str(exc))
        except pipeline_runs.RunKeyBusy as exc:
            if kind == "manual":
                raise
            log.info("schedules.skipped schedule=%s slot=%s: %s", name, when.isoformat(), exc)
            return await record("skipped", str(exc))
        log.info(
            "schedules.fired schedule=%s slot=%s kind=%s pipeline_run=%s",
            name,
            when.isoformat(),
            kind,
            run.id,
        )
        return Fired("created", run=await pipeline_runs.describe(q, run))

    hcfg = cfg.handlers[plan.cfg.handler]
    try:
        sub = await batches.submit(
            db,
            nb,
            tenant=plan.cfg.tenant,
            actor=who,
            attempt_budget=hcfg.max_attempts,
            callback_handler=hcfg.on_complete,
            in_tx=claim,
        )
    except SlotTaken as exc:
        return Fired("taken", detail=str(exc))
    except batches.ExclusiveKeyBusy as exc:
        if kind == "manual":
            raise
        log.info("schedules.skipped schedule=%s slot=%s: %s", name, when.isoformat(), exc)
        return await record("skipped", str(exc))
    log.info(
        "schedules.fired schedule=%s slot=%s kind=%s batch=%s",
        name,
        when.isoformat(),
        kind,
        sub.batch["id"],
    )
    return Fired("created", batch=sub.batch)


# ------------------------------------------------------------------------ the component


class Schedules:
    """Sleeps until the next slot of any schedule, then fires what is due."""

    def __init__(self, cfg: Config, db: dbm.Database, plans: Mapping[str, Plan]) -> None:
        self._cfg = cfg
        self._db = db
        self._q = store.Queries(db)
        self._plans = dict(plans)
        self._scope = anyio.CancelScope()
        self._threads: anyio.CapacityLimiter | None = None  # made in run's event loop

    def stop(self) -> None:
        """Fire nothing more (a draining daemon); harmless before start or twice."""
        self._scope.cancel()

    async def tick(self) -> float:
        """Fire every due slot; seconds until the next slot of any schedule."""
        started = time.monotonic()
        states = await self._q.schedule_states(list(self._plans))
        if len(states) < len(self._plans):  # a schedule added since start, or rows deleted
            await self._q.ensure_schedules(list(self._plans))
            return 0.0
        wake = MAX_SLEEP_S
        for st in states:
            plan = self._plans[st.name]
            if not st.paused:
                cursor = max(st.since, st.last_slot_at or st.since)
                for d in due_slots(plan.cfg, cursor=cursor, now=st.now):
                    await fire(
                        self._db,
                        self._cfg,
                        plan,
                        slot_at=d.slot_at,
                        kind=d.kind,
                        worker=self._cfg.worker.name,
                        threads=self._threads,
                    )
            upcoming = next_slot(plan.cfg, st.now)
            if upcoming is not None:
                wake = min(wake, (upcoming - st.now).total_seconds())
        return max(0.0, wake - (time.monotonic() - started)) + AFTER_SLOT_S

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        with self._scope:
            if not self._plans:
                task_status.started()
                return
            self._threads = anyio.CapacityLimiter(ITEMS_THREADS)
            await dbm.with_retry(lambda: self._q.ensure_schedules(list(self._plans)))
            task_status.started()
            while True:
                try:
                    delay = await self.tick()
                except DatabaseUnavailable as exc:
                    log.warning("schedules.tick_failed error=%s", exc)
                    delay = RETRY_S
                await anyio.sleep(delay)


# ------------------------------------------------------------------------ reading


def _iso(t: datetime | None) -> str | None:
    return None if t is None else models.rfc3339(t.astimezone(UTC))


def run_json(r: store.ScheduleRun | None) -> dict[str, Any] | None:
    if r is None:
        return None
    return {
        "slot_at": _iso(r.slot_at),
        "kind": r.kind,
        "outcome": r.outcome,
        "batch_id": None if r.batch_id is None else str(r.batch_id),
        "batch_status": r.batch_status,
        "pipeline_run_id": None if r.pipeline_run_id is None else str(r.pipeline_run_id),
        "pipeline_run_status": r.pipeline_run_status,
        "detail": r.detail,
        "fired_at": _iso(r.created_at),
        "worker": r.worker,
    }


async def describe(q: store.Queries, plans: list[Plan]) -> list[dict[str, Any]]:
    """The JSON of these schedules: definition, pause state, next fire time and
    the latest slot run and manual run (two queries whatever their number)."""
    names = [p.cfg.name for p in plans]
    states = {s.name: s for s in await q.schedule_states(names)}
    runs = await q.schedule_last_runs(names)
    out: list[dict[str, Any]] = []
    now = datetime.now(UTC)
    for plan in plans:
        c = plan.cfg
        st = states.get(c.name)
        paused = st is not None and st.paused
        clock = st.now if st is not None else now
        since = st.since if st is not None else clock
        mine = [r for r in runs if r.schedule == c.name]
        out.append(
            {
                "name": c.name,
                "cron": c.cron,
                "timezone": c.timezone,
                "handler": c.handler or None,
                "pipeline": c.pipeline or None,
                "items_from": c.items_from or None,
                "exclusive_key": c.key,
                "overlap": c.overlap,
                "catch_up": c.catch_up,
                "grace_seconds": c.grace_s,
                "paused": paused,
                "paused_at": _iso(st.paused_at) if st is not None else None,
                "paused_by": st.paused_by if st is not None else None,
                "next_fire_at": None if paused else _iso(next_slot(c, max(clock, since))),
                "last_slot": run_json(next((r for r in mine if r.kind != "manual"), None)),
                "last_manual_run": run_json(next((r for r in mine if r.kind == "manual"), None)),
            }
        )
    return out
