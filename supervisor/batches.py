"""Batch operations shared by the API, the CLI and callbacks: submission (all or
nothing: batch row, every item, audit entry, wake-up), reads,
summaries and the controls (cancel, pause, resume, retry, patch, delete; the
item controls retry and cancel).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from supervisor import db as dbm
from supervisor import models, states, store, tracecontext

ITEM_COLUMNS = ("batch_id", "seq", "key", "handler", "payload", "max_attempts")
# Up to this many items go into the submission's one statement as arrays; more
# are copied (COPY is several times faster per row, and costs its own round trips).
INLINE_ITEMS = 1000
# Fields added after idempotency digests were first stored: left out of the digest
# while unset, so a repeat of a request made before they existed still matches it.
_DIGEST_WHEN_SET = frozenset(
    {"exclusive_key", "after", "after_policy", "on_conflict", "not_before", "max_items"}
)
# A refused write looks up who refused it; that one may have finished (or been
# deleted) in between, and then the write is tried again, this many times at most.
KEY_ROUNDS = 5


@dataclasses.dataclass(frozen=True)
class NewBatch:
    """A validated submission (see api/schemas.py)."""

    handler: str
    items: Sequence[tuple[str | None, str]]  # (key, payload as JSON text)
    priority: int = 0
    max_concurrency: int | None = None
    max_attempts: int | None = None
    max_failures: int | str | None = None
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)
    idempotency_key: str | None = None
    on_complete: str | None = None
    exclusive_key: str | None = None  # at most one unfinished batch per (tenant, key)
    after: tuple[uuid.UUID, ...] | None = None  # runs once these have ended (as after_policy says)
    after_policy: states.AfterPolicy | None = None  # set exactly when ``after`` is
    on_conflict: str | None = None  # "queue": wait behind the key's batches; else refused
    not_before: datetime | None = None  # in UTC; no item is claimed before it
    max_items: int | None = None  # how far handlers may grow it (add_items); None: the server's
    # The items' limit keys (key_limits.py), in item order; None when the handler
    # has no key limit. Derived from the payloads, so not part of the request digest.
    limit_keys: Sequence[str] | None = None
    # The W3C trace context it was submitted under (the request's headers): who
    # traces it, not what it is, so not part of the request digest either.
    trace: tracecontext.TraceContext | None = None

    def request_hash(self) -> str:
        """Digest of the content, to tell an idempotent repeat from a conflicting one."""
        head = {
            f.name: value
            for f in dataclasses.fields(self)
            if f.name not in ("items", "limit_keys", "trace")
            and not ((value := getattr(self, f.name)) is None and f.name in _DIGEST_WHEN_SET)
        }
        h = hashlib.sha256(json.dumps(head, sort_keys=True, default=str).encode())
        h.update("\x1e".join(f"{key or ''}\x1f{payload}" for key, payload in self.items).encode())
        return h.hexdigest()


def failure_limit(max_failures: int | str | None, total: int) -> int | None:
    """The failure budget as a count: an integer, or "N%" of ``total``."""
    if max_failures is None:
        return None
    if isinstance(max_failures, str):
        return math.floor(total * float(max_failures.rstrip("%")) / 100)
    return int(max_failures)


@dataclasses.dataclass(frozen=True)
class Submitted:
    batch: dict[str, Any]
    created: bool  # False: an idempotent repeat of an earlier submission


class IdempotencyConflict(Exception):
    """The idempotency key was used before with different content."""

    def __init__(self, batch_id: str) -> None:
        super().__init__(f"idempotency key already used by batch {batch_id} with different content")
        self.batch_id = batch_id


class UnknownDependencies(Exception):
    """``after`` names batches the tenant does not have (a 422 naming ``after``)."""

    def __init__(self, ids: Sequence[uuid.UUID]) -> None:
        super().__init__("no such batch: " + ", ".join(str(i) for i in ids))
        self.ids = list(ids)


class DependencyEnded(Exception):
    """A dependency has already ended in a way ``after_policy`` forbids: the batch
    could only be created cancelled, so it is refused instead (a 409 naming it)."""

    def __init__(self, dependency: uuid.UUID, status: str, policy: str) -> None:
        super().__init__(
            f"dependency {dependency} has already ended {status}, and after_policy "
            f"{policy!r} runs a batch only once every dependency is completed"
        )
        self.dependency = dependency
        self.status = status


class ExclusiveKeyBusy(Exception):
    """Another unfinished batch of the tenant holds the exclusive key: the caller
    is told which, to wait for it or to cancel it."""

    def __init__(self, key: str, active_batch_id: uuid.UUID, status: str) -> None:
        super().__init__(
            f"exclusive key {key!r} is held by batch {active_batch_id} ({status}); "
            "it is free again once that batch is terminal"
        )
        self.key = key
        self.active_batch_id = active_batch_id
        self.status = status


# Work done first in a submission's transaction, given the new batch's id: a
# schedule claims its slot there, so the slot and its batch commit together.
InTransaction = Callable[[store.Queries, uuid.UUID], Awaitable[None]]


def new_row(
    nb: NewBatch,
    *,
    tenant: str,
    actor: str,
    attempt_budget: int,
    callback_handler: str | None,
    digest: str | None,
) -> store.NewBatchRow:
    """The batch row of a submission, under a new id."""
    total = len(nb.items)
    return store.NewBatchRow(
        id=uuid.uuid4(),
        tenant=tenant,
        handler=nb.handler,
        priority=nb.priority,
        max_concurrency=nb.max_concurrency,
        max_attempts=nb.max_attempts,
        attempt_budget=attempt_budget,
        max_failures=json.dumps(nb.max_failures) if nb.max_failures is not None else None,
        max_failures_limit=failure_limit(nb.max_failures, total),
        metadata=json.dumps(nb.metadata),
        idempotency_key=nb.idempotency_key,
        request_hash=digest,
        total=total,
        created_by=actor,
        callback_handler=callback_handler,
        exclusive_key=nb.exclusive_key,
        max_items=nb.max_items,
        after_ids=nb.after or (),
        after_policy=nb.after_policy,
        not_before=nb.not_before,
        traceparent=nb.trace.traceparent if nb.trace is not None else None,
        tracestate=nb.trace.tracestate if nb.trace is not None else None,
    )


async def submit(
    db: dbm.Database,
    nb: NewBatch,
    *,
    tenant: str,
    actor: str,
    attempt_budget: int,
    callback_handler: str | None,
    in_tx: InTransaction | None = None,
) -> Submitted:
    """Insert a batch and all its items atomically: all or nothing. ``in_tx``
    runs first in the same transaction; whatever it raises undoes the submission."""
    digest = nb.request_hash() if nb.idempotency_key is not None else None
    row = new_row(
        nb,
        tenant=tenant,
        actor=actor,
        attempt_budget=attempt_budget,
        callback_handler=callback_handler,
        digest=digest,
    )
    for _ in range(KEY_ROUNDS):
        try:
            batch = await _insert(
                db, nb, row, budget=nb.max_attempts or attempt_budget, in_tx=in_tx
            )
        except _TailMoved:
            continue
        except _Refused:
            batch = None
        except (UnknownDependencies, DependencyEnded, ExclusiveKeyBusy):
            # A repeat of a request that created its batch answers with that batch,
            # whatever its dependencies have become since.
            repeat = await _repeat(store.Queries(db), nb, tenant=tenant, digest=digest)
            if repeat is None:
                raise
            return repeat
        if batch is not None:
            return Submitted(await describe(store.Queries(db), batch), created=True)
        earlier = await _refused(store.Queries(db), nb, tenant=tenant, digest=digest)
        if earlier is not None:
            return earlier
    raise RuntimeError(
        f"submission refused {KEY_ROUNDS} times by a batch that was gone when looked up"
    )


async def _insert(
    db: dbm.Database,
    nb: NewBatch,
    row: store.NewBatchRow,
    *,
    budget: int,
    in_tx: InTransaction | None = None,
) -> store.BatchRow | None:
    """The batch with its items, event and wake-ups; None when a unique index
    refused it (nothing was written)."""
    created = created_detail(nb)
    if nb.after or nb.exclusive_key is not None or in_tx is not None:
        return await _insert_locked(db, nb, row, budget=budget, created=created, in_tx=in_tx)
    if len(nb.items) <= INLINE_ITEMS:
        # One statement, atomic on its own: one round trip for the whole submission.
        return await store.Queries(db).submit_batch(
            row,
            item_max_attempts=budget,
            keys=[key for key, _ in nb.items],
            payloads=[payload for _, payload in nb.items],
            created=created,
            limit_keys=nb.limit_keys or (),
        )
    async with db.transaction("submit") as tx:
        return await write_in(tx, db.schema, nb, row, budget=budget, created=created)


def created_detail(nb: NewBatch) -> str:
    """The detail of a batch's 'created' event (JSON text)."""
    return json.dumps({"items": len(nb.items), "handler": nb.handler})


