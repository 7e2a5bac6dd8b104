"""Exclusive keys on both submission paths (the items in the one statement, or
by COPY in its transaction): a refused submission writes nothing and names the
holder, and a repeat of the holder's own idempotent request is that batch."""

from __future__ import annotations

import json
import uuid

import asyncpg
import pytest

from supervisor import batches
from supervisor import db as dbm
from tests.integration.support import HANDLER

pytestmark = pytest.mark.anyio

SIZES = [3, batches.INLINE_ITEMS + 1]
KEY = "portfolio:123"


async def _submit(
    db: dbm.Database, n: int, *, idempotency_key: str | None = None, seed: int = 0
) -> batches.Submitted:
    nb = batches.NewBatch(
        handler=HANDLER,
        items=[(None, json.dumps({"n": i, "seed": seed})) for i in range(n)],
        idempotency_key=idempotency_key,
        exclusive_key=KEY,
    )
    return await batches.submit(
        db, nb, tenant="t", actor="alice", attempt_budget=3, callback_handler=None
    )


async def _counts(conn: asyncpg.Connection, schema: str) -> dict[str, int]:
    r = await conn.fetchrow(
        f"SELECT (SELECT count(*) FROM {schema}.batches) AS batches, "
        f"(SELECT count(*) FROM {schema}.items) AS items, "
        f"(SELECT count(*) FROM {schema}.batch_events) AS events"
    )
    assert r is not None
    return dict(r)


@pytest.mark.parametrize("n", SIZES)
async def test_a_held_key_refuses_the_submission_and_writes_nothing(
    db: dbm.Database, conn: asyncpg.Connection, n: int
) -> None:
    first = await _submit(db, n, idempotency_key="run-1")
    assert first.created and first.batch["exclusive_key"] == KEY
    with pytest.raises(batches.ExclusiveKeyBusy) as refused:
        await _submit(db, n, idempotency_key="run-2", seed=1)
    assert refused.value.active_batch_id == uuid.UUID(first.batch["id"])
    assert refused.value.status == "queued"
    assert await _counts(conn, db.schema) == {"batches": 1, "items": n, "events": 1}

    again = await _submit(db, n, idempotency_key="run-1")
    assert not again.created and again.batch["id"] == first.batch["id"]

    # Terminal (as the last item's outcome write would leave it): the key is free.
    await conn.execute(
        f"UPDATE {db.schema}.batches SET status = 'cancelled', queued = 0, cancelled = total"
        " WHERE id = $1",
        uuid.UUID(first.batch["id"]),
    )
    second = await _submit(db, n, idempotency_key="run-2", seed=1)
    assert second.created and second.batch["id"] != first.batch["id"]
