"""Claims and outcome writes whose cost stays bounded by what they move.

The outcome write stays linear when statistics say nothing is running.

A daemon's running items are a tiny share of a deep queue. Once autoanalyze has
sampled a big table of queued items, the planner estimates that one item matches an
outcome write, and (before migration 0003) put the unnest of the outcomes on the
inner side of a nested loop: every item rescanned every outcome, so a write of n
outcomes cost n^2 and a 1,000,000-item batch ran at half the rate of a small one
(bench/README.md). Here that state is built on purpose (a big batch, ANALYZE while
all of it is queued, then a claim) and the plan of the write is read back with
auto_explain, which reports the plans of statements inside PL/pgSQL functions.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import anyio
import asyncpg
import pytest

from supervisor import batches, config
from supervisor import db as dbm

ITEMS = 50_000
CLAIM = 400


async def log_plans(conn: asyncpg.Connection) -> list[str]:
    """The plans of every statement ``conn`` runs from now on, nested ones
    (inside PL/pgSQL functions) included, as auto_explain logs them; skips the
    test where the server has no auto_explain."""
    try:
        await conn.execute("LOAD 'auto_explain'")
    except asyncpg.PostgresError as e:  # pragma: no cover - depends on the server build
        pytest.skip(f"auto_explain is not available in this PostgreSQL build: {e}")
    await conn.execute(
        "SET auto_explain.log_min_duration = 0; SET auto_explain.log_nested_statements = on;"
        "SET client_min_messages = log"
    )
    plans: list[str] = []
    conn.add_log_listener(lambda _c, msg: plans.append(str(msg.message)))
    return plans


async def scenario(db_url: str) -> tuple[str, int]:
    db = await dbm.Database.connect(config.from_mapping({}), db_url)
    conn = await asyncpg.connect(db_url)
    try:
        nb = batches.NewBatch(handler="h", items=[(None, json.dumps(n)) for n in range(ITEMS)])
        sub = await batches.submit(
            db, nb, tenant="t", actor="test", attempt_budget=3, callback_handler=None
        )
        batch_id = uuid.UUID(str(sub.batch["id"]))
        await conn.execute("ANALYZE supervisor.items")  # what autoanalyze sees: all queued
        lease = uuid.uuid4()
        claimed = await db.fetch("claim_items", "h", CLAIM, "w1", lease, None, None, 1.0)
        assert len(claimed) == CLAIM

        plans = await log_plans(conn)
        n = len(claimed)
        rows = await conn.fetch(
            db.sql("apply_outcomes"),
            lease,
            [batch_id],
            [r["id"] for r in claimed],
            [r["attempts"] for r in claimed],
            ["succeeded"] * n,
            [None] * n,
            [None] * n,
            [0.0] * n,
            "test",
        )
        assert rows == [], rows  # nothing fenced, the batch not finished
        succeeded = await conn.fetchval(
            "SELECT succeeded FROM supervisor.batches WHERE id = $1", batch_id
        )
        update = [p for p in plans if "Query Text: WITH u AS" in p]
        assert len(update) == 1, plans
        return update[0], succeeded
    finally:
        await conn.close()
        await db.close()


def test_outcome_write_never_nests_the_outcomes_inside_the_items(db_url: str) -> None:
    plan, succeeded = anyio.run(scenario, db_url)
    assert succeeded == CLAIM
    assert "Nested Loop" not in plan, plan
    assert "Function Scan on u" in plan, plan


SMALL_BATCHES = 2_000


async def insert_batches(conn: asyncpg.Connection, batches: int, size: int) -> None:
    """``batches`` queued batches of ``size`` items each, written directly (fast)."""
    await conn.execute(
        """
        WITH b AS (
            INSERT INTO supervisor.batches (id, tenant, handler, status, attempt_budget,
                                            total, queued)
            SELECT gen_random_uuid(), 't', 'h', 'queued', 3, $2, $2
              FROM generate_series(1, $1) RETURNING id)
        INSERT INTO supervisor.items (batch_id, seq, handler, payload, max_attempts)
        SELECT id, s, 'h', '1', 3 FROM b, generate_series(0, $2 - 1) s
        """,
        batches,
        size,
    )


async def claim_many_small(db_url: str) -> list[int]:
    db = await dbm.Database.connect(config.from_mapping({}), db_url)
    conn = await asyncpg.connect(db_url)
    try:
        await insert_batches(conn, SMALL_BATCHES, 1)
        await conn.execute("ANALYZE supervisor.batches")
        sizes: list[int] = []
        seen: set[uuid.UUID] = set()
        while len(seen) < SMALL_BATCHES and len(sizes) < 50:
            rows = await db.fetch("claim_items", "h", 500, "w1", uuid.uuid4(), None, None, 1.0)
            claimed = {r["batch_id"] for r in rows}
            assert not claimed & seen, "a 1-item batch claimed twice"
            seen |= claimed
            sizes.append(len(rows))
        return sizes
    finally:
        await conn.close()
        await db.close()


def test_a_claim_spans_many_small_batches_and_reaches_every_one(db_url: str) -> None:
    """With one item per batch a claim took items from at most 16 batches, so a
    backlog of small batches drained 16 items per claim round trip. Now a claim
    takes up to 256 batches, and successive claims reach every batch."""
    sizes = anyio.run(claim_many_small, db_url)
    assert sizes[0] == 256, sizes
    assert sum(sizes) == SMALL_BATCHES, sizes
    assert len(sizes) == -(-SMALL_BATCHES // 256), sizes  # no claim came back short early


async def claim_from_ten_item_batches(db_url: str) -> tuple[int, int]:
    db = await dbm.Database.connect(config.from_mapping({}), db_url)
    conn = await asyncpg.connect(db_url)
    try:
        await insert_batches(conn, 200, 10)
        rows = await db.fetch("claim_items", "h", 500, "w1", uuid.uuid4(), None, None, 1.0)
        return len(rows), len({r["batch_id"] for r in rows})
    finally:
        await conn.close()
        await db.close()


def test_a_claim_takes_as_many_batches_as_it_can_fill(db_url: str) -> None:
    """Each batch costs a claim writes of its own: 500 items from ten-item batches
    come from 50 of them, not two items each from 250."""
    assert anyio.run(claim_from_ten_item_batches, db_url) == (500, 50)


async def outcome_write_plans(db_url: str) -> list[str]:
    """Every plan an outcome write of ten one-item batches runs, among 5,000 batches."""
    db = await dbm.Database.connect(config.from_mapping({}), db_url)
    conn = await asyncpg.connect(db_url)
    try:
        await insert_batches(conn, 5_000, 1)
        await conn.execute("ANALYZE supervisor.batches")
        lease = uuid.uuid4()
        claimed = await db.fetch("claim_items", "h", 10, "w1", lease, None, None, 1.0)
        assert len(claimed) == 10
        plans = await log_plans(conn)
        n = len(claimed)
        rows = await conn.fetch(
            db.sql("apply_outcomes"),
            lease,
            sorted({r["batch_id"] for r in claimed}),
            [r["id"] for r in claimed],
            [r["attempts"] for r in claimed],
            ["succeeded"] * n,
            [None] * n,
            [None] * n,
            [0.0] * n,
            "test",
        )
        assert sorted(r["kind"] for r in rows) == ["batch"] * n  # each one-item batch finished
        return plans
    finally:
        await conn.close()
        await db.close()


def test_settling_a_few_batches_never_scans_every_batch(db_url: str) -> None:
    """apply_outcomes turns nested loops off for its own join, and a setting on a
    function holds for the functions it calls: _settle_batches then joined its few
    batches to `batches` by hashing the whole table, a scan of every batch row on
    every outcome write."""
    plans = anyio.run(outcome_write_plans, db_url)
    settle = [p for p in plans if "_settle_batches" in p or "UPDATE supervisor.batches" in p]
    assert settle, plans
    scans = [p for p in plans if "Seq Scan on batches" in p]
    assert not scans, scans


TRIAGE_ITEMS = 20_000


async def triage_plans(db_url: str) -> dict[str, str]:
    """The generic plan (the one a cached prepared statement ends up with) of each
    triage search over a batch of TRIAGE_ITEMS keyed items, 1 % of them failed."""
    db = await dbm.Database.connect(config.from_mapping({}), db_url)
    conn = await asyncpg.connect(db_url)
    try:
        await insert_batches(conn, 1, TRIAGE_ITEMS)
        batch_id = await conn.fetchval("SELECT id FROM supervisor.batches")
        await conn.execute(
            """
            UPDATE supervisor.items SET key = 'k:' || seq,
                   status = CASE WHEN seq % 100 = 0 THEN 'failed' ELSE 'succeeded' END,
                   errors = CASE WHEN seq % 100 = 0
                            THEN jsonb_build_array(jsonb_build_object(
                                 'type', 'E' || seq % 300, 'message', 'm'))
                            ELSE '[]' END
            """
        )
        await conn.execute("ANALYZE supervisor.items")
        await conn.execute("SET plan_cache_mode = force_generic_plan")
        plans = await log_plans(conn)
        searches: dict[str, tuple[Any, ...]] = {
            "list_items_by_key": (batch_id, "k:1999", "k:199:", None, None, 0, 101),
            "list_items_by_error_type": (batch_id, "E100", "failed", 0, 101),
            "batch_failures": (batch_id, 101),
        }
        out: dict[str, str] = {}
        for name, args in searches.items():
            before = len(plans)
            rows = await conn.fetch(db.sql(name), *args)
            assert rows, name
            out[name] = "\n".join(plans[before:])
        return out
    finally:
        await conn.close()
        await db.close()


def test_triage_searches_walk_their_indexes_not_the_batch(db_url: str) -> None:
    """A key prefix, an error type and the failures by type each read their
    partial index (items_key_prefix, items_error_type), even with the generic
    plan a prepared statement is given after a few runs: none reads the whole
    batch through items_by_batch."""
    plans = anyio.run(triage_plans, db_url)
    assert "items_key_prefix" in plans["list_items_by_key"], plans["list_items_by_key"]
    assert "items_error_type" in plans["list_items_by_error_type"], plans
    assert "items_error_type" in plans["batch_failures"], plans["batch_failures"]
    for name, plan in plans.items():
        assert "items_by_batch" not in plan and "Seq Scan on items" not in plan, (name, plan)