async def write_in(
    tx: dbm.Tx,
    schema: str,
    nb: NewBatch,
    row: store.NewBatchRow,
    *,
    budget: int,
    created: str,
) -> store.BatchRow | None:
    """The batch with its items (inline up to INLINE_ITEMS, else by COPY) in the
    caller's transaction; None when a unique index refused it. For a submission
    without dependencies or an exclusive key (those take their locks first, see
    _insert_locked)."""
    inline = len(nb.items) <= INLINE_ITEMS
    batch = await store.Queries(tx).submit_batch(
        row,
        item_max_attempts=budget,
        keys=[key for key, _ in nb.items] if inline else (),
        payloads=[payload for _, payload in nb.items] if inline else (),
        created=created,
        limit_keys=(nb.limit_keys or ()) if inline else (),
    )
    if batch is not None and not inline:
        await tx.copy_items(schema, *_copied_items(nb, batch, budget=budget))
    return batch


class _TailMoved(Exception):
    """The exclusive key's newest batch changed between the read before its row
    was locked and the one under the key's lock: submit again."""


class _Refused(Exception):
    """A unique index refused the batch after ``in_tx`` had written: raised to
    undo that too (the caller then looks up who refused it)."""


async def _insert_locked(
    db: dbm.Database,
    nb: NewBatch,
    row: store.NewBatchRow,
    *,
    budget: int,
    created: str,
    in_tx: InTransaction | None = None,
) -> store.BatchRow | None:
    """A batch with dependencies or an exclusive key. The dependencies (and the
    batch of the key it would queue behind) are share-locked and read in its
    transaction, so none can end between the read that decides whether it starts
    waiting and the commit that makes its edges visible to their settles. The key
    is then locked (_exclusive_key_lock; after the row locks, as everywhere), so
    the key's batches cannot change until commit: with one unfinished, the
    submission is refused (ExclusiveKeyBusy) or, with on_conflict "queue", waits
    behind the newest (a 'terminal' edge). ``in_tx`` runs first, and the key's
    newest batch is read after it (it may have cancelled that one)."""
    deps = list(nb.after or ())
    queue = nb.exclusive_key is not None and nb.on_conflict == "queue"
    async with db.transaction("submit") as tx:
        q = store.Queries(tx)
        if in_tx is not None:
            await in_tx(q, row.id)
        seen = None
        if queue and nb.exclusive_key is not None:
            seen = await q.exclusive_tail(tenant=row.tenant, exclusive_key=nb.exclusive_key)
        locks = deps + ([seen[0]] if seen is not None and seen[0] not in deps else [])
        found = await q.lock_dependencies(locks, tenant=row.tenant) if locks else {}
        missing = [a for a in deps if a not in found]
        if missing:
            raise UnknownDependencies(missing)
        policy = nb.after_policy or states.AfterPolicy.COMPLETED
        verdicts = {a: states.after_allows(policy, found[a]) for a in deps}
        for a, allows in verdicts.items():
            if allows is False:
                raise DependencyEnded(a, found[a], policy)
        key_after = None
        if nb.exclusive_key is not None:
            await q.lock_exclusive_key(tenant=row.tenant, exclusive_key=nb.exclusive_key)
            tail = await q.exclusive_tail(tenant=row.tenant, exclusive_key=nb.exclusive_key)
            if tail is not None and not queue:
                holder = await q.find_exclusive_holder(
                    tenant=row.tenant, exclusive_key=nb.exclusive_key
                )
                raise ExclusiveKeyBusy(nb.exclusive_key, *(holder or tail))
            if tail is not None:
                if seen is None or tail[0] != seen[0]:
                    raise _TailMoved
                if tail[0] not in deps:
                    key_after = tail[0]
        row = dataclasses.replace(
            row, runnable=all(verdicts.values()) and key_after is None, key_after=key_after
        )
        batch = await q.submit_batch(
            row,
            item_max_attempts=budget,
            keys=[key for key, _ in nb.items] if len(nb.items) <= INLINE_ITEMS else (),
            payloads=[p for _, p in nb.items] if len(nb.items) <= INLINE_ITEMS else (),
            created=created,
            limit_keys=(nb.limit_keys or ()) if len(nb.items) <= INLINE_ITEMS else (),
        )
        if batch is None and in_tx is not None:
            raise _Refused
        if batch is not None and len(nb.items) > INLINE_ITEMS:
            await tx.copy_items(db.schema, *_copied_items(nb, batch, budget=budget))
    return batch


