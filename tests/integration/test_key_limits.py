"""Keyed limits in the claim (claim_keyed_items): at most N running and a rate of
starts per limit key, across claims of any daemon, fair across keys, with a
key's slot freed by whatever ends its running item."""

from __future__ import annotations

import json
import uuid
from collections import Counter
from collections.abc import Sequence
from typing import Any

import asyncpg
import pytest

from supervisor import batches, key_limits, states, store
from supervisor import db as dbm
from tests.integration.support import HANDLER, new_lease, outcome, succeed_all
from tests.test_query_plans import log_plans

pytestmark = pytest.mark.anyio

POINTER = ("domain",)


async def submit(
    db: dbm.Database, domains: Sequence[str | None], *, max_concurrency: int | None = None
) -> uuid.UUID:
    """A batch with one item per entry, payload {"domain": d, "n": i} (no domain: None)."""
    payloads: list[dict[str, Any]] = [
        {"n": i} if d is None else {"domain": d, "n": i} for i, d in enumerate(domains)
    ]
    nb = batches.NewBatch(
        handler=HANDLER,
        items=[(None, json.dumps(p)) for p in payloads],
        max_concurrency=max_concurrency,
        limit_keys=[key_limits.key_of(p, POINTER) for p in payloads],
    )
    sub = await batches.submit(
        db, nb, tenant="t", actor="test", attempt_budget=3, callback_handler=None
    )
    return uuid.UUID(sub.batch["id"])


async def claim(
    db: dbm.Database,
    lease: str,
    n: int,
    *,
    key_cap: int | None = None,
    key_rate: float | None = None,
    global_cap: int | None = None,
) -> list[store.KeyedClaimedItem]:
    """Claim up to ``n`` items as the dispatcher does for a handler with a key limit."""
    return await store.Queries(db).claim_keyed_items(
        handler=HANDLER,
        limit=n,
        worker="it-worker",
        lease=uuid.UUID(lease),
        global_cap=global_cap,
        rate=None,
        burst=1.0,
        key_cap=key_cap,
        key_rate=key_rate,
        key_burst=1.0,
    )


def domains(claimed: Sequence[store.ClaimedItem]) -> Counter[str | None]:
    return Counter(json.loads(c.payload).get("domain") for c in claimed)


async def running_per_key(conn: asyncpg.Connection, schema: str) -> dict[str, int]:
    rows = await conn.fetch(
        f"SELECT limit_key, count(*) AS n FROM {schema}.items WHERE status = 'running' "
        "GROUP BY limit_key"
    )
    return {r["limit_key"]: r["n"] for r in rows}


async def test_at_most_the_key_concurrency_runs_per_key_across_claims_and_leases(
    db: dbm.Database, conn: asyncpg.Connection
) -> None:
    await submit(db, ["a.example"] * 5 + ["b.example"] * 5 + ["c.example"] * 5)
    first, other = new_lease(), new_lease()
    got = await claim(db, first, 10, key_cap=2)
    assert domains(got) == {"a.example": 2, "b.example": 2, "c.example": 2}
    # Another daemon's claim sees the same keys full.
    assert await claim(db, other, 10, key_cap=2) == []
    assert await running_per_key(conn, db.schema) == {
        "a.example": 2,
        "b.example": 2,
        "c.example": 2,
    }
    # A finished item frees one slot of its own key only.
    done = next(c for c in got if json.loads(c.payload)["domain"] == "b.example")
    await succeed_all(db, first, [done])
    again = await claim(db, other, 10, key_cap=2)
    assert domains(again) == {"b.example": 1}


