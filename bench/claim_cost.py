"""Scenario ``claim_cost``: what one ``claim_items`` call costs as the number of
active (queued) small batches grows, and where its time goes.

A daemon with ``concurrency = 1`` and ``prefetch = 0`` runs one item of
``bench.handlers:hold`` forever, so every other submitted item stays queued. 10-item
batches are POSTed (16 clients) up to each level (10, 100, 1,000, 3,000, 10,000;
scaled by ``--scale``); at each level, on a connection of our own, ``claim_items``
('hold', 500 items: the daemon's ``claim_batch_size``) runs 20 times, each in a
transaction that is rolled back (after a VACUUM: every call claims the same
16 batches), and the median is reported; then again with
``plan_cache_mode = force_custom_plan`` set on the function (planning every
statement of every call, as before migration 0011), an experiment reset after. The
reference: the same call with one queued 5,000-item batch. The last call at
each level runs under auto_explain (``log_analyze``, ``log_buffers``,
``log_nested_statements``): its statements' times are printed, their plans
written to ``claim-plans-<level>.txt`` (in ``--profile DIR``, else printed only).
"""

from __future__ import annotations

import asyncio
import json
import re
import statistics
import time
from typing import Any

import asyncpg

from bench.context import Ctx
from bench.harness import BENCH_HANDLERS, Results, batch_body, running_daemon
from bench.small import submit_from_clients

LEVELS = (10, 100, 1_000, 3_000, 10_000)
CALLS = 20
CLAIM_SQL = (
    "SELECT count(*) FROM supervisor.claim_items('hold', 500, 'bench-probe', "
    "gen_random_uuid(), NULL, NULL, NULL)"
)
EXPLAIN_SETTINGS = (
    "LOAD 'auto_explain'",
    "SET auto_explain.log_min_duration = 0",
    "SET auto_explain.log_analyze = on",
    "SET auto_explain.log_buffers = on",
    "SET auto_explain.log_timing = on",
    "SET auto_explain.log_nested_statements = on",
    "SET client_min_messages = log",
)
CLAIM_ARGS = "text, integer, text, uuid, integer, double precision, double precision"
DURATION = re.compile(r"duration: ([0-9.]+) ms")


async def _vacuum(conn: asyncpg.Connection) -> None:
    """Remove what the previous probe's rolled-back claim left (dead item versions
    and index entries of the same 16 batches, which every probe claims again)."""
    await conn.execute("VACUUM supervisor.items")
    await conn.execute("VACUUM supervisor.batches")


async def _timed_claims(conn: asyncpg.Connection, custom: bool = False) -> tuple[float, int]:
    """Median seconds of CALLS claims, each rolled back. ``custom``: with the
    function's ``plan_cache_mode = force_custom_plan`` set for the experiment,
    and put back after (the daemon is not claiming: its one worker is busy)."""
    times: list[float] = []
    got = 0
    if custom:
        await conn.execute(
            f"ALTER FUNCTION supervisor.claim_items({CLAIM_ARGS}) "
            "SET plan_cache_mode = force_custom_plan"
        )
    try:
        for _ in range(CALLS):
            await _vacuum(conn)
            tx = conn.transaction()
            await tx.start()
            t0 = time.perf_counter()
            got = await conn.fetchval(CLAIM_SQL)
            times.append(time.perf_counter() - t0)
            await tx.rollback()
    finally:
        if custom:
            await conn.execute(f"ALTER FUNCTION supervisor.claim_items({CLAIM_ARGS}) RESET ALL")
    return statistics.median(times), got


async def _explained_claim(conn: asyncpg.Connection) -> list[str]:
    plans: list[str] = []

    def listener(_: Any, msg: Any) -> None:
        plans.append(str(msg.message))

    conn.add_log_listener(listener)
    try:
        await _vacuum(conn)
        for s in EXPLAIN_SETTINGS:
            await conn.execute(s)
        tx = conn.transaction()
        await tx.start()
        await conn.fetchval(CLAIM_SQL)
        await tx.rollback()
    finally:
        await conn.execute("SET auto_explain.log_min_duration = -1")
        await conn.execute("RESET client_min_messages")
        conn.remove_log_listener(listener)
    return plans


def _summary(plans: list[str]) -> list[str]:
    """One line per explained statement, slowest first, with its count of calls:
    the statement text's first line and its total ms."""
    totals: dict[str, list[float]] = {}
    for p in plans:
        m = DURATION.search(p)
        if m is None:
            continue
        text = p.split("Query Text:", 1)[1] if "Query Text:" in p else p
        head = " ".join(text.split())[:110]
        totals.setdefault(head, []).append(float(m.group(1)))
    rows = sorted(totals.items(), key=lambda kv: -sum(kv[1]))
    return [f"{sum(v):8.2f} ms  x{len(v):<3} {k}" for k, v in rows]


