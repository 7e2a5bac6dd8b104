"""The reaper (supervisor/reaper.py) against the real database: the items of a
lease whose worker stopped heartbeating (or has no worker row) are reclaimed, its
row deleted; live leases are left alone; one reaper at a time."""

from __future__ import annotations

import json
import os
import socket
import time
import uuid

import anyio
import asyncpg
import pytest

from supervisor import db as dbm
from supervisor import reaper, store
from tests.integration import support
from tests.integration.support import (
    claim,
    error_type,
    eventually,
    get_batch,
    items_of,
    new_lease,
    submit,
)

pytestmark = pytest.mark.anyio


class Reclaimed:
    def __init__(self) -> None:
        self.calls: list[store.Transitions] = []

    def __call__(self, done: store.Transitions) -> None:
        self.calls.append(done)


async def register(db: dbm.Database, lease: str, name: str) -> None:
    await store.Queries(db).register_worker(
        lease=uuid.UUID(lease), name=name, host=socket.gethostname(), pid=os.getpid(), concurrency=4
    )


async def backdate_heartbeat(conn: asyncpg.Connection, lease: str, seconds: float) -> None:
    await conn.execute(
        "UPDATE supervisor.workers SET heartbeat_at = now() - make_interval(secs => $2) "
        "WHERE id = $1",
        uuid.UUID(lease),
        seconds,
    )


async def worker_ids(conn: asyncpg.Connection) -> set[str]:
    return {str(r["id"]) for r in await conn.fetch("SELECT id FROM supervisor.workers")}


async def dead_worker_running_one_item(
    db: dbm.Database, conn: asyncpg.Connection
) -> tuple[uuid.UUID, str, store.ClaimedItem]:
    """A one-item batch whose item runs under a worker silent for an hour:
    (batch id, that worker's lease, the item)."""
    bid = await submit(db, 1)
    dead = new_lease()
    await register(db, dead, "dead-d")
    (item,) = await claim(db, dead, 1, worker="dead-d")
    await backdate_heartbeat(conn, dead, 3600)
    return bid, dead, item


def make_reaper(db: dbm.Database, **worker: str) -> tuple[reaper.Reaper, Reclaimed]:
    cfg = support.make_config(
        worker={"name": "reaper-d", "heartbeat_interval": "100ms", "dead_after": "1s", **worker}
    )
    seen = Reclaimed()
    return reaper.Reaper(cfg, db, seen), seen


async def test_the_items_of_a_dead_worker_are_reclaimed_and_its_row_deleted(
    db: dbm.Database, conn: asyncpg.Connection
) -> None:
    bid = await submit(db, 4)
    dead, live = new_lease(), new_lease()
    await register(db, dead, "dead-d")
    await register(db, live, "live-d")
    lost = await claim(db, dead, 2, worker="dead-d")
    kept = await claim(db, live, 2, worker="live-d")
    await backdate_heartbeat(conn, dead, 3600)
    r, seen = make_reaper(db)

    assert await r.reap_once() == 2

    assert len(seen.calls) == 1
    done = seen.calls[0]
    assert done.statuses == {c.id: "queued" for c in lost}
    assert done.handlers == {c.id: support.HANDLER for c in lost}
    assert done.fenced == frozenset() and done.finished == []
    items = await items_of(db, bid)
    for c in lost:
        row = items[c.id]
        assert (row.status, row.attempts, error_type(row)) == ("queued", 1, "WorkerLost")
        entry = json.loads(row.error or "{}")
        assert "dead-d" in entry["message"] and entry["worker"] == "dead-d"
    for c in kept:
        assert (items[c.id].status, items[c.id].worker, items[c.id].error) == (
            "running",
            "live-d",
            None,
        )
    assert await worker_ids(conn) == {live}
    b = await get_batch(db, bid)
    assert (b.status, b.queued, b.running) == ("running", 2, 2)
    assert await store.Queries(db).doctor_drift() == []

    # Nothing left to reap: the next pass reclaims nothing and reports nothing.
    assert await r.reap_once() == 0
    assert len(seen.calls) == 1


async def test_a_dead_workers_last_attempts_fail_and_end_the_batch(
    db: dbm.Database, conn: asyncpg.Connection
) -> None:
    bid = await submit(db, 2, attempt_budget=1)
    dead = new_lease()
    await register(db, dead, "dead-d")
    lost = await claim(db, dead, 2, worker="dead-d")
    await backdate_heartbeat(conn, dead, 3600)
    r, seen = make_reaper(db)

    assert await r.reap_once() == 2

    (done,) = seen.calls
    assert done.statuses == {c.id: "failed" for c in lost}
    assert [(f.batch_id, f.status) for f in done.finished] == [(str(bid), "failed")]
    b = await get_batch(db, bid)
    assert (b.status, b.failed, b.running) == ("failed", 2, 0)
    assert {error_type(i) for i in (await items_of(db, bid)).values()} == {"WorkerLost"}