@pytest.mark.parametrize("how", ["released", "reclaimed"])
async def test_a_released_or_reclaimed_item_frees_its_keys_slot(
    db: dbm.Database, conn: asyncpg.Connection, how: str
) -> None:
    await submit(db, ["a.example"] * 3)
    lease = new_lease()
    (item,) = await claim(db, lease, 5, key_cap=1)
    assert await claim(db, new_lease(), 5, key_cap=1) == []
    q = store.Queries(db)
    if how == "released":
        rec = outcome(item, lease, states.Outcome.RELEASED)
        await q.apply_outcomes(
            store.Outcomes(
                lease=uuid.UUID(lease),
                batches=[item.batch_id],
                ids=[rec.item_id],
                attempts=[rec.attempt],
                outcomes=[rec.outcome.value],
                results=[None],
                errors=[None],
                delays=[0.0],
                actor="test",
            )
        )
    else:
        await q.reclaim_leases([uuid.UUID(lease)], actor="reaper")
    assert await running_per_key(conn, db.schema) == {}
    # The freed slot is taken again (by the released item itself: it is queued
    # again with its old run_after, ahead of the key's others).
    (again,) = await claim(db, new_lease(), 5, key_cap=1)
    assert json.loads(again.payload)["domain"] == "a.example"


async def test_the_rate_per_key_spaces_each_keys_starts_and_not_the_others(
    db: dbm.Database, conn: asyncpg.Connection
) -> None:
    await submit(db, ["a.example"] * 4 + ["b.example"] * 4)
    lease = new_lease()
    # 2/s with a burst of one start: one start per key, then nothing until refill.
    assert domains(await claim(db, lease, 10, key_rate=2.0)) == {"a.example": 1, "b.example": 1}
    assert await claim(db, lease, 10, key_rate=2.0) == []
    # Half a second later (the buckets' clocks moved back), one more each; a long
    # pause still gives one, not a backlog: the burst caps the bucket.
    await conn.execute(
        f"UPDATE {db.schema}.key_rate_buckets SET updated_at = updated_at - interval '0.5 s'"
        " WHERE limit_key = 'a.example'"
    )
    assert domains(await claim(db, lease, 10, key_rate=2.0)) == {"a.example": 1}
    await conn.execute(
        f"UPDATE {db.schema}.key_rate_buckets SET updated_at = updated_at - interval '60 s'"
    )
    assert domains(await claim(db, lease, 10, key_rate=2.0)) == {"a.example": 1, "b.example": 1}
    # The buckets are durable rows: a claim by another daemon sees them spent.
    assert await claim(db, new_lease(), 10, key_rate=2.0) == []


async def test_a_key_with_a_deep_backlog_never_starves_the_small_keys(
    db: dbm.Database,
) -> None:
    # The deep key is submitted first, in its own batch; nine small keys after it.
    await submit(db, ["deep.example"] * 1000)
    await submit(db, [f"small{k}.example" for k in range(9) for _ in range(5)])
    lease = new_lease()
    first = await claim(db, lease, 10, key_cap=100)
    # Every key's first item before any key's second: all ten keys in one claim.
    assert domains(first) == {"deep.example": 1, **{f"small{k}.example": 1 for k in range(9)}}
    # With claims smaller than the number of keys, the keys take turns.
    seen: set[str | None] = set()
    for _ in range(3):
        seen |= set(domains(await claim(db, lease, 4, key_cap=100)))
    assert seen == {"deep.example", *(f"small{k}.example" for k in range(9))}


async def test_the_shares_of_keys_with_few_items_go_to_the_others(db: dbm.Database) -> None:
    await submit(db, ["a.example"] * 1 + ["b.example"] * 50)
    got = await claim(db, new_lease(), 10, key_cap=100)
    assert domains(got) == {"a.example": 1, "b.example": 9}


async def test_items_without_the_key_share_the_empty_key(
    db: dbm.Database, conn: asyncpg.Connection
) -> None:
    await submit(db, [None, None, "a.example"])
    got = await claim(db, new_lease(), 10, key_cap=1)
    assert domains(got) == {None: 1, "a.example": 1}
    assert await running_per_key(conn, db.schema) == {"": 1, "a.example": 1}


