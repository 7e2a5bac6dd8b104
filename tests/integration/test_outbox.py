"""The outbox (supervisor/outbox.py) against the real database: group commit of
outcomes, the batch finalized in the same write, fencing of stale attempts, and
isolation of an outcome PostgreSQL rejects."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta

import anyio
import anyio.abc
import asyncpg
import pytest

from supervisor import db as dbm
from supervisor import outbox as outbox_mod
from supervisor import states, store
from supervisor.executor import OutcomeRecord
from tests.integration import support
from tests.integration.support import claim, eventually, get_batch, items_of, new_lease, submit

pytestmark = pytest.mark.anyio

# JSON text jsonb refuses: "\u0000" cannot be converted to text.
NUL_RESULT = '{"text": "a\\u0000b"}'


class Applied:
    """Records every on_applied call of an outbox."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[OutcomeRecord], store.Transitions]] = []

    def __call__(self, chunk: Sequence[OutcomeRecord], result: store.Transitions) -> None:
        self.calls.append((list(chunk), result))

    @property
    def merged(self) -> store.Transitions:
        out = store.Transitions()
        for _, t in self.calls:
            out = out | t
        return out


@pytest.fixture
async def tg() -> AsyncIterator[anyio.abc.TaskGroup]:
    async with anyio.create_task_group() as group:
        yield group
        group.cancel_scope.cancel()


async def started(db: dbm.Database, tg: anyio.abc.TaskGroup) -> tuple[outbox_mod.Outbox, Applied]:
    applied = Applied()
    ob = outbox_mod.Outbox(db, "it-worker", applied, default_max_items=100_000)
    await tg.start(ob.run)
    return ob, applied


async def flush(ob: outbox_mod.Outbox) -> None:
    with anyio.fail_after(support.WAIT_S):
        await ob.wait_empty()
    assert ob.pending == 0


async def test_outcomes_put_together_land_in_one_write_that_finalizes_their_batches(
    db: dbm.Database, conn: asyncpg.Connection, tg: anyio.abc.TaskGroup
) -> None:
    b1, b2 = await submit(db, 2), await submit(db, 2)
    lease = new_lease()
    claimed = await claim(db, lease, 4)
    assert {c.batch_id for c in claimed} == {b1, b2}
    ob, applied = await started(db, tg)

    recs = [support.outcome(c, lease) for c in claimed]
    for r in recs:
        ob.put(r)
    assert ob.pending == 4
    assert ob.pending_ids() == {c.id for c in claimed}
    await flush(ob)

    assert len(applied.calls) == 1, "outcomes handed in together must be one write"
    chunk, result = applied.calls[0]
    assert chunk == recs
    assert result.fenced == frozenset()
    assert result.statuses == {}  # only the exceptions are reported: all succeeded
    assert {(f.batch_id, f.status) for f in result.finished} == {
        (str(b1), "completed"),
        (str(b2), "completed"),
    }
    assert all(result.status_of(r.item_id) == "succeeded" for r in recs)
    for bid in (b1, b2):
        b = await get_batch(db, bid)
        assert (b.status, b.succeeded, b.running, b.queued) == ("completed", 2, 0, 0)
        assert b.finished_at is not None
        # The items' final write and the batch's final status are one version.
        versions = await conn.fetch(
            "SELECT finished_version FROM supervisor.items WHERE batch_id = $1", bid
        )
        assert {v["finished_version"] for v in versions} == {b.version}
        log = [e.action for e in await store.Queries(db).batch_log(bid)]
        assert log.count("finished") == 1
    items = await items_of(db, b1) | await items_of(db, b2)
    for c in claimed:
        assert items[c.id].status == "succeeded"
        assert json.loads(items[c.id].result or "null") == {"done": c.id}
    assert await store.Queries(db).doctor_drift() == []


async def test_outcomes_arriving_during_a_write_go_together_in_the_next(
    db: dbm.Database, db_url: str, conn: asyncpg.Connection, tg: anyio.abc.TaskGroup
) -> None:
    bid = await submit(db, 3)
    lease = new_lease()
    first, *rest = await claim(db, lease, 3)
    ob, applied = await started(db, tg)

    holder: asyncpg.Connection = await asyncpg.connect(db_url)
    try:
        tx = holder.transaction()
        await tx.start()
        await holder.execute("SELECT 1 FROM supervisor.batches WHERE id = $1 FOR UPDATE", bid)
        ob.put(support.outcome(first, lease))

        async def write_waits_on_the_lock() -> bool:
            n = await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND wait_event_type = 'Lock'"
            )
            return bool(n)

        await eventually(write_waits_on_the_lock, what="the first write blocked on the batch")
        for c in rest:
            ob.put(support.outcome(c, lease))
        assert ob.pending == 3
        await tx.commit()
    finally:
        await holder.close()
    await flush(ob)

    assert [[r.item_id for r in chunk] for chunk, _ in applied.calls] == [
        [first.id],
        [c.id for c in rest],
    ]
    assert [f.status for f in applied.calls[1][1].finished] == ["completed"]
    assert (await get_batch(db, bid)).status == "completed"


