"""Scenario: processing with many SSE streams open (API load must not starve work).

Each round runs the throughput batch three times on one daemon: a warm-up, once
with no stream open, once with STREAMS event streams open on another (idle) batch, all from
the open API's one principal; the daemon's stream caps are raised to allow
them. Before the API had its own database pool, 400 such streams made a 2,000-
item batch take 53 s instead of 3 s: they held the connections the claim loop
and the outbox need. Also checks that one stream past the cap gets 429."""

from __future__ import annotations

import asyncio
import contextlib

import aiohttp

from bench.context import Ctx
from bench.harness import Daemon, Results, batch_body, parse_ts, running_daemon

STREAMS = 256


async def _processing_rate(d: Daemon, session: aiohttp.ClientSession, n: int) -> float:
    batch, _, _ = await d.post_batch(session, batch_body("noop", n))
    done = await d.wait_terminal(session, batch["id"], 600)
    return n / (parse_ts(done["finished_at"]) - parse_ts(done["started_at"]))


async def _hold_stream(
    session: aiohttp.ClientSession, url: str, opened: asyncio.Queue[int]
) -> None:
    async with session.get(url, headers={"Accept": "text/event-stream"}) as r:
        await opened.put(r.status)
        if r.status == 200:
            async for _ in r.content:  # keep reading until cancelled
                pass


async def run(ctx: Ctx, results: Results) -> None:
    n = ctx.throughput_items
    server = {"max_streams": STREAMS, "max_streams_per_token": STREAMS}
    for _ in range(ctx.runs):
        dsn = await ctx.server.new_database("sse")
        try:
            async with running_daemon(ctx.work_dir, dsn, "sse", server=server) as (d, session):
                await _processing_rate(d, session, n)  # warm-up: a fresh daemon and database
                base = await _processing_rate(d, session, n)
                idle, _, _ = await d.post_batch(session, batch_body("hold", 1))
                url = f"{d.url}/v1/batches/{idle['id']}/events"
                opened: asyncio.Queue[int] = asyncio.Queue()
                conn = aiohttp.TCPConnector(limit=STREAMS + 8)
                async with aiohttp.ClientSession(connector=conn) as streams_session:
                    tasks = [
                        asyncio.create_task(_hold_stream(streams_session, url, opened))
                        for _ in range(STREAMS + 1)
                    ]
                    try:
                        statuses = [await opened.get() for _ in range(STREAMS + 1)]
                        loaded = await _processing_rate(d, session, n)
                    finally:
                        for t in tasks:
                            t.cancel()
                        for t in tasks:
                            with contextlib.suppress(asyncio.CancelledError, aiohttp.ClientError):
                                await t
                results.add("streams.base", "streams: processing, no stream open", "items/s", base)
                results.add(
                    "streams.loaded",
                    f"streams: processing with {STREAMS} SSE streams open",
                    "items/s",
                    loaded,
                )
                results.add(
                    "streams.refused",
                    f"streams: of {STREAMS + 1} opened, answered 429",
                    "count",
                    float(statuses.count(429)),
                    higher=False,
                )
        finally:
            await ctx.server.drop_database(dsn)