def _copied_items(
    nb: NewBatch, batch: store.BatchRow, *, budget: int
) -> tuple[Sequence[str], list[tuple[Any, ...]]]:
    """The columns and rows of a submission's items by COPY, as submit_batch
    inserts them: a batch created scheduled (not_before later than its created_at,
    both the database's clock) gives its items that run_after, and a handler with
    a key limit gives each item its limit key."""
    columns: tuple[str, ...] = ITEM_COLUMNS
    rows: list[tuple[Any, ...]] = [
        (batch.id, i, key, nb.handler, payload, budget) for i, (key, payload) in enumerate(nb.items)
    ]
    if batch.not_before is not None and batch.not_before > batch.created_at:
        at = batch.not_before
        columns += ("run_after",)
        rows = [(*r, at) for r in rows]
    if nb.limit_keys is not None:
        columns += ("limit_key",)
        rows = [(*r, k) for r, k in zip(rows, nb.limit_keys, strict=True)]
    return columns, rows


async def _refused(
    q: store.Queries, nb: NewBatch, *, tenant: str, digest: str | None
) -> Submitted | None:
    """Why the insert was refused, by a committed row (it waited for any concurrent
    one): the earlier batch of an idempotent repeat, or the conflict raised; None
    when the row that refused it has finished or been deleted since (try again).
    The idempotency key first: a repeat of the request whose batch holds the
    exclusive key is that batch, not a conflict with it."""
    repeat = await _repeat(q, nb, tenant=tenant, digest=digest)
    if repeat is not None:
        return repeat
    if nb.exclusive_key is not None:
        holder = await q.find_exclusive_holder(tenant=tenant, exclusive_key=nb.exclusive_key)
        if holder is not None:
            raise ExclusiveKeyBusy(nb.exclusive_key, *holder)
    return None