async def test_a_stale_attempt_of_the_same_lease_is_fenced_and_changes_nothing(
    db: dbm.Database, tg: anyio.abc.TaskGroup
) -> None:
    bid = await submit(db, 2)
    lease = new_lease()
    assert len(await claim(db, lease, 2)) == 2
    # The lease was reclaimed (stalled past dead_after), then its daemon claimed again.
    await store.Queries(db).reclaim_leases([uuid.UUID(lease)], actor="reaper")
    again = await claim(db, lease, 2)
    assert [c.attempts for c in again] == [2, 2]
    stale, current = again
    before = await get_batch(db, bid)
    ob, applied = await started(db, tg)

    ob.put(support.outcome(stale, lease, attempt=1))
    ob.put(support.outcome(current, lease))
    await flush(ob)

    (_, result), *more = applied.calls
    assert more == []
    assert result.fenced == frozenset({stale.id})
    assert result.status_of(stale.id) is None
    assert result.status_of(current.id) == "succeeded"
    items = await items_of(db, bid)
    assert (items[stale.id].status, items[stale.id].attempts) == ("running", 2)
    assert items[stale.id].result is None
    assert items[current.id].status == "succeeded"
    after = await get_batch(db, bid)
    assert (after.running, after.succeeded, after.status) == (1, 1, "running")
    assert after.version == before.version + 1  # the current write only


async def test_two_attempts_of_one_item_in_one_group_are_written_apart(
    db: dbm.Database, tg: anyio.abc.TaskGroup
) -> None:
    """A cancelled attempt deaf to its stop and the retry's new attempt of the same
    item (same lease) can finish together. In one apply_outcomes call the current
    one's update hid the stale one's fence: its outcome was dropped unreported."""
    await submit(db, 1)
    lease = new_lease()
    await claim(db, lease, 1)
    await store.Queries(db).reclaim_leases([uuid.UUID(lease)], actor="reaper")
    (item,) = await claim(db, lease, 1)
    assert item.attempts == 2
    ob, applied = await started(db, tg)

    ob.put(support.outcome(item, lease, states.Outcome.CANCELLED, attempt=1))
    ob.put(support.outcome(item, lease))
    await flush(ob)

    assert [[r.attempt for r in chunk] for chunk, _ in applied.calls] == [[1], [2]]
    assert applied.calls[0][1].fenced == frozenset({item.id})  # the stale one, reported
    assert applied.calls[1][1].status_of(item.id) == "succeeded"


async def test_a_write_after_the_item_moved_to_another_lease_changes_nothing(
    db: dbm.Database, tg: anyio.abc.TaskGroup
) -> None:
    bid = await submit(db, 1)
    old, new = new_lease(), new_lease()
    (item,) = await claim(db, old, 1)
    reclaimed = await store.Queries(db).reclaim_leases([uuid.UUID(old)], actor="reaper")
    assert reclaimed.statuses == {item.id: "queued"}
    (moved,) = await claim(db, new, 1, worker="other")
    before = await get_batch(db, bid)
    ob, applied = await started(db, tg)

    ob.put(support.outcome(item, old))
    await flush(ob)

    assert applied.merged.fenced == frozenset({item.id})
    assert applied.merged.finished == []
    after = await get_batch(db, bid)
    assert after == before, "a fenced write must not even bump the version"
    row = (await items_of(db, bid))[item.id]
    assert (row.status, row.attempts, row.worker, row.result) == ("running", 2, "other", None)
    assert moved.attempts == 2


