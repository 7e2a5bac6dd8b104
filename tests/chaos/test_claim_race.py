"""A claim must only touch batches it locked (the one lock order: batch rows first).

Found by the soak (bench/soak.py): ``claim_items`` locked its candidate batches with
one query, then chose the batches to claim from with another; under READ COMMITTED
the second one sees a newer snapshot, so a batch that became claimable meanwhile
(resumed, retried, submitted, or reordered by another daemon's claim) was claimed
from without its row lock. ``_settle`` then read the batch and overwrote it with
values computed from that read, after waiting for the lock: a concurrent writer's
change was lost. In the soak the lost change was another claim's counters (items
``running``, counters ``queued``), and the next outcome write of those items hit the
non-negative CHECK and crashed every daemon that tried it.

Here the interleaving is forced with row locks: the claim waits on the lock of a
batch it wants (C) while another batch (B) is resumed, then B is paused in an open
transaction; when C is released, the claim must leave B alone, and B's pause must
survive.
"""

from __future__ import annotations

import asyncio
import json
import uuid

import asyncpg

from supervisor import batches, config, store
from supervisor import db as dbm


async def wait_blocked(watch: asyncpg.Connection, pid: int) -> None:
    """Until backend ``pid`` waits on a lock (deadline: 10 s)."""
    for _ in range(1000):
        event = await watch.fetchval(
            "SELECT wait_event_type FROM pg_stat_activity WHERE pid = $1", pid
        )
        if event == "Lock":
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"backend {pid} never waited on a lock")


async def scenario(db_url: str) -> None:
    db = await dbm.Database.connect(config.from_mapping({}), db_url)
    handler = f"h_{uuid.uuid4().hex[:12]}"
    conns: list[asyncpg.Connection] = []
    try:

        async def new_batch() -> str:
            nb = batches.NewBatch(handler=handler, items=[(None, json.dumps(n)) for n in range(2)])
            sub = await batches.submit(
                db, nb, tenant="t", actor="test", attempt_budget=3, callback_handler=None
            )
            return str(sub.batch["id"])

        c_id = await new_batch()
        b_id = await new_batch()
        q = store.Queries(db)
        ok = store.ControlResult(store.ControlKind.OK)
        assert await q.pause_batch(uuid.UUID(b_id), tenant=None, actor="test", pause=True) == ok

        holder, claimer, pauser, watch = [await asyncpg.connect(db_url) for _ in range(4)]
        conns += [holder, claimer, pauser, watch]
        # 1. Hold C's row: the claim's locking query waits for it.
        hold = holder.transaction()
        await hold.start()
        await holder.execute(
            "SELECT 1 FROM supervisor.batches WHERE id = $1 FOR UPDATE", uuid.UUID(c_id)
        )
        claim = asyncio.create_task(
            claimer.fetch(db.sql("claim_items"), handler, 10, "w1", uuid.uuid4(), None, None, 1.0)
        )
        await wait_blocked(watch, claimer.get_server_pid())
        # 2. B becomes claimable after the claim chose (and began locking) its candidates.
        assert await q.pause_batch(uuid.UUID(b_id), tenant=None, actor="test", pause=False) == ok
        # 3. B is paused again by a transaction that holds B's row until later.
        pause = pauser.transaction()
        await pause.start()
        assert (
            await pauser.fetchval(db.sql("pause_batch"), uuid.UUID(b_id), None, "test", True)
            == "ok"
        )
        # 4. C is released: the claim goes on. It must not claim from B (not locked).
        await hold.commit()
        # A correct claim finishes now; the faulty one waits for B's row (to write a
        # batch it never locked) until the pause commits, then overwrites the pause.
        await asyncio.wait({claim}, timeout=1)
        await pause.commit()
        rows = await asyncio.wait_for(claim, 10)

        assert {str(r["batch_id"]) for r in rows} == {c_id}, rows
        b = await db.fetchrow("get_batch", uuid.UUID(b_id), None)
        assert b is not None
        assert (b["status"], b["running"], b["queued"]) == ("paused", 0, 2), dict(b)
        assert await db.fetch("doctor_drift") == []
    finally:
        for conn in conns:
            await conn.close()
        await db.close()


def test_claim_leaves_batches_it_did_not_lock_alone(db_url: str) -> None:
    asyncio.run(scenario(db_url))
