"""The typed boundary between the engine and its SQL: one method per named query.

Every query in ``sql/queries.sql`` is called here and nowhere else, with named
keyword arguments, and its rows come back as the frozen records below, so mypy
checks the database boundary like the rest of the code. A caller never spells a
query name, a positional parameter list or a column name; a route never knows a
PL/pgSQL signature. :class:`Queries` runs on the pool (:class:`~supervisor.db.Database`)
or inside one transaction (:class:`~supervisor.db.Tx`), whichever it is given.

Records keep the database's own types (``uuid.UUID`` ids of batches, ``int`` ids
of items, jsonb as its text); turning them into API JSON is ``models``' job.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import uuid
from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import Any, Protocol, Self

import asyncpg

from supervisor import states
from supervisor.db import Record


class Executor(Protocol):
    """What runs a named query: the pool or one transaction."""

    async def fetch(self, name: str, *args: Any) -> list[Record]: ...
    async def fetchrow(self, name: str, *args: Any) -> Record | None: ...
    async def fetchval(self, name: str, *args: Any) -> Any: ...
    async def execute(self, name: str, *args: Any) -> str: ...


_COLUMNS: dict[type[Any], tuple[str, ...]] = {}


def _fields(cls: type[Any]) -> tuple[str, ...]:
    """A record's column names, once per class: ``of`` runs for every claimed row."""
    names = _COLUMNS.get(cls)
    if names is None:
        names = _COLUMNS[cls] = tuple(f.name for f in dataclasses.fields(cls))
    return names


class _FromRecord:
    """Built from a row by column name: a renamed or missing column fails loudly
    here, at the boundary, instead of as a KeyError deep in a caller."""

    @classmethod
    def of(cls, r: Record) -> Self:
        return cls(*(r[name] for name in _fields(cls)))


# --------------------------------------------------------------------------- records


@dataclasses.dataclass(frozen=True, slots=True)
class BatchRow(_FromRecord):
    """One row of ``batches`` (see migrations/0001_initial.sql for each column)."""

    id: uuid.UUID
    tenant: str
    handler: str
    status: str
    priority: int
    max_concurrency: int | None
    max_attempts: int | None
    attempt_budget: int
    max_failures: str | None  # jsonb text
    max_failures_limit: int | None
    stop_reason: str | None
    metadata: str  # jsonb text
    idempotency_key: str | None
    request_hash: str | None
    exclusive_key: str | None  # at most one unfinished batch per (tenant, key); 0012
    after_ids: list[uuid.UUID] | None  # the batches it runs after; 0013
    after_policy: str | None  # states.AfterPolicy, when after_ids is set
    not_before: datetime | None  # no item is claimed before it; 0017
    max_items: int | None  # how far add_items may grow it (None: the daemon's default); 0016
    total: int
    queued: int
    running: int
    succeeded: int
    failed: int
    cancelled: int
    version: int
    created_by: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    callback_handler: str | None
    callback_state: str
    callback_attempts: int
    callback_error: str | None  # jsonb text
    callback_run_after: datetime | None
    callback_lease: uuid.UUID | None
    callback_worker: str | None
    traceparent: str | None  # the W3C trace context it was submitted under; 0025
    tracestate: str | None


@dataclasses.dataclass(frozen=True, slots=True)
class ItemRow(_FromRecord):
    """An item as listed (``error`` is the last entry of its error history)."""

    id: int
    batch_id: uuid.UUID
    key: str | None
    status: str
    payload: str  # jsonb text
    result: str | None  # jsonb text
    attempts: int
    max_attempts: int
    error: str | None  # jsonb text
    run_after: datetime
    worker: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    progress: str | None  # jsonb text: the last report written of its last attempt
    limit_key: str | None  # its handler's key_limit key, set at submission


@dataclasses.dataclass(frozen=True, slots=True)
class ItemDetail(ItemRow):
    """One item with its kept error history."""

    errors: str  # jsonb text: the last entries
    errors_dropped: int  # older entries not kept


@dataclasses.dataclass(frozen=True, slots=True)
class ItemResult(_FromRecord):
    """An item's outcome as a results export shows it: no payload or timestamps,
    so a page of a million-item batch stays small (``error``: its last entry)."""

    id: int
    key: str | None
    status: str
    attempts: int
    result: str | None  # jsonb text
    error: str | None  # jsonb text


@dataclasses.dataclass(frozen=True, slots=True)
class FinishedItem(_FromRecord):
    """An item that reached a terminal state after a batch version (SSE)."""

    id: int
    key: str | None
    status: str
    error: str | None
    finished_version: int


@dataclasses.dataclass(frozen=True, slots=True)
class ProgressedItem(_FromRecord):
    """A running item whose progress was written after some time (SSE)."""

    id: int
    key: str | None
    progress: str  # jsonb text: {"done", "total", "note", "attempt"}
    progress_at: datetime


@dataclasses.dataclass(frozen=True, slots=True)
class BatchEvent(_FromRecord):
    at: datetime
    action: str
    actor: str | None
    detail: str  # jsonb text


@dataclasses.dataclass(frozen=True, slots=True)
class ItemStats(_FromRecord):
    """Inputs of a batch summary: item durations (seconds) and errors by type."""

    p50: float | None
    p95: float | None
    max: float | None
    errors_by_type: str  # jsonb text


@dataclasses.dataclass(frozen=True, slots=True)
class ClaimedItem(_FromRecord):
    """An item a claim marked running under this daemon's lease."""

    id: int
    batch_id: uuid.UUID
    key: str | None
    payload: str
    attempts: int
    max_attempts: int
    batch_metadata: str  # jsonb text (batches.metadata is NOT NULL)


