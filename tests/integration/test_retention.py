"""Retention (supervisor/retention.py) against the real database: terminal batches
finished before ``retention.finished_after`` go, with their items and audit log;
recent, unfinished and callback-pending batches stay."""

from __future__ import annotations

import uuid

import anyio
import asyncpg
import pytest

from supervisor import db as dbm
from supervisor import retention, store
from tests.integration import support
from tests.integration.support import eventually, finished_batch, submit

pytestmark = pytest.mark.anyio


def make(db: dbm.Database, **section: str) -> retention.Retention:
    return retention.Retention(
        support.make_config(retention={"finished_after": "1h", **section}), db
    )


async def finished_ago(conn: asyncpg.Connection, bid: uuid.UUID, seconds: float) -> None:
    await conn.execute(
        "UPDATE supervisor.batches SET finished_at = now() - make_interval(secs => $2) "
        "WHERE id = $1",
        bid,
        seconds,
    )


async def present(conn: asyncpg.Connection) -> set[uuid.UUID]:
    return {r["id"] for r in await conn.fetch("SELECT id FROM supervisor.batches")}


async def leftovers(conn: asyncpg.Connection, bid: uuid.UUID) -> tuple[int, int]:
    """(items, audit entries) still there for ``bid``."""
    items = await conn.fetchval("SELECT count(*) FROM supervisor.items WHERE batch_id = $1", bid)
    log = await conn.fetchval(
        "SELECT count(*) FROM supervisor.batch_events WHERE batch_id = $1", bid
    )
    return int(items), int(log)


async def test_sweep_deletes_old_terminal_batches_and_keeps_the_rest(
    db: dbm.Database, conn: asyncpg.Connection
) -> None:
    old = await finished_batch(db, 3)
    recent = await finished_batch(db, 1)
    unfinished = await submit(db, 2)
    await finished_ago(conn, old, 2 * 3600)
    await finished_ago(conn, recent, 1800)
    # Not terminal, whatever its timestamp says (a batch retried after it ended).
    await finished_ago(conn, unfinished, 2 * 3600)
    assert await leftovers(conn, old) != (0, 0)

    assert await make(db).sweep() == 1

    assert await present(conn) == {recent, unfinished}
    assert await leftovers(conn, old) == (0, 0)
    assert await leftovers(conn, recent) == (1, 3)  # its item; created, started, finished
    assert await store.Queries(db).get_batch(old, tenant=None) is None
    assert await store.Queries(db).doctor_orphans() == 0
    assert await make(db).sweep() == 0  # nothing more is due


async def test_a_batch_whose_callback_is_not_done_is_kept(
    db: dbm.Database, conn: asyncpg.Connection
) -> None:
    pending = await finished_batch(db, 1, callback_handler="notify")
    running = await finished_batch(db, 1, callback_handler="notify")
    delivered = await finished_batch(db, 1, callback_handler="notify")
    q = store.Queries(db)
    lease = uuid.uuid4()
    claimed = await q.claim_callbacks(limit=3, lease=lease, worker="cb")
    assert {b.id for b in claimed} == {pending, running, delivered}
    for b in claimed:
        if b.id != running:
            state = "succeeded" if b.id == delivered else "pending"
            await q.finish_callback(
                b.id, lease=lease, attempt=1, state=state, error=None, delay_s=3600, actor="cb"
            )
    for bid in (pending, running, delivered):
        await finished_ago(conn, bid, 2 * 3600)
    states = {bid: (await support.get_batch(db, bid)).callback_state for bid in (pending, running)}
    assert states == {pending: "pending", running: "running"}

    assert await make(db).sweep() == 1

    assert await present(conn) == {pending, running}


async def test_sweep_deletes_in_chunks_until_nothing_is_due(
    db: dbm.Database, conn: asyncpg.Connection
) -> None:
    model = await finished_batch(db, 1)
    await finished_ago(conn, model, 2 * 3600)
    n = 2 * retention.CHUNK + 17
    # Copies of the finished batch (each with one item), more than one chunk's worth.
    await conn.execute(
        """
        WITH copies AS (
            INSERT INTO supervisor.batches
            SELECT (jsonb_populate_record(b, jsonb_build_object('id', gen_random_uuid()))).*
              FROM supervisor.batches b, generate_series(2, $2) WHERE b.id = $1
            RETURNING id
        )
        INSERT INTO supervisor.items (batch_id, seq, key, handler, status, payload,
                                      attempts, max_attempts, finished_at)
        SELECT id, 0, 'k', 'work', 'succeeded', '0', 1, 3, now() - interval '2 hours'
          FROM copies
        """,
        model,
        n,
    )
    assert len(await present(conn)) == n
    keep = await finished_batch(db, 1)

    assert await make(db).sweep() == n

    assert await present(conn) == {keep}
    assert await conn.fetchval("SELECT count(*) FROM supervisor.items") == 1


async def test_run_sweeps_at_start(db: dbm.Database, conn: asyncpg.Connection) -> None:
    old = await finished_batch(db, 1)
    await finished_ago(conn, old, 2 * 3600)

    async def swept() -> bool:
        return old not in await present(conn)

    async with anyio.create_task_group() as tg:
        await tg.start(make(db, interval="1h").run)
        await eventually(swept, what="the first sweep")
        tg.cancel_scope.cancel()
