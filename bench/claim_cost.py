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

import json
import re
import statistics
import time
from typing import Any

import asyncpg

from bench.context import Ctx
from bench.harness import Results, running_daemon
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