async def test_a_keyed_claim_keeps_pause_and_max_concurrency(db: dbm.Database) -> None:
    capped = await submit(db, [f"k{i}" for i in range(6)], max_concurrency=2)
    paused = await submit(db, [f"p{i}" for i in range(3)])
    await store.Queries(db).pause_batch(paused, tenant=None, actor="test", pause=True)
    got = await claim(db, new_lease(), 10, key_cap=1)
    assert len(got) == 2 and {c.batch_id for c in got} == {capped}


async def test_a_keyed_claim_keeps_the_handlers_global_cap(db: dbm.Database) -> None:
    await submit(db, [f"k{i}" for i in range(6)])
    lease = new_lease()
    assert len(await claim(db, lease, 10, key_cap=1, global_cap=4)) == 4
    assert await claim(db, new_lease(), 10, key_cap=1, global_cap=4) == []


async def test_items_queued_before_the_key_limit_get_their_keys_as_at_submission(
    db: dbm.Database, conn: asyncpg.Connection
) -> None:
    payloads: list[Any] = [
        {"domain": "a.example"},
        {"domain": 42},
        {"domain": True},
        {"domain": 1.5},
        {"domain": {"x": 1}},
        {"domain": None},
        {},
        "bare",
    ]
    nb = batches.NewBatch(handler=HANDLER, items=[(None, json.dumps(p)) for p in payloads])
    await batches.submit(db, nb, tenant="t", actor="test", attempt_budget=3, callback_handler=None)
    # Not seen by a keyed claim until they have keys.
    assert await claim(db, new_lease(), 10, key_cap=1) == []
    q = store.Queries(db)
    assert await q.assign_limit_keys(handler=HANDLER, tokens=POINTER) == len(payloads)
    assert await q.assign_limit_keys(handler=HANDLER, tokens=POINTER) == 0
    rows = await conn.fetch(f"SELECT payload, limit_key FROM {db.schema}.items ORDER BY seq")
    keys = [r["limit_key"] for r in rows]
    assert keys == ["a.example", "42", "true", "", "", "", "", ""]
    # The same as submission gives, where submission accepts the value.
    for p, k in zip(payloads, keys, strict=True):
        try:
            assert key_limits.key_of(p, POINTER) == k
        except ValueError:
            pass  # refused at submission (422)
    got = await claim(db, new_lease(), 10, key_cap=1)
    assert len(got) == 4  # "a.example", "42", "true" and one of those sharing ""


async def test_a_large_submission_copies_its_items_limit_keys(
    db: dbm.Database, conn: asyncpg.Connection
) -> None:
    n = batches.INLINE_ITEMS + 1  # past the one-statement submission: COPY
    await submit(db, [f"d{i % 7}" for i in range(n)])
    rows = await conn.fetch(
        f"SELECT limit_key, count(*) AS n FROM {db.schema}.items GROUP BY limit_key"
    )
    assert {r["limit_key"]: r["n"] for r in rows} == {
        f"d{k}": len(range(k, n, 7)) for k in range(7)
    }
    assert len(await claim(db, new_lease(), 100, key_cap=1)) == 7


async def test_a_keyed_claim_reads_indexes_not_the_queue(
    db: dbm.Database, conn: asyncpg.Connection
) -> None:
    """Its cost follows the keys it looks at: no statement of the claim scans
    items (or the buckets) whole, however deep the queue, once statistics say
    it is deep."""
    await submit(db, [f"site{i % 5000}.example" for i in range(20_000)])
    lease = new_lease()
    await claim(db, lease, 50, key_cap=1, key_rate=100.0)  # buckets and a cursor exist
    await conn.execute(f"ANALYZE {db.schema}.items")
    plans = await log_plans(conn)
    rows = await conn.fetch(
        db.sql("claim_keyed_items"),
        HANDLER,
        100,
        "w2",
        uuid.uuid4(),
        None,
        None,
        1.0,
        1,
        100.0,
        1.0,
        None,
        60.0,
        None,
    )
    assert len(rows) == 100
    assert any("items_key_runnable" in p for p in plans), plans
    scans = [p for p in plans if "Seq Scan on items" in p or "Seq Scan on key_rate" in p]
    assert scans == [], scans