async def _repeat(
    q: store.Queries, nb: NewBatch, *, tenant: str, digest: str | None
) -> Submitted | None:
    """The batch an earlier request with this idempotency key created, if any;
    :class:`IdempotencyConflict` when that request had other content."""
    if nb.idempotency_key is None:
        return None
    found = await q.find_idempotent_batch(tenant=tenant, idempotency_key=nb.idempotency_key)
    if found is None:
        return None
    existing_id, existing_hash = found
    if existing_hash != digest:
        raise IdempotencyConflict(str(existing_id))
    existing = await q.get_batch(existing_id, tenant=tenant)
    # None: deleted just now, and the key is free
    return None if existing is None else Submitted(await describe(q, existing), created=False)


async def retry(
    q: store.Queries,
    batch_id: uuid.UUID,
    *,
    tenant: str | None,
    actor: str,
    include_cancelled: bool,
) -> store.ControlResult:
    """Retry a batch's failed (and cancelled) items. Reopening a terminal batch
    takes its exclusive key back; if another batch holds it by now, the database
    refuses and :class:`ExclusiveKeyBusy` names that batch."""
    for _ in range(KEY_ROUNDS):
        try:
            return await q.retry_batch(
                batch_id, tenant=tenant, actor=actor, include_cancelled=include_cancelled
            )
        except store.ExclusiveKeyTaken:
            busy = await _key_busy(q, batch_id, tenant=tenant)
            if busy is not None:
                raise busy from None
            # Deleted, or the holder finished in between: the next round says which.
    raise RuntimeError(f"retry refused {KEY_ROUNDS} times by a batch that was gone when looked up")