async def test_a_heartbeat_younger_than_dead_after_keeps_its_items(
    db: dbm.Database, conn: asyncpg.Connection
) -> None:
    bid = await submit(db, 1)
    slow = new_lease()
    await register(db, slow, "slow-d")
    (item,) = await claim(db, slow, 1, worker="slow-d")
    await backdate_heartbeat(conn, slow, 0.5)  # late, but within dead_after (1s)
    r, seen = make_reaper(db)

    assert await r.reap_once() == 0

    assert seen.calls == []
    assert (await items_of(db, bid))[item.id].status == "running"
    assert await worker_ids(conn) == {slow}


async def test_running_items_of_a_lease_without_a_worker_row_are_reclaimed(
    db: dbm.Database,
) -> None:
    bid = await submit(db, 2)
    orphan = new_lease()  # its daemon deregistered (or was deleted) with items running
    lost = await claim(db, orphan, 2, worker="gone-d")
    r, seen = make_reaper(db)

    assert await r.reap_once() == 2

    assert seen.calls[0].statuses == {c.id: "queued" for c in lost}
    assert {i.status for i in (await items_of(db, bid)).values()} == {"queued"}


async def test_reclaim_false_only_checks_the_database(
    db: dbm.Database, conn: asyncpg.Connection
) -> None:
    bid, dead, item = await dead_worker_running_one_item(db, conn)
    r, seen = make_reaper(db)
    before = await get_batch(db, bid)

    assert await r.reap_once(reclaim=False) == 0

    assert seen.calls == []
    assert (await items_of(db, bid))[item.id].status == "running"
    assert await worker_ids(conn) == {dead}
    assert await get_batch(db, bid) == before


async def test_a_running_callback_of_a_dead_worker_goes_back_to_pending(
    db: dbm.Database, conn: asyncpg.Connection
) -> None:
    bid = await support.finished_batch(db, callback_handler="notify")
    dead = new_lease()
    await register(db, dead, "dead-d")
    (row,) = await store.Queries(db).claim_callbacks(
        limit=1, lease=uuid.UUID(dead), worker="dead-d"
    )
    assert (row.id, row.callback_state) == (bid, "running")
    await backdate_heartbeat(conn, dead, 3600)
    r, seen = make_reaper(db)

    assert await r.reap_once() == 0  # no items: the count is of items

    b = await get_batch(db, bid)
    assert (b.callback_state, b.callback_lease, b.callback_attempts) == ("pending", None, 1)
    assert b.status == "completed"
    assert await worker_ids(conn) == set()
    assert [d.statuses for d in seen.calls] == [{}]


async def test_only_one_reaper_reaps_at_a_time(
    db: dbm.Database, db_url: str, conn: asyncpg.Connection
) -> None:
    bid, _, item = await dead_worker_running_one_item(db, conn)
    r, seen = make_reaper(db)

    other: asyncpg.Connection = await asyncpg.connect(db_url)
    try:
        async with other.transaction():  # another daemon's reaper pass in progress
            assert await other.fetchval(db.sql("try_reaper_lock")) is True
            assert await r.reap_once() == 0
            assert seen.calls == []
            assert (await items_of(db, bid))[item.id].status == "running"
    finally:
        await other.close()

    assert await r.reap_once() == 1
    assert (await items_of(db, bid))[item.id].status == "queued"


async def test_run_reclaims_only_after_being_in_touch_for_dead_after(
    db: dbm.Database, conn: asyncpg.Connection
) -> None:
    bid, _, item = await dead_worker_running_one_item(db, conn)
    r, seen = make_reaper(db, heartbeat_interval="50ms", dead_after="400ms")

    async def reclaimed() -> bool:
        return (await items_of(db, bid))[item.id].status == "queued"

    async with anyio.create_task_group() as tg:
        start = time.monotonic()
        await tg.start(r.run)
        await eventually(reclaimed, what="the dead lease reclaimed by the running reaper")
        elapsed = time.monotonic() - start
        tg.cancel_scope.cancel()

    # A dead lease is trusted only after dead_after of contact (after an outage every
    # heartbeat is stale at once, ours included).
    assert elapsed >= 0.4, elapsed
    assert len(seen.calls) == 1
    assert await worker_ids(conn) == set()