@dataclasses.dataclass(frozen=True, slots=True)
class KeyedClaimedItem(ClaimedItem):
    """A claimed item of a handler with a key limit: its key, and how long it had
    been runnable when claimed (for the limit-wait metrics)."""

    limit_key: str
    waited_s: float
    cost: float | None  # charged to the key's budget (None: the handler has none)
    budget_period_start: datetime | None  # the budget period charged


@dataclasses.dataclass(frozen=True, slots=True)
class KeyUsage(_FromRecord):
    """What one limit key of a handler uses now, over every daemon: its running
    items, its rate bucket's tokens (None: full, no row), its pause (None: not
    paused) and the cost charged to its budget this period (None: none)."""

    limit_key: str
    running: int
    tokens: float | None
    throttled_until: datetime | None
    budget_used: float | None
    budget_period_start: datetime | None


@dataclasses.dataclass(frozen=True, slots=True)
class KeyThrottle(_FromRecord):
    """A limit key paused by its handler's backpressure until ``throttled_until``."""

    handler: str
    limit_key: str
    throttled_until: datetime


@dataclasses.dataclass(frozen=True, slots=True)
class LeasedItem(_FromRecord):
    """An item the database says a lease is running."""

    id: int
    batch_id: uuid.UUID
    attempts: int
    handler: str


@dataclasses.dataclass(frozen=True, slots=True)
class StoppingBatch(_FromRecord):
    batch_id: uuid.UUID
    status: str


@dataclasses.dataclass(frozen=True, slots=True)
class WorkerRegistration(_FromRecord):
    """Another registration under this daemon's worker name."""

    id: uuid.UUID
    host: str
    pid: int
    heartbeat_at: datetime
    age_s: float  # by the database clock


@dataclasses.dataclass(frozen=True, slots=True)
class WorkerRow(_FromRecord):
    name: str
    host: str
    pid: int
    state: str
    started_at: datetime
    heartbeat_at: datetime
    in_flight: int
    concurrency: int


@dataclasses.dataclass(frozen=True, slots=True)
class QueueStats(_FromRecord):
    handler: str
    queued: int
    paused: int
    lag: float


@dataclasses.dataclass(frozen=True, slots=True)
class RunningStats(_FromRecord):
    handler: str
    oldest: float


@dataclasses.dataclass(frozen=True, slots=True)
class UnfinishedStats(_FromRecord):
    status: str
    oldest: float


@dataclasses.dataclass(frozen=True, slots=True)
class Drift(_FromRecord):
    """A batch whose counters or status disagree with its items (``n``..``c``:
    the counts its items give)."""

    id: uuid.UUID
    status: str
    total: int
    queued: int
    running: int
    succeeded: int
    failed: int
    cancelled: int
    n: int
    q: int
    r: int
    s: int
    f: int
    c: int


@dataclasses.dataclass(frozen=True, slots=True)
class StrayItems(_FromRecord):
    batch_id: uuid.UUID
    n: int


@dataclasses.dataclass(frozen=True, slots=True)
class FinishedBatch:
    batch_id: str
    status: str
    seconds: float


@dataclasses.dataclass(frozen=True, slots=True)
class Transitions:
    """What one outcome write or reclaim changed. The transition functions report
    only the exceptions: stale (fenced) writes, the status of items whose outcome
    was not a success (with their handler, for a reclaim), and finished batches;
    everything else succeeded as written."""

    fenced: frozenset[int] = frozenset()
    statuses: dict[int, str] = dataclasses.field(default_factory=dict)
    handlers: dict[int, str] = dataclasses.field(default_factory=dict)
    finished: list[FinishedBatch] = dataclasses.field(default_factory=list)

    @classmethod
    def parse(cls, rows: Sequence[Record]) -> Transitions:
        """The one reader of the rows ``apply_outcomes`` and ``reclaim_leases`` return."""
        fenced: set[int] = set()
        out = cls()
        for r in rows:
            if r["kind"] == "fenced":
                fenced.add(int(r["id"]))
            elif r["kind"] == "item":
                out.statuses[int(r["id"])] = r["status"]
                if r["handler"] is not None:
                    out.handlers[int(r["id"])] = r["handler"]
            else:
                out.finished.append(FinishedBatch(r["id"], r["status"], float(r["seconds"] or 0)))
        return dataclasses.replace(out, fenced=frozenset(fenced))

    def status_of(self, item_id: int) -> str | None:
        """An outcome's item status after the write; None when it was fenced."""
        if item_id in self.fenced:
            return None
        return self.statuses.get(item_id, states.ItemStatus.SUCCEEDED)

    def __or__(self, other: Transitions) -> Transitions:
        return Transitions(
            self.fenced | other.fenced,
            self.statuses | other.statuses,
            self.handlers | other.handlers,
            self.finished + other.finished,
        )


class ControlKind(enum.StrEnum):
    OK = "ok"
    NOT_FOUND = "not_found"
    CONFLICT = "conflict"


@dataclasses.dataclass(frozen=True, slots=True)
class ControlResult:
    """The answer of a batch control function (``'ok'``, ``'not_found'`` or
    ``'conflict:<reason>'`` on the SQL side)."""

    kind: ControlKind
    reason: str = ""

    @classmethod
    def parse(cls, text: str) -> ControlResult:
        head, _, reason = text.partition(":")
        return cls(ControlKind(head), reason)


NOT_FOUND = ControlResult(ControlKind.NOT_FOUND)


@dataclasses.dataclass(frozen=True, slots=True)
class ItemControlResult:
    """The answer of an item control (cancel_item, retry_item): a batch control's
    answer plus the item's status before the control and its batch (both None
    when no item of the tenant has that id), so a conflict can name the status."""

    result: ControlResult
    status: str | None
    batch_id: uuid.UUID | None

    @classmethod
    def of(cls, r: Record) -> ItemControlResult:
        return cls(ControlResult.parse(r["outcome"]), r["status"], r["batch_id"])


