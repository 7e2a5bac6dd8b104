"""Scenario 1: no-op items through the real daemon, end to end and processing only.

End to end = client's send time of the POST to the batch's ``finished_at``;
processing = the batch's ``started_at`` (first claim) to ``finished_at``. Both
clocks are this machine's. The daemon's and PostgreSQL's CPU seconds over the run
are recorded too: they say which side is the bottleneck.
"""

from __future__ import annotations

import asyncio
import collections
import pathlib
import time

import asyncpg

from bench.context import Ctx
from bench.harness import (
    Results,
    batch_body,
    cpu_seconds,
    parse_ts,
    py_spy,
    running_daemon,
)

SAMPLE_SQL = """
SELECT state, coalesce(wait_event_type, '') || ':' || coalesce(wait_event, '') AS wait,
       left(regexp_replace(query, '\\s+', ' ', 'g'), 60) AS query
  FROM pg_stat_activity
 WHERE datname = current_database() AND pid <> pg_backend_pid() AND backend_type = 'client backend'
"""


async def sample_pg(dsn: str, out: str, stop: asyncio.Event) -> None:
    """Sample pg_stat_activity every 5 ms: what the daemon's connections wait on."""
    conn = await asyncpg.connect(dsn)
    seen: collections.Counter[tuple[str, str, str]] = collections.Counter()
    n = 0
    try:
        while not stop.is_set():
            n += 1
            for r in await conn.fetch(SAMPLE_SQL):
                q = r["query"] if r["state"] != "idle" else ""
                seen[(r["state"] or "", r["wait"], q)] += 1
            await asyncio.sleep(0.005)
    finally:
        await conn.close()
    lines = [f"{n} samples of pg_stat_activity (connections x samples below)"]
    lines += [f"{c:6d} {c / n:6.2f}  {s:<20} {w:<28} {q}" for (s, w, q), c in seen.most_common()]
    pathlib.Path(out).write_text("\n".join(lines) + "\n")  # noqa: ASYNC240 - once, at the end


async def one_run(ctx: Ctx, results: Results, n: int, key: str, profile: str | None = None) -> None:
    dsn = await ctx.server.new_database("tp")
    big = {"max_items_per_batch": max(n, 100_000), "max_body_bytes": 256 * 1024 * 1024}
    try:
        async with running_daemon(ctx.work_dir, dsn, "tp", server=big) as (d, session):
            body = batch_body("noop", n)
            stop = asyncio.Event()
            sampler = None
            if profile:
                sampler = asyncio.create_task(
                    sample_pg(dsn, profile.replace(".txt", "-pg.txt"), stop)
                )
            async with py_spy(d.pid, profile):
                wal0 = await ctx.server.wal_bytes()
                cpu0, pg0 = cpu_seconds(d.pid), ctx.server.postgres_cpu_s()
                batch, sent, post_s = await d.post_batch(session, body)
                b = await d.wait_terminal(session, batch["id"], limit_s=3600, interval=0.1)
                cpu1, pg1 = cpu_seconds(d.pid), ctx.server.postgres_cpu_s()
                wal1 = await ctx.server.wal_bytes()
                stop.set()
                if sampler is not None:
                    await sampler
            assert b["status"] == "completed", b
            fin = parse_ts(b["finished_at"])
            e2e = fin - sent
            proc = fin - parse_ts(b["started_at"])
            results.add(f"{key}.e2e", f"{key}: end to end ({n:,} items)", "items/s", n / e2e)
            results.add(f"{key}.proc", f"{key}: processing only", "items/s", n / proc)
            results.add(f"{key}.post", f"{key}: POST accepted", "s", post_s, higher=False)
            results.cpu_per_1k(key, "daemon", "daemon", cpu1 - cpu0, n)
            results.cpu_per_1k(key, "pg", "PostgreSQL", pg1 - pg0, n)
            results.wal_per_1k(key, wal1 - wal0, n)
    finally:
        await ctx.server.drop_database(dsn)


async def run(ctx: Ctx, results: Results) -> None:
    for i in range(ctx.runs):
        prof = None
        if ctx.profile_dir is not None and i == 0:
            prof = str(ctx.profile_dir / f"throughput-{int(time.time())}.txt")
        await one_run(ctx, results, ctx.throughput_items, "throughput", prof)
    if ctx.large:
        for _ in range(ctx.runs):
            await one_run(ctx, results, 1_000_000, "throughput_1m")
