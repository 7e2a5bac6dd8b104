"""Many small batches, the shape most users bring: ``small`` (2,000 batches of 10
no-op items) and ``small1`` (5,000 batches of one item), each POSTed by 16
concurrent HTTP clients (one keep-alive connection each) to a daemon with
``concurrency = 64``.

End to end = the first POST's send time to the last batch's ``finished_at``
(read from the database, so that no client polls the API while it works);
batches/s accepted = batches / (first send -> last 201). In the same run the
daemon takes the same number of items as one batch (``throughput``'s
measurement), the rate the small batches are a fraction of.

Peers: the same jobs enqueued in groups of the batch size (one job per call for
``small1``) from 16 connections, then drained at 64-way concurrency (PgQueuer,
Procrastinate: ``--peers``). The daemon works while the batches arrive; the peers
drain after the enqueue: end to end is first enqueue -> drained for both.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import time
from typing import Any

import aiohttp
import asyncpg

from bench import throughput
from bench.context import Ctx
from bench.harness import Daemon, Results, cpu_seconds, py_spy, running_daemon
from bench.peers import run_peer

TERMINAL = ("completed", "completed_with_errors", "failed", "cancelled")
PEER_LABELS = {"pgqueuer": "PgQueuer 1.6.0", "procrastinate": "Procrastinate 3.10.0"}

PROGRESS_SQL = """
SELECT count(*) FILTER (WHERE status = ANY ($1::text[])) AS done,
       count(*) FILTER (WHERE status <> 'completed' AND status = ANY ($1::text[])) AS bad,
       max(finished_at) AS last, min(started_at) AS first
  FROM supervisor.batches
"""


async def submit_from_clients(
    d: Daemon, body: bytes, batches: int, clients: int
) -> tuple[float, float, list[float]]:
    """POST ``batches`` copies of ``body`` from ``clients`` concurrent clients, each
    with its own session and one connection. Returns (wall time of the first send,
    of the last 201, every POST's seconds to 201)."""
    counter = itertools.count()
    first: list[float] = []
    post_s: list[float] = []
    timeout = aiohttp.ClientTimeout(total=120)
    headers = {"Content-Type": "application/json"}

    async def client() -> None:
        conn = aiohttp.TCPConnector(limit=1)
        async with aiohttp.ClientSession(connector=conn, timeout=timeout) as s:
            while next(counter) < batches:
                if not first:
                    first.append(time.time())
                t0 = time.perf_counter()
                async with s.post(d.url + "/v1/batches", data=body, headers=headers) as r:
                    await r.read()
                    if r.status != 201:
                        raise RuntimeError(f"POST /v1/batches -> {r.status}")
                post_s.append(time.perf_counter() - t0)

    await asyncio.gather(*(client() for _ in range(clients)))
    return first[0], time.time(), post_s


async def wait_all_terminal(dsn: str, batches: int, limit_s: float) -> tuple[float, float]:
    """Poll the database (every 20 ms) until ``batches`` batches are terminal;
    returns (first ``started_at``, last ``finished_at``) as epoch seconds."""
    conn = await asyncpg.connect(dsn)
    try:
        deadline = time.monotonic() + limit_s
        while True:
            r = await conn.fetchrow(PROGRESS_SQL, list(TERMINAL))
            assert r is not None  # an aggregate always returns a row
            if r["done"] >= batches:
                if r["bad"]:
                    raise RuntimeError(f"{r['bad']} batches ended other than completed")
                return r["first"].timestamp(), r["last"].timestamp()
            if time.monotonic() > deadline:
                raise RuntimeError(f"{r['done']} of {batches} batches terminal after {limit_s}s")
            await asyncio.sleep(0.02)
    finally:
        await conn.close()


async def ours(
    ctx: Ctx,
    results: Results,
    key: str,
    batches: int,
    size: int,
    database: dict[str, Any] | None = None,
    profile: str | None = None,
) -> None:
    n = batches * size
    body = json.dumps({"handler": "noop", "items": list(range(size))}).encode()
    dsn = await ctx.server.new_database(key)
    try:
        async with running_daemon(ctx.work_dir, dsn, key, database=database) as (d, _):
            async with py_spy(d.pid, profile):
                wal0 = await ctx.server.wal_bytes()
                cpu0, pg0 = cpu_seconds(d.pid), ctx.server.postgres_cpu_s()
                me0 = sum(os.times()[:2])
                first, accepted, post_s = await submit_from_clients(d, body, batches, ctx.clients)
                me1 = sum(os.times()[:2])
                _, last = await wait_all_terminal(dsn, batches, limit_s=1800)
                cpu1, pg1 = cpu_seconds(d.pid), ctx.server.postgres_cpu_s()
                wal1 = await ctx.server.wal_bytes()
    finally:
        await ctx.server.drop_database(dsn)
    shape = f"{batches:,} x {size} items, {ctx.clients} clients"
    results.add(f"{key}.e2e", f"{key}: end to end ({shape})", "items/s", n / (last - first))
    results.add(
        f"{key}.accepted", f"{key}: batches accepted", "batches/s", batches / (accepted - first)
    )
    post_s.sort()
    results.add(
        f"{key}.post_p99",
        f"{key}: POST -> 201 p99",
        "ms",
        1000 * post_s[min(len(post_s) - 1, int(0.99 * len(post_s)))],
        higher=False,
    )
    results.cpu_per_1k(key, "daemon", "daemon", cpu1 - cpu0, n)
    results.cpu_per_1k(key, "pg", "PostgreSQL", pg1 - pg0, n)
    results.cpu_per_1k(key, "client", "HTTP clients'", me1 - me0, n, note=" (same machine)")
    results.wal_per_1k(key, wal1 - wal0, n)


async def peers(ctx: Ctx, results: Results, key: str, batches: int, size: int) -> None:
    n = batches * size
    for peer in ctx.peers:
        if peer not in PEER_LABELS:
            raise ValueError(f"unknown peer {peer!r}; known: {', '.join(PEER_LABELS)}")
        dsn = await ctx.server.new_database(f"{key}_{peer}")
        try:
            r = await run_peer(dsn, [f"{peer}_groups", str(size), str(ctx.clients)], n)
        finally:
            await ctx.server.drop_database(dsn)
        label = PEER_LABELS[peer]
        per = "job" if size == 1 else f"{size} jobs"
        results.add(
            f"{key}.{peer}.e2e",
            f"{key}: {label} end to end ({batches:,} calls of {per})",
            "items/s",
            n / r["total_s"],
        )
        results.add(
            f"{key}.{peer}.accepted",
            f"{key}: {label} enqueue calls",
            "calls/s",
            batches / r["enqueue_s"],
        )
        results.add(
            f"{key}.{peer}.proc",
            f"{key}: {label} drain after the enqueue",
            "items/s",
            n / r["process_s"],
        )


async def scenario(ctx: Ctx, results: Results, key: str, batches: int, size: int) -> None:
    for i in range(ctx.runs):
        prof = None
        if ctx.profile_dir is not None and i == 0:
            prof = str(ctx.profile_dir / f"{key}-{int(time.time())}.txt")
        await ours(ctx, results, key, batches, size, profile=prof)
        # The daemon's own rate for the same items in one batch, in this round.
        await throughput.one_run(ctx, results, batches * size, f"{key}_single")
        await peers(ctx, results, key, batches, size)


async def run(ctx: Ctx, results: Results) -> None:
    await scenario(ctx, results, "small", ctx.scaled(2_000, 16), 10)


async def run_small1(ctx: Ctx, results: Results) -> None:
    await scenario(ctx, results, "small1", ctx.scaled(5_000, 16), 1)