@dataclasses.dataclass(frozen=True, slots=True)
class ItemRetried:
    """One item of a bulk retry: retry_item's answer for it and its status before."""

    id: int
    result: ControlResult
    status: str | None


@dataclasses.dataclass(frozen=True, slots=True)
class FailureGroup(_FromRecord):
    """The failed items of a batch whose last error has one type."""

    error_type: str | None
    count: int
    sample_id: int  # the newest failed item of the group
    sample_key: str | None
    sample_message: str | None
    sample_at: str | None  # RFC 3339, as the error entry stores it


# The unique index over the exclusive keys of unfinished batches (migration 0012).
EXCLUSIVE_INDEX = "batches_exclusive"


class ExclusiveKeyTaken(Exception):
    """A write would give an exclusive key a second unfinished batch, and the
    database refused it (index ``batches_exclusive``); nothing was written."""


@contextlib.contextmanager
def _exclusive_refusal() -> Iterator[None]:
    """The exclusive-key index's refusal as :class:`ExclusiveKeyTaken`; any other
    error as it is."""
    try:
        yield
    except asyncpg.UniqueViolationError as exc:
        if exc.constraint_name == EXCLUSIVE_INDEX:
            raise ExclusiveKeyTaken(str(exc)) from exc
        raise


@dataclasses.dataclass(frozen=True, slots=True)
class ScheduleState(_FromRecord):
    """A schedule's durable state, with the database clock it was read at."""

    name: str
    paused: bool
    since: datetime  # slots after this are due
    paused_at: datetime | None
    paused_by: str | None
    last_slot_at: datetime | None  # the latest slot with a run (not manual)
    now: datetime


@dataclasses.dataclass(frozen=True, slots=True)
class ScheduleRun(_FromRecord):
    """One run of a schedule, with its batch's status (None once deleted) or its
    pipeline run's."""

    id: int
    schedule: str
    slot_at: datetime
    kind: str  # scheduled, catch_up, manual
    outcome: str  # created, skipped, missed, failed
    batch_id: uuid.UUID | None
    detail: str | None
    worker: str | None
    created_at: datetime
    batch_status: str | None
    pipeline_run_id: uuid.UUID | None  # what a pipeline schedule's run created
    pipeline_run_status: str | None


@dataclasses.dataclass(frozen=True, slots=True)
class NewScheduleRun:
    """The parameters of ``claim_schedule_slot``."""

    schedule: str
    slot_at: datetime | None  # None: now (a manual run)
    kind: str
    outcome: str
    batch_id: uuid.UUID | None
    detail: str | None
    worker: str
    pipeline_run_id: uuid.UUID | None = None  # a pipeline schedule's run (batch_id None)


@dataclasses.dataclass(frozen=True, slots=True)
class NewBatchRow:
    """The batch row of ``submit_batch``."""

    id: uuid.UUID
    tenant: str
    handler: str
    priority: int
    max_concurrency: int | None
    max_attempts: int | None
    attempt_budget: int
    max_failures: str | None  # JSON text
    max_failures_limit: int | None
    metadata: str  # JSON text
    idempotency_key: str | None
    request_hash: str | None
    total: int
    created_by: str
    callback_handler: str | None
    exclusive_key: str | None
    max_items: int | None = None
    after_ids: Sequence[uuid.UUID] = ()
    after_policy: str | None = None
    runnable: bool = True  # False: created waiting for after_ids
    key_after: uuid.UUID | None = None  # queued behind this batch of its exclusive key
    not_before: datetime | None = None  # scheduled until then (the database's clock)
    traceparent: str | None = None  # the W3C trace context of its submission
    tracestate: str | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class Outcomes:
    """The parameters of ``apply_outcomes``: parallel arrays, one entry per item."""

    lease: uuid.UUID
    batches: list[uuid.UUID]
    ids: list[int]
    attempts: list[int]
    outcomes: list[str]
    results: list[str | None]  # JSON text
    errors: list[str | None]  # JSON text
    delays: list[float]
    actor: str


@dataclasses.dataclass(frozen=True, slots=True)
class AddedItems(_FromRecord):
    """What one attempt's additions to its batch came to (``add_items``)."""

    parent: int  # the item whose attempt added them
    added: int
    skipped: int  # keys already in the batch (or given twice)
    refused: bool  # they would have passed the batch's max_items: none added
    total: int  # the batch's items before this write
    max_items: int


@dataclasses.dataclass(frozen=True, slots=True)
class RunRow(_FromRecord):
    """One row of ``pipeline_runs`` (see migrations/0022_pipelines.sql)."""

    id: uuid.UUID
    tenant: str
    pipeline: str
    status: str
    stages: str  # jsonb text: [{name, handler, items}] as configured at submission
    on_stage_failure: str
    current_stage: int
    paused: bool
    cancel_requested: bool
    degraded: bool
    metadata: str  # jsonb text
    idempotency_key: str | None
    request_hash: str | None
    exclusive_key: str | None
    error: str | None  # jsonb text
    created_by: str
    created_at: datetime
    finished_at: datetime | None


@dataclasses.dataclass(frozen=True, slots=True)
class StageRow(_FromRecord):
    """A run's stage that has started (or was skipped: no batch)."""

    run_id: uuid.UUID
    stage: int
    batch_id: uuid.UUID | None
    batch_status: str | None  # None: skipped, or its batch was deleted


@dataclasses.dataclass(frozen=True, slots=True)
class NewRunRow:
    """The row of ``insert_pipeline_run``."""

    id: uuid.UUID
    tenant: str
    pipeline: str
    stages: str  # JSON text
    on_stage_failure: str
    metadata: str  # JSON text
    idempotency_key: str | None
    request_hash: str | None
    exclusive_key: str | None
    created_by: str


