"""Submission: a batch, its items, its 'created' event and both wake-ups, all or
nothing, whether the items go in the submission's one statement (small batches)
or by COPY (large ones)."""

from __future__ import annotations

import json
import uuid

import anyio
import asyncpg
import pytest

from supervisor import batches
from supervisor import db as dbm
from tests.integration.support import HANDLER

pytestmark = pytest.mark.anyio

SIZES = [3, batches.INLINE_ITEMS, batches.INLINE_ITEMS + 1]


async def _submit(db: dbm.Database, n: int, key: str | None = None) -> batches.Submitted:
    nb = batches.NewBatch(
        handler=HANDLER,
        items=[(f"k{i}", json.dumps({"n": i})) for i in range(n)],
        idempotency_key=key,
    )
    return await batches.submit(
        db, nb, tenant="t", actor="alice", attempt_budget=4, callback_handler=None
    )


@pytest.mark.parametrize("n", SIZES)
async def test_a_submission_stores_the_batch_items_event_and_wakes_both_channels(
    db: dbm.Database, conn: asyncpg.Connection, n: int
) -> None:
    heard: list[tuple[str, str]] = []
    got_both = anyio.Event()

    def hear(_c: object, _pid: int, channel: str, payload: object) -> None:
        heard.append((channel, str(payload)))
        if len(heard) == 2:
            got_both.set()

    for channel in (f"{db.schema}_wake", f"{db.schema}_batch"):
        await conn.add_listener(channel, hear)

    sub = await _submit(db, n)
    with anyio.fail_after(5):
        await got_both.wait()

    bid = uuid.UUID(sub.batch["id"])
    assert sub.created and sub.batch["status"] == "queued" and sub.batch["counts"]["total"] == n
    assert sorted(heard) == [
        (f"{db.schema}_batch", f"{bid}:1:queued"),
        (f"{db.schema}_wake", HANDLER),
    ]
    rows = await conn.fetch(
        f"SELECT seq, key, payload, max_attempts, status, handler FROM {db.schema}.items "
        "WHERE batch_id = $1 ORDER BY seq",
        bid,
    )
    assert [r["seq"] for r in rows] == list(range(n))
    assert [r["key"] for r in rows] == [f"k{i}" for i in range(n)]
    assert [json.loads(r["payload"]) for r in rows] == [{"n": i} for i in range(n)]
    assert {(r["max_attempts"], r["status"], r["handler"]) for r in rows} == {
        (4, "queued", HANDLER)
    }
    events = await conn.fetch(
        f"SELECT action, actor, detail FROM {db.schema}.batch_events WHERE batch_id = $1", bid
    )
    assert [(e["action"], e["actor"], json.loads(e["detail"])) for e in events] == [
        ("created", "alice", {"items": n, "handler": HANDLER})
    ]


@pytest.mark.parametrize("n", [3, batches.INLINE_ITEMS + 1])
async def test_an_idempotent_repeat_returns_the_batch_and_inserts_nothing(
    db: dbm.Database, conn: asyncpg.Connection, n: int
) -> None:
    first = await _submit(db, n, key="once")
    again = await _submit(db, n, key="once")
    assert first.created and not again.created
    assert again.batch["id"] == first.batch["id"]
    counts = await conn.fetchrow(
        f"SELECT (SELECT count(*) FROM {db.schema}.batches) AS batches, "
        f"(SELECT count(*) FROM {db.schema}.items) AS items, "
        f"(SELECT count(*) FROM {db.schema}.batch_events) AS events"
    )
    assert counts is not None
    assert dict(counts) == {"batches": 1, "items": n, "events": 1}
