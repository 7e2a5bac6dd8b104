"""Group commit of attempt outcomes.

Handlers finish one by one; their outcomes are written many at a time: while a
write is in flight, newly finished outcomes accumulate and go together in the
next one (one ``apply_outcomes`` call = one transaction that moves the items,
the batch counters and, for a last item, the batch's terminal status). A write
that fails because the database is away is retried with backoff until it lands;
the outcomes wait in memory meanwhile, and the items stay ``running`` in the
database (so a crash meanwhile means at-least-once re-execution, never loss).

Items an attempt added to its own batch (``item.add_items``) are inserted by
``add_items`` in the same transaction, just before the outcomes: they exist
exactly when the outcome that added them was written. An attempt whose additions
would pass its batch's ``max_items`` is recorded as failed (MaxItemsExceeded)
in that transaction instead, and adds nothing.
"""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import Callable, Sequence

import anyio

from supervisor import db as dbm
from supervisor import executor, states, store
from supervisor.errors import DatabaseUnavailable
from supervisor.executor import OutcomeRecord

log = logging.getLogger(__name__)
MAX_PER_WRITE = 2000


class Outbox:
    def __init__(
        self,
        db: dbm.Database,
        actor: str,
        on_applied: Callable[[Sequence[OutcomeRecord], store.Transitions], None],
        default_max_items: int,
    ) -> None:
        self._db = db
        self._default_max_items = default_max_items
        self._q = store.Queries(db)
        self._actor = actor
        self._on_applied = on_applied
        self._pending: list[OutcomeRecord] = []
        self._wakeup = anyio.Event()
        self._idle = anyio.Event()
        self._idle.set()

    def put(self, rec: OutcomeRecord) -> None:
        self._pending.append(rec)
        if self._idle.is_set():
            self._idle = anyio.Event()  # something to write: no longer idle
        self._wakeup.set()

    @property
    def pending(self) -> int:
        return len(self._pending)

    def pending_ids(self) -> set[int]:
        """Items whose outcome waits to be written (they are still `running` there)."""
        return {r.item_id for r in self._pending}

    async def wait_empty(self) -> None:
        """Wait until every outcome handed in so far has been written."""
        while self._pending:
            await self._idle.wait()

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        task_status.started()
        while True:
            if not self._pending:
                self._idle.set()
                await self._wakeup.wait()
                self._wakeup = anyio.Event()
                continue
            chunk = self._next_chunk()
            await self._correct_budgets(chunk)
            applied = await self._write_isolating(chunk)
            del self._pending[: len(chunk)]
            self._on_applied(chunk, applied)

    def _next_chunk(self) -> list[OutcomeRecord]:
        """The next outcomes to write together: up to MAX_PER_WRITE, stopping before
        a second attempt of an item already in the group. (A cancelled attempt deaf
        to its stop may end beside its item's next attempt; in one apply_outcomes
        call the write of the current attempt hides the fence of the stale one,
        and Transitions speak of items, not attempts.)"""
        seen: set[int] = set()
        for n, rec in enumerate(self._pending[:MAX_PER_WRITE]):
            if rec.item_id in seen:
                return self._pending[:n]
            seen.add(rec.item_id)
        return self._pending[:MAX_PER_WRITE]

    async def _write_isolating(self, chunk: list[OutcomeRecord]) -> store.Transitions:
        """Write ``chunk``; if PostgreSQL rejects it for good (not an outage: those
        are retried inside :meth:`_write`), find the rejected outcome by halving, so
        the others land as written and only that one item's attempt is spent."""
        try:
            return await self._write(chunk)
        except DatabaseUnavailable:
            raise
        except Exception as exc:
            # A poison outcome must cost one attempt, never the daemon or the
            # other outcomes of the group: isolate it (see the docstring).
            if len(chunk) > 1:
                half = len(chunk) // 2
                head, tail = chunk[:half], chunk[half:]
                first = await self._write_isolating(head)
                second = await self._write_isolating(tail)
                chunk[:] = head + tail  # as written (a write may replace records)
                return first | second
            (rec,) = chunk
            log.error(
                "outcome.rejected item=%s attempt=%s outcome=%s error=%s: %s; recorded "
                "as a failed attempt",
                rec.item_id,
                rec.attempt,
                rec.outcome.value,
                type(exc).__name__,
                executor.storable_text(str(exc))[:500],
            )
            chunk[0] = executor.rejected(rec, exc, self._actor)
            return await self._write(chunk)

    async def _write(self, chunk: list[OutcomeRecord]) -> store.Transitions:
        """Write ``chunk``; records it changes (additions refused) are replaced in it."""
        lease = chunk[0].lease
        assert all(r.lease == lease for r in chunk)  # one process, one lease
        if any(r.added or r.throttle_key is not None for r in chunk):
            async for attempt in dbm.retrying():
                with attempt:
                    written = list(chunk)
                    async with self._db.transaction("outcomes") as tx:
                        q = store.Queries(tx)
                        await self._throttle_keys(q, written)
                        if any(r.added for r in written):
                            await self._add_items(q, written)
                        applied = await q.apply_outcomes(self._outcomes(written))
            chunk[:] = written
        else:
            outcomes = self._outcomes(chunk)
            async for attempt in dbm.retrying():
                with attempt:
                    applied = await self._q.apply_outcomes(outcomes)
        for rec in chunk:
            if rec.item_id in applied.fenced:
                log.warning(
                    "outcome.fenced item=%s attempt=%s outcome=%s: the attempt no longer "
                    "holds the item (reclaimed, released or cancelled); write ignored",
                    rec.item_id,
                    rec.attempt,
                    rec.outcome.value,
                )
        return applied

    async def _correct_budgets(self, chunk: Sequence[OutcomeRecord]) -> None:
        """Correct the key budgets the chunk's attempts reported costs for, once,
        before their outcomes free their keys' slots: the claims that fill them
        see the actual cost. Advisory, like progress: a correction PostgreSQL
        refuses changes no outcome."""
        fixes = [(r.handler, r.cost_correction) for r in chunk if r.cost_correction is not None]
        if not fixes:
            return
        try:
            async for attempt in dbm.retrying():
                with attempt:
                    await self._q.correct_key_budgets(
                        handlers=[h for h, _ in fixes],
                        keys=[c.limit_key for _, c in fixes],
                        periods=[c.period_start for _, c in fixes],
                        deltas=[c.delta for _, c in fixes],
                    )
        except DatabaseUnavailable:
            raise
        except Exception as exc:
            # Never worth an outcome: the budget keeps the claim's estimate.
            log.error(
                "outcome.cost_correction_rejected items=%s error=%s: %s",
                len(fixes),
                type(exc).__name__,
                executor.storable_text(str(exc))[:500],
            )

    async def _throttle_keys(self, q: store.Queries, chunk: list[OutcomeRecord]) -> None:
        """Pause the limit keys the chunk's attempts throttled (backpressure per
        key), before their outcomes requeue the items that asked."""
        paused = [r for r in chunk if r.throttle_key is not None]
        if not paused:
            return
        await q.throttle_keys(
            handlers=[r.handler for r in paused],
            keys=[r.throttle_key or "" for r in paused],
            seconds=[r.delay_s for r in paused],
        )
        for r in paused:
            log.info(
                "outcome.key_throttled handler=%s key=%r seconds=%.1f item=%s",
                r.handler,
                r.throttle_key,
                r.delay_s,
                r.item_id,
            )

    async def _add_items(self, q: store.Queries, chunk: list[OutcomeRecord]) -> None:
        """Insert what the chunk's attempts added; replace in ``chunk`` each record
        whose additions were refused (past max_items) by its failure."""
        parents: list[int] = []
        attempts: list[int] = []
        keys: list[str | None] = []
        payloads: list[str] = []
        limit_keys: list[str | None] = []
        for r in chunk:
            for key, payload, limit_key in r.added:
                parents.append(r.item_id)
                attempts.append(r.attempt)
                keys.append(key)
                payloads.append(payload)
                limit_keys.append(limit_key)
        results = await q.add_items(
            lease=uuid.UUID(chunk[0].lease),
            batches=[uuid.UUID(b) for b in {r.batch_id for r in chunk}],
            parents=parents,
            attempts=attempts,
            keys=keys,
            payloads=payloads,
            limit_keys=limit_keys,
            default_max=self._default_max_items,
            actor=self._actor,
        )
        refused = {a.parent: a for a in results if a.refused}
        for i, r in enumerate(chunk):
            if (a := refused.get(r.item_id)) is not None:
                log.warning(
                    "outcome.items_refused item=%s batch=%s adding=%s total=%s max_items=%s",
                    r.item_id,
                    r.batch_id,
                    len(r.added),
                    a.total,
                    a.max_items,
                )
                chunk[i] = executor.too_many_items(r, a.total, a.max_items, self._actor)

    def _outcomes(self, chunk: list[OutcomeRecord]) -> store.Outcomes:
        lease = chunk[0].lease
        return store.Outcomes(
            lease=uuid.UUID(lease),
            batches=[uuid.UUID(b) for b in {r.batch_id for r in chunk}],
            ids=[r.item_id for r in chunk],
            attempts=[r.attempt for r in chunk],
            outcomes=[r.outcome.value for r in chunk],
            results=[r.result_json for r in chunk],
            errors=[r.error_json for r in chunk],
            delays=[r.delay_s if math.isfinite(r.delay_s) else 0.0 for r in chunk],
            actor=self._actor,
        )


def metric_outcome(rec: OutcomeRecord, status: str) -> str:
    """The ``outcome`` label for an applied write."""
    if status == states.ItemStatus.QUEUED:
        return "released" if rec.outcome is states.Outcome.RELEASED else "retried"
    return status
