"""promote_scheduled and the delayed starter (supervisor/delayed.py) against the real
database: a due batch is promoted once, however many daemons call it at once; a
batch another transaction holds is skipped without waiting for it and taken on
a later call; the answer says when the next batch is due, by the database's clock."""

from __future__ import annotations

import json
import uuid
from datetime import timedelta

import anyio
import asyncpg
import pytest

from supervisor import batches, delayed, store
from supervisor import db as dbm
from tests.integration.support import HANDLER, make_config

pytestmark = pytest.mark.anyio


async def scheduled(db: dbm.Database, conn: asyncpg.Connection, *, in_s: float) -> uuid.UUID:
    """A batch scheduled ``in_s`` seconds from the database's now."""
    when = await conn.fetchval("SELECT now() + make_interval(secs => $1)", in_s)
    nb = batches.NewBatch(handler=HANDLER, items=[(None, json.dumps(1))], not_before=when)
    sub = await batches.submit(
        db, nb, tenant="t", actor="test", attempt_budget=3, callback_handler=None
    )
    assert sub.batch["status"] == "scheduled", sub.batch
    return uuid.UUID(sub.batch["id"])


async def make_due(conn: asyncpg.Connection, batch_id: uuid.UUID) -> None:
    """Its time has come (backdated; the items' run_after with it)."""
    await conn.execute(
        "UPDATE supervisor.batches SET not_before = now() - interval '1 second' WHERE id = $1",
        batch_id,
    )
    await conn.execute(
        "UPDATE supervisor.items SET run_after = now() - interval '1 second' WHERE batch_id = $1",
        batch_id,
    )


async def status(conn: asyncpg.Connection, batch_id: uuid.UUID) -> str:
    return str(await conn.fetchval("SELECT status FROM supervisor.batches WHERE id = $1", batch_id))


async def promoted_events(conn: asyncpg.Connection, batch_id: uuid.UUID) -> int:
    return int(
        await conn.fetchval(
            "SELECT count(*) FROM supervisor.batch_events"
            " WHERE batch_id = $1 AND action = 'not_before_reached'",
            batch_id,
        )
    )


async def test_the_answer_is_the_time_until_the_next_batch_is_due(
    db: dbm.Database, conn: asyncpg.Connection
) -> None:
    q = store.Queries(db)
    assert await q.promote_scheduled(actor="t", limit=10) is None
    await scheduled(db, conn, in_s=3600)
    due_in = await q.promote_scheduled(actor="t", limit=10)
    assert due_in is not None and 3590 < due_in <= 3600, due_in
    soon = await scheduled(db, conn, in_s=60)
    due_in = await q.promote_scheduled(actor="t", limit=10)
    assert due_in is not None and 50 < due_in <= 60, due_in
    assert await status(conn, soon) == "scheduled"


async def test_a_held_due_batch_is_skipped_without_waiting_then_promoted_once(
    db: dbm.Database, conn: asyncpg.Connection, db_url: str
) -> None:
    q = store.Queries(db)
    held, free = await scheduled(db, conn, in_s=3600), await scheduled(db, conn, in_s=3600)
    await make_due(conn, held)
    await make_due(conn, free)
    other: asyncpg.Connection = await asyncpg.connect(db_url)
    try:
        tx = other.transaction()
        await tx.start()
        await other.execute("SELECT 1 FROM supervisor.batches WHERE id = $1 FOR UPDATE", held)
        with anyio.fail_after(5):  # SKIP LOCKED: it does not wait for the holder
            due_in = await q.promote_scheduled(actor="t", limit=10)
        assert due_in is not None and due_in < 0, due_in  # one is due and was skipped
        assert await status(conn, free) == "queued"
        assert await status(conn, held) == "scheduled"
        await tx.rollback()
    finally:
        await other.close()
    assert await q.promote_scheduled(actor="t", limit=10) is None
    assert await status(conn, held) == "queued"
    assert [await promoted_events(conn, b) for b in (held, free)] == [1, 1]


async def test_concurrent_promotions_promote_each_batch_once(
    db: dbm.Database, conn: asyncpg.Connection
) -> None:
    ids = [await scheduled(db, conn, in_s=3600) for _ in range(40)]
    for b in ids:
        await make_due(conn, b)
    q = store.Queries(db)

    async def promote() -> None:
        await q.promote_scheduled(actor="t", limit=7)  # 40 need several calls

    async with anyio.create_task_group() as tg:
        for _ in range(4):
            tg.start_soon(promote)
    # Whatever the calls left (each takes at most 7) goes on the next ones.
    while (await q.promote_scheduled(actor="t", limit=7)) is not None:
        pass
    assert {await status(conn, b) for b in ids} == {"queued"}
    assert {await promoted_events(conn, b) for b in ids} == {1}


async def test_the_delayed_starter_waits_until_the_next_is_due_but_never_past_its_cap() -> None:
    cfg = make_config(worker={"poll_interval": "2s"})
    listening = True
    s = delayed.DelayedStarter(cfg, None, lambda: listening)  # type: ignore[arg-type]
    assert s.next_wait(None) == delayed.IDLE_S
    assert s.next_wait(0.25) == 0.25
    assert s.next_wait(-3.0) == delayed.RETRY_S  # due and held by another: soon again
    assert s.next_wait(timedelta(hours=1).total_seconds()) == delayed.IDLE_S
    listening = False  # nobody announces new schedules: poll
    assert s.next_wait(None) == 2.0 and s.next_wait(60.0) == 2.0