async def test_a_poison_outcome_costs_only_its_own_attempt(
    db: dbm.Database, tg: anyio.abc.TaskGroup
) -> None:
    bid = await submit(db, 5)
    lease = new_lease()
    claimed = await claim(db, lease, 5)
    poison = claimed[3]
    ob, applied = await started(db, tg)

    for c in claimed:
        ob.put(support.outcome(c, lease, result_json=NUL_RESULT if c is poison else None))
    await flush(ob)

    assert len(applied.calls) == 1
    chunk, result = applied.calls[0]
    assert [r.item_id for r in chunk] == [c.id for c in claimed]
    assert result.fenced == frozenset()
    assert result.statuses == {poison.id: "queued"}  # retried: attempts remain
    items = await items_of(db, bid)
    for c in claimed:
        if c is not poison:
            assert items[c.id].status == "succeeded"
            assert json.loads(items[c.id].result or "null") == {"done": c.id}
    bad = items[poison.id]
    assert (bad.status, bad.attempts, bad.result) == ("queued", 1, None)
    err = json.loads(bad.error or "{}")
    assert err["type"] == "OutcomeRejected"
    assert err["attempt"] == 1
    assert "(succeeded)" in err["message"]
    assert err["worker"] == "it-worker"
    assert bad.run_after > datetime.now(UTC)  # retried after the rejection's delay
    b = await get_batch(db, bid)
    assert (b.status, b.succeeded, b.queued, b.running) == ("running", 4, 1, 0)
    assert await store.Queries(db).doctor_drift() == []


async def test_a_poison_outcome_of_the_last_attempt_fails_the_item_and_ends_the_batch(
    db: dbm.Database, tg: anyio.abc.TaskGroup
) -> None:
    bid = await submit(db, 2, attempt_budget=1)
    lease = new_lease()
    good, poison = await claim(db, lease, 2)
    ob, applied = await started(db, tg)

    ob.put(support.outcome(good, lease))
    ob.put(support.outcome(poison, lease, result_json=NUL_RESULT))
    await flush(ob)

    result = applied.merged
    assert result.statuses == {poison.id: "failed"}
    assert [(f.batch_id, f.status) for f in result.finished] == [
        (str(bid), "completed_with_errors")
    ]
    items = await items_of(db, bid)
    assert items[good.id].status == "succeeded"
    assert (items[poison.id].status, support.error_type(items[poison.id])) == (
        "failed",
        "OutcomeRejected",
    )
    b = await get_batch(db, bid)
    assert (b.status, b.succeeded, b.failed) == ("completed_with_errors", 1, 1)


async def test_a_retry_waits_its_delay_and_a_non_finite_delay_is_due_now(
    db: dbm.Database, tg: anyio.abc.TaskGroup
) -> None:
    bid = await submit(db, 2)
    lease = new_lease()
    later, endless = await claim(db, lease, 2)
    error = json.dumps({"attempt": 1, "type": "ValueError", "message": "no"})
    ob, applied = await started(db, tg)

    recs = [
        support.outcome(later, lease, states.Outcome.RETRY, error_json=error, delay_s=600.0),
        support.outcome(
            endless, lease, states.Outcome.RETRY, error_json=error, delay_s=float("inf")
        ),
    ]
    for r in recs:
        ob.put(r)
    await flush(ob)

    result = applied.merged
    assert result.statuses == {later.id: "queued", endless.id: "queued"}
    assert [outbox_mod.metric_outcome(r, "queued") for r in recs] == ["retried", "retried"]
    items = await items_of(db, bid)
    now = datetime.now(UTC)
    assert items[later.id].run_after > now + timedelta(seconds=500)
    assert items[endless.id].run_after <= now
    assert [support.error_type(items[i.id]) for i in (later, endless)] == ["ValueError"] * 2
    # Due now: the item is claimable again at once, as its next attempt.
    (again,) = await claim(db, new_lease(), 2)
    assert (again.id, again.attempts) == (endless.id, 2)


async def test_outcomes_handed_in_before_the_outbox_runs_wait_and_then_land(
    db: dbm.Database, tg: anyio.abc.TaskGroup
) -> None:
    bid = await submit(db, 1)
    lease = new_lease()
    (item,) = await claim(db, lease, 1)
    applied = Applied()
    ob = outbox_mod.Outbox(db, "it-worker", applied, default_max_items=100_000)
    ob.put(support.outcome(item, lease, states.Outcome.RELEASED, result_json=None))
    assert ob.pending_ids() == {item.id}
    assert (await items_of(db, bid))[item.id].status == "running"  # not written yet

    await tg.start(ob.run)
    await flush(ob)

    assert applied.merged.statuses == {item.id: "queued"}
    assert outbox_mod.metric_outcome(applied.calls[0][0][0], "queued") == "released"
    row = (await items_of(db, bid))[item.id]
    # Released: queued again, the attempt not counted against max_attempts.
    assert (row.status, row.attempts, row.max_attempts) == ("queued", 1, 4)