WORKER = {"concurrency": 1, "prefetch": 0, "drain_timeout": "1s"}
ONE_BATCH = 5_000


async def _one_batch(ctx: Ctx, results: Results) -> None:
    """The reference: the same claim with one queued batch of ONE_BATCH items."""
    body = json.dumps({"handler": "hold", "items": [{}] * ONE_BATCH}).encode()
    dsn = await ctx.server.new_database("claim1")
    try:
        async with running_daemon(ctx.work_dir, dsn, "claim1", worker=WORKER) as (d, session):
            await d.post_batch(session, body)
            conn = await asyncpg.connect(dsn)
            try:
                await conn.execute("ANALYZE supervisor.batches")
                await conn.execute("ANALYZE supervisor.items")
                med, got = await _timed_claims(conn)
            finally:
                await conn.close()
    finally:
        await ctx.server.drop_database(dsn)
    results.add(
        "claim_cost.one",
        f"claim_cost: claim_items, one {ONE_BATCH:,}-item batch",
        "ms",
        1000 * med,
        higher=False,
    )
    results.add(
        "claim_cost.one.per_item",
        f"claim_cost: per item claimed, one batch ({got} per call)",
        "us",
        1e6 * med / max(1, got),
        higher=False,
    )


async def run(ctx: Ctx, results: Results) -> None:
    levels = sorted({ctx.scaled(n, 10) for n in LEVELS})
    body = json.dumps({"handler": "hold", "items": [{}] * 10}).encode()
    for _ in range(ctx.runs):
        await _one_batch(ctx, results)
        dsn = await ctx.server.new_database("claim")
        try:
            async with running_daemon(ctx.work_dir, dsn, "claim", worker=WORKER) as (d, _):
                conn = await asyncpg.connect(dsn)
                try:
                    have = 0
                    for level in levels:
                        await submit_from_clients(d, body, level - have, ctx.clients)
                        have = level
                        await conn.execute("VACUUM ANALYZE supervisor.batches")
                        await conn.execute("VACUUM ANALYZE supervisor.items")
                        med, got = await _timed_claims(conn)
                        results.add(
                            f"claim_cost.{level}",
                            f"claim_cost: claim_items, {level:,} active 10-item batches",
                            "ms",
                            1000 * med,
                            higher=False,
                        )
                        results.add(
                            f"claim_cost.{level}.per_item",
                            f"claim_cost: per item claimed, {level:,} batches ({got} per call)",
                            "us",
                            1e6 * med / max(1, got),
                            higher=False,
                        )
                        custom, _ = await _timed_claims(conn, custom=True)
                        results.add(
                            f"claim_cost.{level}.custom",
                            "claim_cost: the same, plan_cache_mode = force_custom_plan "
                            f"(experiment), {level:,} batches",
                            "ms",
                            1000 * custom,
                            higher=False,
                        )
                        plans = await _explained_claim(conn)
                        print(f"    auto_explain, {level:,} active batches (total ms, calls):")
                        for line in _summary(plans)[:8]:
                            print(f"      {line}")
                        if ctx.profile_dir is not None:
                            out = ctx.profile_dir / f"claim-plans-{level}.txt"
                            out.write_text("\n\n".join(plans) + "\n")
                finally:
                    await conn.close()
        finally:
            await ctx.server.drop_database(dsn)


# --------------------------------------------------------------- keyed limits
# Scenario ``claim_cost_keys``: claim_keyed_items beside claim_items, in one run on
# one database. A 'hold' item occupies the daemon's one worker; then three
# batches stay queued: KEYED_ITEMS 'hold' items (no key limit: claim_items),
# KEYED_ITEMS 'hold_keyed' items with as many distinct keys (key_limit
# concurrency 1), and KEYED_ITEMS 'hold_deep' items over 10 keys (concurrency
# 1000). Each claim (500 items) is timed as in claim_cost: CALLS calls, each
# rolled back after a VACUUM, median; the calls of the three alternate. Last,
# claim_items in savepoints of one transaction, with and without the two indexes
# of keyed limits (dropped inside the transaction, which is rolled back), three
# times alternated: what those indexes cost claims of handlers without key limits.
KEYED_ITEMS = 10_000
KEYED_HANDLERS = BENCH_HANDLERS | {
    "hold_keyed": {**BENCH_HANDLERS["hold"], "key_limit": {"key": "/d", "concurrency": 1}},
    "hold_deep": {**BENCH_HANDLERS["hold"], "key_limit": {"key": "/d", "concurrency": 1000}},
}
KEYED_SQL = (
    "SELECT count(*) FROM supervisor.claim_keyed_items($1, 500, 'bench-probe', "
    "gen_random_uuid(), NULL, NULL, 1, $2, NULL, 1)"
)