@dataclasses.dataclass(frozen=True, slots=True)
class RunDrift(_FromRecord):
    """A pipeline run whose current stage disagrees with its status (doctor)."""

    id: uuid.UUID
    pipeline: str
    status: str
    current_stage: int
    batch_id: uuid.UUID | None
    batch_status: str | None  # None: the batch is gone


class RunKeyTaken(Exception):
    """Reopening a run would give its exclusive key a second running run, and
    the database refused it (index ``pipeline_runs_exclusive``)."""


# --------------------------------------------------------------------------- queries


class Queries:
    """Every named query, typed. See ``sql/queries.sql`` for what each one does."""

    def __init__(self, ex: Executor) -> None:
        self._ex = ex

    # -- submission and reads ------------------------------------------------------

    async def submit_batch(
        self,
        b: NewBatchRow,
        *,
        item_max_attempts: int,
        keys: Sequence[str | None],
        payloads: Sequence[str],
        created: str,
        limit_keys: Sequence[str] = (),
    ) -> BatchRow | None:
        """Insert the batch, the items given (JSON text payloads; none when they
        follow by COPY), its 'created' event (``created``: JSON text) and the
        wake-ups. None when nothing was inserted: its idempotency key names a batch,
        or an unfinished batch holds its exclusive key (see which with
        :meth:`find_idempotent_batch` and :meth:`find_exclusive_holder`)."""
        r = await self._ex.fetchrow(
            "submit_batch",
            b.id,
            b.tenant,
            b.handler,
            b.priority,
            b.max_concurrency,
            b.max_attempts,
            b.attempt_budget,
            b.max_failures,
            b.max_failures_limit,
            b.metadata,
            b.idempotency_key,
            b.request_hash,
            b.total,
            b.created_by,
            b.callback_handler,
            item_max_attempts,
            keys,
            payloads,
            created,
            b.exclusive_key,
            list(b.after_ids),
            b.after_policy,
            b.runnable,
            b.key_after,
            b.not_before,
            b.max_items,
            limit_keys,
            b.traceparent,
            b.tracestate,
        )
        return None if r is None else BatchRow.of(r)

    async def lock_dependencies(
        self, ids: Sequence[uuid.UUID], *, tenant: str
    ) -> dict[uuid.UUID, str]:
        """Status of each of ``ids`` that is the tenant's, share-locked until the
        transaction ends (run it in the submission's transaction)."""
        rows = await self._ex.fetch("lock_dependencies", list(ids), tenant)
        return {r["id"]: r["status"] for r in rows}

    async def waiting_on(self, batch_id: uuid.UUID) -> list[uuid.UUID]:
        """The dependencies of the batch that have not ended yet."""
        return [r["id"] for r in await self._ex.fetch("waiting_on", batch_id)]

    async def find_idempotent_batch(
        self, *, tenant: str, idempotency_key: str
    ) -> tuple[uuid.UUID, str | None] | None:
        """(batch id, request hash) of the batch the key names."""
        r = await self._ex.fetchrow("find_idempotent_batch", tenant, idempotency_key)
        return None if r is None else (r["id"], r["request_hash"])

    async def find_exclusive_holder(
        self, *, tenant: str, exclusive_key: str
    ) -> tuple[uuid.UUID, str] | None:
        """(batch id, status) of the unfinished batch holding the key, if any."""
        r = await self._ex.fetchrow("find_exclusive_holder", tenant, exclusive_key)
        return None if r is None else (r["id"], r["status"])

    async def exclusive_tail(
        self, *, tenant: str, exclusive_key: str
    ) -> tuple[uuid.UUID, str] | None:
        """(batch id, status) of the key's newest unfinished batch, waiting or not."""
        r = await self._ex.fetchrow("exclusive_tail", tenant, exclusive_key)
        return None if r is None else (r["id"], r["status"])

    async def lock_exclusive_key(self, *, tenant: str, exclusive_key: str) -> None:
        """The key's advisory lock, until the transaction ends."""
        await self._ex.fetchval("lock_exclusive_key", tenant, exclusive_key)

    async def notify_wake(self, channel_payload: str) -> None:
        """Wake idle daemons: a handler name, ``callback`` or a probe."""
        await self._ex.execute("notify_wake", channel_payload)

    async def batch_trace_contexts(
        self, batch_ids: Sequence[uuid.UUID]
    ) -> dict[uuid.UUID, tuple[str, str | None]]:
        """(traceparent, tracestate) of each of these batches that has one."""
        rows = await self._ex.fetch("batch_trace_contexts", list(batch_ids))
        return {r["id"]: (r["traceparent"], r["tracestate"]) for r in rows}

    async def get_batch(self, batch_id: uuid.UUID, *, tenant: str | None) -> BatchRow | None:
        """The batch, if ``tenant`` may see it (None: any tenant)."""
        r = await self._ex.fetchrow("get_batch", batch_id, tenant)
        return None if r is None else BatchRow.of(r)

    async def list_batches(
        self,
        *,
        tenant: str | None,
        status: str | None,
        handler: str | None,
        exclusive_key: str | None,
        before: tuple[datetime, uuid.UUID] | None,
        limit: int,
    ) -> list[BatchRow]:
        """Newest first, after the keyset cursor ``before`` (created_at, id)."""
        at, bid = before if before is not None else (None, None)
        rows = await self._ex.fetch(
            "list_batches", tenant, status, handler, at, bid, limit, exclusive_key
        )
        return [BatchRow.of(r) for r in rows]

    async def list_items(
        self, *, batch_id: uuid.UUID, status: str | None, after: int, limit: int
    ) -> list[ItemRow]:
        rows = await self._ex.fetch("list_items", batch_id, status, after, limit)
        return [ItemRow.of(r) for r in rows]

    async def list_items_by_key(
        self,
        *,
        batch_id: uuid.UUID,
        key_from: str,
        key_to: str,
        status: str | None,
        error_type: str | None,
        after: int,
        limit: int,
    ) -> list[ItemRow]:
        """Items whose key lies in ``[key_from, key_to)`` in byte order, in id
        order after ``after``."""
        rows = await self._ex.fetch(
            "list_items_by_key", batch_id, key_from, key_to, status, error_type, after, limit
        )
        return [ItemRow.of(r) for r in rows]

    async def list_items_by_error_type(
        self, *, batch_id: uuid.UUID, error_type: str, status: str | None, after: int, limit: int
    ) -> list[ItemRow]:
        """Items whose last error has the type ``error_type``, in id order."""
        rows = await self._ex.fetch(
            "list_items_by_error_type", batch_id, error_type, status, after, limit
        )
        return [ItemRow.of(r) for r in rows]

    async def batch_failures(self, batch_id: uuid.UUID, *, limit: int) -> list[FailureGroup]:
        """The batch's failed items grouped by their last error's type, largest first."""
        rows = await self._ex.fetch("batch_failures", batch_id, limit)
        return [FailureGroup.of(r) for r in rows]

    async def item_results(
        self, *, batch_id: uuid.UUID, statuses: Sequence[str] | None, after: int, limit: int
    ) -> list[ItemResult]:
        """Up to ``limit`` outcomes after the item id ``after``, in id order; only
        ``statuses`` when given."""
        chosen = list(statuses) if statuses is not None else None
        rows = await self._ex.fetch("item_results", batch_id, chosen, after, limit)
        return [ItemResult.of(r) for r in rows]

    async def get_item(self, item_id: int, *, tenant: str | None) -> ItemDetail | None:
        r = await self._ex.fetchrow("get_item", item_id, tenant)
        return None if r is None else ItemDetail.of(r)

    async def items_finished_since(
        self, *, batch_id: uuid.UUID, version: int, limit: int
    ) -> list[FinishedItem]:
        rows = await self._ex.fetch("items_finished_since", batch_id, version, limit)
        return [FinishedItem.of(r) for r in rows]

    async def items_progress_since(
        self, *, batch_id: uuid.UUID, since: datetime, limit: int
    ) -> list[ProgressedItem]:
        rows = await self._ex.fetch("items_progress_since", batch_id, since, limit)
        return [ProgressedItem.of(r) for r in rows]

    async def batch_log(self, batch_id: uuid.UUID) -> list[BatchEvent]:
        return [BatchEvent.of(r) for r in await self._ex.fetch("batch_log", batch_id)]

    async def item_stats(self, batch_id: uuid.UUID) -> ItemStats | None:
        r = await self._ex.fetchrow("item_stats", batch_id)
        return None if r is None else ItemStats.of(r)

    # -- batch controls ------------------------------------------------------------

    async def cancel_batch(
        self, batch_id: uuid.UUID, *, tenant: str | None, actor: str
    ) -> ControlResult:
        return ControlResult.parse(await self._ex.fetchval("cancel_batch", batch_id, tenant, actor))

    async def pause_batch(
        self, batch_id: uuid.UUID, *, tenant: str | None, actor: str, pause: bool
    ) -> ControlResult:
        """Pause (``pause``) or resume claiming of the batch's items."""
        text = await self._ex.fetchval("pause_batch", batch_id, tenant, actor, pause)
        return ControlResult.parse(text)

    async def retry_batch(
        self, batch_id: uuid.UUID, *, tenant: str | None, actor: str, include_cancelled: bool
    ) -> ControlResult:
        """Raises :class:`ExclusiveKeyTaken` when reopening a terminal batch would take
        back a key another unfinished batch holds by now."""
        with _exclusive_refusal():
            text = await self._ex.fetchval(
                "retry_batch", batch_id, tenant, actor, include_cancelled
            )
        return ControlResult.parse(text)

    async def cancel_item(
        self, item_id: int, *, tenant: str | None, actor: str
    ) -> ItemControlResult:
        """Cancel one queued or running item (a running one is fenced at once)."""
        r = await self._ex.fetchrow("cancel_item", item_id, tenant, actor)
        assert r is not None  # a function call returns its one row
        return ItemControlResult.of(r)

    async def retry_item(
        self, item_id: int, *, tenant: str | None, actor: str
    ) -> ItemControlResult:
        """Queue one finished item again. Raises :class:`ExclusiveKeyTaken` when
        reopening its batch would take back a key another batch holds by now."""
        with _exclusive_refusal():
            r = await self._ex.fetchrow("retry_item", item_id, tenant, actor)
        assert r is not None
        return ItemControlResult.of(r)

    async def retry_items(
        self,
        batch_id: uuid.UUID,
        *,
        ids: Sequence[int] | None,
        error_type: str | None,
        limit: int,
        tenant: str | None,
        actor: str,
    ) -> list[ItemRetried] | None:
        """Queue chosen items of one batch again, each through retry_item (None:
        the tenant has no such batch). Raises :class:`ExclusiveKeyTaken` when
        reopening the batch would take back a key another batch holds by now;
        then nothing was retried."""
        chosen = list(ids) if ids is not None else None
        with _exclusive_refusal():
            rows = await self._ex.fetch(
                "retry_items", batch_id, chosen, error_type, limit, tenant, actor
            )
        if len(rows) == 1 and rows[0]["item"] is None:
            return None
        return [
            ItemRetried(r["item"], ControlResult.parse(r["outcome"]), r["status"]) for r in rows
        ]

    async def patch_batch(
        self,
        batch_id: uuid.UUID,
        *,
        tenant: str | None,
        actor: str,
        fields: str,  # JSON text: the names of the fields the request sets
        priority: int | None,
        max_concurrency: int | None,
        max_failures: str | None,  # JSON text
        max_failures_limit: int | None,
        not_before: datetime | None,  # with "not_before" in fields; None: now
    ) -> ControlResult:
        text = await self._ex.fetchval(
            "patch_batch",
            batch_id,
            tenant,
            actor,
            fields,
            priority,
            max_concurrency,
            max_failures,
            max_failures_limit,
            not_before,
        )
        return ControlResult.parse(text)

    async def promote_scheduled(self, *, actor: str, limit: int) -> float | None:
        """Release up to ``limit`` scheduled batches whose time has come; the
        seconds until the next one is due by the database's clock (negative: one
        is due but another transaction holds it), None when none is scheduled."""
        value = await self._ex.fetchval("promote_scheduled", actor, limit)
        return None if value is None else float(value)

    async def delete_batch(self, batch_id: uuid.UUID, *, tenant: str | None) -> bool:
        """Whether a terminal batch was deleted (with its items and log)."""
        return await self._ex.fetchval("delete_batch", batch_id, tenant) is not None

    async def redeliver_callback(
        self, batch_id: uuid.UUID, *, tenant: str | None, actor: str
    ) -> ControlResult:
        text = await self._ex.fetchval("redeliver_callback", batch_id, tenant, actor)
        return ControlResult.parse(text)

    # -- claims and outcomes -------------------------------------------------------

    async def claim_items(
        self,
        *,
        handler: str,
        limit: int,
        worker: str,
        lease: uuid.UUID,
        global_cap: int | None,
        rate: float | None,
        burst: float,
    ) -> list[ClaimedItem]:
        rows = await self._ex.fetch(
            "claim_items", handler, limit, worker, lease, global_cap, rate, burst
        )
        return [ClaimedItem.of(r) for r in rows]

    async def claim_keyed_items(
        self,
        *,
        handler: str,
        limit: int,
        worker: str,
        lease: uuid.UUID,
        global_cap: int | None,
        rate: float | None,
        burst: float,
        key_cap: int | None,
        key_rate: float | None,
        key_burst: float,
        budget: float | None = None,
        budget_period_s: float = 60.0,
        cost_path: Sequence[str] | None = None,
    ) -> list[KeyedClaimedItem]:
        """:meth:`claim_items` under the handler's limits per key as well: at most
        ``budget`` cost units (each item's at ``cost_path``, else 1) started per
        key per ``budget_period_s``."""
        rows = await self._ex.fetch(
            "claim_keyed_items",
            handler,
            limit,
            worker,
            lease,
            global_cap,
            rate,
            burst,
            key_cap,
            key_rate,
            key_burst,
            budget,
            budget_period_s,
            None if cost_path is None else list(cost_path),
        )
        return [KeyedClaimedItem.of(r) for r in rows]

    async def correct_key_budgets(
        self,
        *,
        handlers: Sequence[str],
        keys: Sequence[str],
        periods: Sequence[datetime],
        deltas: Sequence[float],
    ) -> None:
        """Add each delta (actual cost minus charged) to its key's budget period,
        if that period is still current."""
        await self._ex.execute(
            "correct_key_budgets", list(handlers), list(keys), list(periods), list(deltas)
        )

    async def throttle_keys(
        self, *, handlers: Sequence[str], keys: Sequence[str], seconds: Sequence[float]
    ) -> None:
        """Pause each (handler, key) for its seconds: no claim starts its items
        before then (a later pause already in place stands)."""
        await self._ex.execute("throttle_keys", list(handlers), list(keys), list(seconds))

    async def key_throttles(self, *, limit: int) -> list[KeyThrottle]:
        """The limit keys paused now, at most ``limit``."""
        return [KeyThrottle.of(r) for r in await self._ex.fetch("key_throttles", limit)]

    async def key_usage(
        self,
        *,
        handler: str,
        key_rate: float | None,
        key_burst: float,
        limit: int,
        budget_period_s: float | None = None,
    ) -> list[KeyUsage]:
        """The keys of ``handler`` that use any of their limits now, busiest
        first, at most ``limit`` (``budget_period_s``: its key budget's period)."""
        rows = await self._ex.fetch(
            "key_usage", handler, key_rate, key_burst, limit, budget_period_s
        )
        return [KeyUsage.of(r) for r in rows]

    async def assign_limit_keys(self, *, handler: str, tokens: Sequence[str]) -> int:
        """Give the handler's queued items without a limit key theirs; how many."""
        return int(await self._ex.fetchval("assign_limit_keys", handler, list(tokens)))

    async def apply_outcomes(self, o: Outcomes) -> Transitions:
        rows = await self._ex.fetch(
            "apply_outcomes",
            o.lease,
            o.batches,
            o.ids,
            o.attempts,
            o.outcomes,
            o.results,
            o.errors,
            o.delays,
            o.actor,
        )
        return Transitions.parse(rows)

    async def add_items(
        self,
        *,
        lease: uuid.UUID,
        batches: list[uuid.UUID],
        parents: list[int],
        attempts: list[int],
        keys: list[str | None],
        payloads: list[str],
        limit_keys: list[str | None],
        default_max: int,
        actor: str,
    ) -> list[AddedItems]:
        """Parallel arrays, one entry per added item (payloads: JSON text); call in
        the outcome write's transaction, before :meth:`apply_outcomes`."""
        rows = await self._ex.fetch(
            "add_items",
            lease,
            batches,
            parents,
            attempts,
            keys,
            payloads,
            limit_keys,
            default_max,
            actor,
        )
        return [AddedItems.of(r) for r in rows]

    async def reclaim_leases(self, leases: list[uuid.UUID], *, actor: str) -> Transitions:
        return Transitions.parse(await self._ex.fetch("reclaim_leases", leases, actor))

    async def running_items_of_lease(self, lease: uuid.UUID) -> list[LeasedItem]:
        return [LeasedItem.of(r) for r in await self._ex.fetch("running_items_of_lease", lease)]

    async def record_progress(
        self,
        *,
        lease: uuid.UUID,
        ids: Sequence[int],
        attempts: Sequence[int],
        progress: Sequence[str],
    ) -> int:
        """Write the latest progress (JSON text) of running attempts of this lease;
        returns how many items took it (the others' attempts are over)."""
        r = await self._ex.fetchrow("record_progress", lease, ids, attempts, progress)
        assert r is not None
        return int(r["items"])

    async def attempts_not_running(
        self, lease: uuid.UUID, attempts: Sequence[tuple[int, int]]
    ) -> list[tuple[int, int]]:
        """Of these ``(item id, attempt)`` pairs, those the database no longer
        runs under ``lease``."""
        if not attempts:
            return []
        rows = await self._ex.fetch(
            "attempts_not_running", lease, [i for i, _ in attempts], [a for _, a in attempts]
        )
        return [(int(r["id"]), int(r["attempt"])) for r in rows]

    async def stopping_batches_of_lease(self, lease: uuid.UUID) -> list[StoppingBatch]:
        rows = await self._ex.fetch("stopping_batches_of_lease", lease)
        return [StoppingBatch.of(r) for r in rows]

    # -- completion callbacks ------------------------------------------------------

    async def claim_callbacks(self, *, limit: int, lease: uuid.UUID, worker: str) -> list[BatchRow]:
        rows = await self._ex.fetch("claim_callbacks", limit, lease, worker)
        return [BatchRow.of(r) for r in rows]

    async def release_orphan_callbacks(
        self, *, lease: uuid.UUID, running: list[uuid.UUID]
    ) -> list[uuid.UUID]:
        """Hand back callbacks under ``lease`` that are not in ``running``."""
        rows = await self._ex.fetch("release_orphan_callbacks", lease, running)
        return [r["id"] for r in rows]

    async def finish_callback(
        self,
        batch_id: uuid.UUID,
        *,
        lease: uuid.UUID,
        attempt: int,
        state: str,
        error: str | None,  # JSON text
        delay_s: float,
        actor: str,
    ) -> None:
        """Fenced: nothing happens unless the lease still holds this attempt."""
        await self._ex.execute(
            "finish_callback", batch_id, lease, attempt, state, error, delay_s, actor
        )

    # -- the worker registry -------------------------------------------------------

    async def register_worker(
        self, *, lease: uuid.UUID, name: str, host: str, pid: int, concurrency: int
    ) -> None:
        await self._ex.execute("register_worker", lease, name, host, pid, concurrency)

    async def heartbeat(self, *, lease: uuid.UUID, state: str, in_flight: int) -> bool:
        """False when this daemon's row is gone (reaped)."""
        return await self._ex.fetchrow("heartbeat", lease, state, in_flight) is not None

    async def deregister_worker(self, lease: uuid.UUID) -> None:
        await self._ex.execute("deregister_worker", lease)

    async def lock_worker_name(self, name: str) -> None:
        await self._ex.execute("lock_worker_name", name)

    async def workers_named(self, name: str, *, besides: uuid.UUID) -> list[WorkerRegistration]:
        rows = await self._ex.fetch("workers_named", name, besides)
        return [WorkerRegistration.of(r) for r in rows]

    async def orphan_leases_of_name(self, name: str, *, besides: uuid.UUID) -> list[uuid.UUID]:
        return [r["id"] for r in await self._ex.fetch("orphan_leases_of_name", name, besides)]

    async def delete_workers(self, leases: list[uuid.UUID]) -> None:
        await self._ex.execute("delete_workers", leases)

    async def bound_idle_transaction(self) -> None:
        await self._ex.execute("bound_idle_transaction")

    async def try_reaper_lock(self) -> bool:
        return bool(await self._ex.fetchval("try_reaper_lock"))

    async def dead_leases(self, *, dead_after_s: float) -> list[uuid.UUID]:
        rows = await self._ex.fetch("dead_leases", dead_after_s)
        return [r["id"] for r in rows if r["id"] is not None]

    async def list_workers(self) -> list[WorkerRow]:
        return [WorkerRow.of(r) for r in await self._ex.fetch("list_workers")]

    # -- operations ----------------------------------------------------------------

    async def queue_stats(self) -> list[QueueStats]:
        return [QueueStats.of(r) for r in await self._ex.fetch("queue_stats")]

    async def running_stats(self) -> list[RunningStats]:
        return [RunningStats.of(r) for r in await self._ex.fetch("running_stats")]

    async def unfinished_batch_stats(self) -> list[UnfinishedStats]:
        return [UnfinishedStats.of(r) for r in await self._ex.fetch("unfinished_batch_stats")]

    async def retention_delete(self, *, finished_before_s: float, limit: int) -> int:
        """Delete up to ``limit`` due terminal batches; how many were deleted."""
        return len(await self._ex.fetch("retention_delete", finished_before_s, limit))

    async def retention_delete_schedule_runs(self, *, created_before_s: float, limit: int) -> int:
        """Forget up to ``limit`` old schedule runs (never a schedule's latest slot)."""
        status = await self._ex.execute("retention_delete_schedule_runs", created_before_s, limit)
        return int(status.rsplit(" ", 1)[-1])

    # -- schedules -------------------------------------------------------------------

    async def ensure_schedules(self, names: Sequence[str]) -> None:
        await self._ex.execute("ensure_schedules", list(names))

    async def schedule_states(self, names: Sequence[str]) -> list[ScheduleState]:
        return [ScheduleState.of(r) for r in await self._ex.fetch("schedule_states", list(names))]

    async def claim_schedule_slot(self, run: NewScheduleRun) -> str:
        """'claimed', 'taken', 'paused' or 'unknown' (see claim_schedule_slot_v2.sql)."""
        verdict: str = await self._ex.fetchval(
            "claim_schedule_slot",
            run.schedule,
            run.slot_at,
            run.kind,
            run.outcome,
            run.batch_id,
            run.pipeline_run_id,
            run.detail,
            run.worker,
        )
        return verdict

    async def schedule_unfinished_batches(self, schedule: str) -> list[uuid.UUID]:
        rows = await self._ex.fetch("schedule_unfinished_batches", schedule)
        return [r["id"] for r in rows]

    async def set_schedule_paused(self, schedule: str, *, paused: bool, actor: str) -> None:
        await self._ex.execute("set_schedule_paused", schedule, paused, actor)

    async def schedule_last_runs(self, names: Sequence[str]) -> list[ScheduleRun]:
        return [ScheduleRun.of(r) for r in await self._ex.fetch("schedule_last_runs", list(names))]

    async def doctor_drift(self) -> list[Drift]:
        return [Drift.of(r) for r in await self._ex.fetch("doctor_drift")]

    async def doctor_orphans(self) -> int:
        return int(await self._ex.fetchval("doctor_orphans"))

    async def doctor_stray_items(self) -> list[StrayItems]:
        return [StrayItems.of(r) for r in await self._ex.fetch("doctor_stray_items")]

    async def doctor_delete_stray_items(self, batch_id: uuid.UUID) -> None:
        await self._ex.execute("doctor_delete_stray_items", batch_id)

    async def doctor_repair(self, batch_id: uuid.UUID, *, actor: str) -> str:
        """Recompute the batch's counters and status; its status after."""
        status: str = await self._ex.fetchval("doctor_repair", batch_id, actor)
        return status

    # -- pipeline runs ---------------------------------------------------------------

    async def insert_pipeline_run(self, r: NewRunRow) -> RunRow | None:
        """None when a unique index refused it (see :meth:`find_idempotent_run`
        and :meth:`find_exclusive_run`); nothing was written."""
        row = await self._ex.fetchrow(
            "insert_pipeline_run",
            r.id,
            r.tenant,
            r.pipeline,
            r.stages,
            r.on_stage_failure,
            r.metadata,
            r.idempotency_key,
            r.request_hash,
            r.exclusive_key,
            r.created_by,
        )
        return None if row is None else RunRow.of(row)

    async def insert_pipeline_stage(
        self, run_id: uuid.UUID, *, stage: int, batch_id: uuid.UUID | None
    ) -> None:
        """Raises asyncpg's UniqueViolationError when the stage has a row already."""
        await self._ex.execute("insert_pipeline_stage", run_id, stage, batch_id)

    async def find_idempotent_run(
        self, *, tenant: str, idempotency_key: str
    ) -> tuple[uuid.UUID, str | None] | None:
        r = await self._ex.fetchrow("find_idempotent_run", tenant, idempotency_key)
        return None if r is None else (r["id"], r["request_hash"])

    async def find_exclusive_run(self, *, tenant: str, exclusive_key: str) -> uuid.UUID | None:
        found = await self._ex.fetchval("find_exclusive_run", tenant, exclusive_key)
        return found if isinstance(found, uuid.UUID) else None

    async def get_pipeline_run(self, run_id: uuid.UUID, *, tenant: str | None) -> RunRow | None:
        r = await self._ex.fetchrow("get_pipeline_run", run_id, tenant)
        return None if r is None else RunRow.of(r)

    async def lock_pipeline_run(self, run_id: uuid.UUID, *, tenant: str | None) -> RunRow | None:
        """The run, locked until the transaction ends (run it in one)."""
        r = await self._ex.fetchrow("lock_pipeline_run", run_id, tenant)
        return None if r is None else RunRow.of(r)

    async def list_pipeline_runs(
        self,
        *,
        tenant: str | None,
        status: str | None,
        pipeline: str | None,
        before: tuple[datetime, uuid.UUID] | None,
        limit: int,
    ) -> list[RunRow]:
        at, rid = before if before is not None else (None, None)
        rows = await self._ex.fetch("list_pipeline_runs", tenant, status, pipeline, at, rid, limit)
        return [RunRow.of(r) for r in rows]

    async def pipeline_stage_rows(self, run_ids: Sequence[uuid.UUID]) -> list[StageRow]:
        rows = await self._ex.fetch("pipeline_stage_rows", list(run_ids))
        return [StageRow.of(r) for r in rows]

    async def claim_pipeline_run(
        self, *, pipelines: Sequence[str]
    ) -> tuple[RunRow, uuid.UUID | None, str | None] | None:
        """A running run of ``pipelines`` due to advance, locked (run it in a
        transaction), with its current stage's batch id and that batch's status
        (None: gone)."""
        r = await self._ex.fetchrow("claim_pipeline_run", list(pipelines))
        if r is None:
            return None
        return RunRow.of(r), r["stage_batch_id"], r["stage_batch_status"]

    async def finish_pipeline_run(
        self, run_id: uuid.UUID, *, status: states.RunStatus, error: str | None
    ) -> None:
        await self._ex.execute("finish_pipeline_run", run_id, status.value, error)

    async def set_pipeline_run_flags(
        self,
        run_id: uuid.UUID,
        *,
        paused: bool | None = None,
        cancel_requested: bool | None = None,
        degraded: bool | None = None,
    ) -> None:
        await self._ex.execute("set_pipeline_run_flags", run_id, paused, cancel_requested, degraded)

    async def reopen_pipeline_run(self, run_id: uuid.UUID) -> None:
        """Raises :class:`RunKeyTaken` when another running run holds its key."""
        try:
            await self._ex.execute("reopen_pipeline_run", run_id)
        except asyncpg.UniqueViolationError as exc:
            if exc.constraint_name == "pipeline_runs_exclusive":
                raise RunKeyTaken(str(exc)) from exc
            raise

    async def doctor_pipeline_runs(self, *, stalled_after_s: float) -> list[RunDrift]:
        rows = await self._ex.fetch("doctor_pipeline_runs", stalled_after_s)
        return [RunDrift.of(r) for r in rows]
