"""A retry of a paused batch keeps it paused. Found by the state machine
(test_state_machine.py): after pausing became a flag that _settle derives the
status from, reopening for a retry cleared the flag of a batch that was still
live, and the batch ran again though nobody had resumed it."""

from __future__ import annotations

import json
import uuid

import anyio

from supervisor import batches, config, store
from supervisor import db as dbm


async def scenario(db_url: str) -> tuple[str, str]:
    db = await dbm.Database.connect(config.from_mapping({}), db_url)
    try:
        q = store.Queries(db)
        nb = batches.NewBatch(
            handler="h", items=[(None, json.dumps(n)) for n in range(2)], max_attempts=1
        )
        sub = await batches.submit(
            db, nb, tenant="t", actor="test", attempt_budget=1, callback_handler=None
        )
        bid = uuid.UUID(str(sub.batch["id"]))
        lease = uuid.uuid4()
        claimed = await q.claim_items(
            handler="h", limit=1, worker="w", lease=lease, global_cap=None, rate=None, burst=1.0
        )
        assert len(claimed) == 1
        await q.reclaim_leases([lease], actor="test")  # its one attempt spent: failed
        ok = store.ControlResult(store.ControlKind.OK)
        assert await q.pause_batch(bid, tenant=None, actor="test", pause=True) == ok
        assert await q.retry_batch(bid, tenant=None, actor="test", include_cancelled=False) == ok
        paused = await q.get_batch(bid, tenant=None)
        assert paused is not None
        assert await q.pause_batch(bid, tenant=None, actor="test", pause=False) == ok
        resumed = await q.get_batch(bid, tenant=None)
        assert resumed is not None
        return paused.status, resumed.status
    finally:
        await db.close()


def test_retrying_a_paused_batch_keeps_it_paused(db_url: str) -> None:
    assert anyio.run(scenario, db_url) == ("paused", "running")