async def _timed(conn: asyncpg.Connection, sql: str, *args: Any) -> tuple[float, int]:
    await _vacuum(conn)
    tx = conn.transaction()
    await tx.start()
    t0 = time.perf_counter()
    got = int(await conn.fetchval(sql, *args))
    elapsed = time.perf_counter() - t0
    await tx.rollback()
    return elapsed, got


async def run_keys(ctx: Ctx, results: Results) -> None:
    n = ctx.scaled(KEYED_ITEMS, 100)
    for _ in range(ctx.runs):
        dsn = await ctx.server.new_database("claimkeys")
        try:
            async with running_daemon(
                ctx.work_dir, dsn, "claimkeys", worker=WORKER, handlers=KEYED_HANDLERS
            ) as (d, session):
                await d.post_batch(session, batch_body("hold", 1))
                conn = await asyncpg.connect(dsn)
                try:
                    for _ in range(600):  # the worker takes the 'hold' item (30 s at most)
                        if await conn.fetchval(
                            "SELECT count(*) FROM supervisor.items WHERE status = 'running'"
                        ):
                            break
                        await asyncio.sleep(0.05)
                    await d.post_batch(session, batch_body("hold", n, {}))
                    keyed = [{"d": f"site{i}.example"} for i in range(n)]
                    deep = [{"d": f"deep{i % 10}.example"} for i in range(n)]
                    for handler, payloads in (("hold_keyed", keyed), ("hold_deep", deep)):
                        body = json.dumps({"handler": handler, "items": payloads}).encode()
                        await d.post_batch(session, body)
                    await conn.execute("VACUUM ANALYZE supervisor.batches")
                    await conn.execute("VACUUM ANALYZE supervisor.items")
                    times: dict[str, list[float]] = {"plain": [], "keyed": [], "deep": []}
                    got: dict[str, int] = {}
                    for _ in range(CALLS):
                        for name, sql, args in (
                            ("plain", CLAIM_SQL, ()),
                            ("keyed", KEYED_SQL, ("hold_keyed", 1)),
                            ("deep", KEYED_SQL, ("hold_deep", 1000)),
                        ):
                            t, got[name] = await _timed(conn, sql, *args)
                            times[name].append(t)
                    with_ix: list[float] = []
                    without_ix: list[float] = []
                    for _ in range(3):  # alternated: the machine's noise hits both
                        await _vacuum(conn)
                        with_ix.append(await _savepoint_claims(conn, drop=False))
                        await _vacuum(conn)
                        without_ix.append(await _savepoint_claims(conn, drop=True))
                finally:
                    await conn.close()
        finally:
            await ctx.server.drop_database(dsn)
        labels = {
            "plain": f"claim_items, one {n:,}-item batch (no key limit)",
            "keyed": f"claim_keyed_items, {n:,} items of {n:,} distinct keys",
            "deep": f"claim_keyed_items, {n:,} items of 10 keys",
        }
        for name, label in labels.items():
            med = statistics.median(times[name])
            results.add(
                f"claim_cost_keys.{name}", f"claim_cost_keys: {label}", "ms", 1000 * med, False
            )
            results.add(
                f"claim_cost_keys.{name}.per_item",
                f"claim_cost_keys: per item claimed, {name} ({got[name]} per call)",
                "us",
                1e6 * med / max(1, got[name]),
                False,
            )
        results.add(
            "claim_cost_keys.plain_savepoints",
            "claim_cost_keys: claim_items, in savepoints, with the indexes of keyed limits",
            "ms",
            1000 * statistics.median(with_ix),
            False,
        )
        results.add(
            "claim_cost_keys.plain_without_key_indexes",
            "claim_cost_keys: claim_items, in savepoints, those indexes dropped",
            "ms",
            1000 * statistics.median(without_ix),
            False,
        )


async def _savepoint_claims(conn: asyncpg.Connection, *, drop: bool) -> float:
    """Median claim_items time, each claim in a savepoint of one transaction that
    is rolled back after (no VACUUM between, so both variants are measured alike);
    ``drop``: with items_key_runnable and items_key_running dropped first."""
    times: list[float] = []
    tx = conn.transaction()
    await tx.start()
    try:
        if drop:
            await conn.execute(
                "DROP INDEX supervisor.items_key_runnable, supervisor.items_key_running"
            )
        await _vacuum_free_warmup(conn)
        for _ in range(CALLS):
            sp = conn.transaction()
            await sp.start()
            t0 = time.perf_counter()
            await conn.fetchval(CLAIM_SQL)
            times.append(time.perf_counter() - t0)
            await sp.rollback()
    finally:
        await tx.rollback()
    return statistics.median(times)


async def _vacuum_free_warmup(conn: asyncpg.Connection) -> None:
    """One claim, rolled back, so that both variants start with plans cached."""
    sp = conn.transaction()
    await sp.start()
    await conn.fetchval(CLAIM_SQL)
    await sp.rollback()