async def retry_item(
    q: store.Queries, item_id: int, *, tenant: str | None, actor: str
) -> store.ItemControlResult:
    """Queue one finished item again (failed, cancelled or succeeded: a rerun).
    Reopening its finished batch takes the batch's exclusive key back, refused as
    in :func:`retry` (:class:`ExclusiveKeyBusy` names the holder)."""
    for _ in range(KEY_ROUNDS):
        try:
            return await q.retry_item(item_id, tenant=tenant, actor=actor)
        except store.ExclusiveKeyTaken:
            found = await q.get_item(item_id, tenant=tenant)
            busy = None if found is None else await _key_busy(q, found.batch_id, tenant=tenant)
            if busy is not None:
                raise busy from None
    raise RuntimeError(f"retry refused {KEY_ROUNDS} times by a batch that was gone when looked up")


async def retry_items(
    q: store.Queries,
    batch_id: uuid.UUID,
    *,
    ids: Sequence[int] | None,
    error_type: str | None,
    limit: int,
    tenant: str | None,
    actor: str,
) -> list[store.ItemRetried] | None:
    """Queue chosen items of one batch again (by id, by last error type, or
    both), each through the item retry; None when the tenant has no such batch.
    Reopening a finished batch is refused as in :func:`retry`."""
    for _ in range(KEY_ROUNDS):
        try:
            return await q.retry_items(
                batch_id, ids=ids, error_type=error_type, limit=limit, tenant=tenant, actor=actor
            )
        except store.ExclusiveKeyTaken:
            busy = await _key_busy(q, batch_id, tenant=tenant)
            if busy is not None:
                raise busy from None
    raise RuntimeError(f"retry refused {KEY_ROUNDS} times by a batch that was gone when looked up")


async def _key_busy(
    q: store.Queries, batch_id: uuid.UUID, *, tenant: str | None
) -> ExclusiveKeyBusy | None:
    """Why reopening this batch was refused: the batch that holds its exclusive
    key now; None when the batch is gone or the key is free again."""
    b = await q.get_batch(batch_id, tenant=tenant)
    if b is None or b.exclusive_key is None:
        return None
    holder = await q.find_exclusive_holder(tenant=b.tenant, exclusive_key=b.exclusive_key)
    return None if holder is None else ExclusiveKeyBusy(b.exclusive_key, *holder)


async def describe(q: store.Queries, b: store.BatchRow) -> dict[str, Any]:
    """One batch's JSON, with what it still waits for when it is waiting (a
    lookup of its own, so listings, which do not show it, do not pay for it)."""
    waiting_on = await q.waiting_on(b.id) if b.status == states.BatchStatus.WAITING else None
    return models.batch_json(b, waiting_on=waiting_on)


def parse_id(batch_id: str) -> uuid.UUID | None:
    """A batch id from a URL or a command line; None when it cannot name one."""
    try:
        return uuid.UUID(batch_id)
    except ValueError:
        return None


async def get(db: dbm.Database, batch_id: str, tenant: str | None) -> store.BatchRow | None:
    bid = parse_id(batch_id)
    return None if bid is None else await store.Queries(db).get_batch(bid, tenant=tenant)


async def summary(db: dbm.Database, b: store.BatchRow) -> dict[str, Any]:
    stats = await store.Queries(db).item_stats(b.id)
    duration = None
    if b.started_at is not None:
        duration = round(((b.finished_at or datetime.now(UTC)) - b.started_at).total_seconds(), 3)
    batch = models.batch_json(b)

    def num(v: float | None) -> float | None:
        return round(float(v), 4) if v is not None else None

    return {
        "batch_id": batch["id"],
        "final": states.is_batch_terminal(b.status),
        "status": b.status,
        "counts": batch["counts"],
        "duration_seconds": duration,
        "item_seconds": {
            "p50": num(stats.p50) if stats else None,
            "p95": num(stats.p95) if stats else None,
            "max": num(stats.max) if stats else None,
        },
        "errors_by_type": models.loads(stats.errors_by_type) if stats else {},
        "callback": batch["callback"],
    }
