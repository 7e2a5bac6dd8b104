"""Scenario 4: GET /v1/batches/{id} latency while a throughput batch is processed.

One client polls back to back (a short pause between requests) for as long as the
batch runs; the daemon is as in scenario 1."""

from __future__ import annotations

import asyncio
import time

from bench.context import Ctx
from bench.harness import Results, batch_body, percentile, running_daemon


async def run(ctx: Ctx, results: Results) -> None:
    n = ctx.throughput_items
    body = batch_body("noop", n)
    for _ in range(ctx.runs):
        dsn = await ctx.server.new_database("st")
        try:
            async with running_daemon(ctx.work_dir, dsn, "st") as (d, session):
                batch, _, _ = await d.post_batch(session, body)
                lat: list[float] = []
                while True:
                    t0 = time.perf_counter()
                    b = await d.get_batch(session, batch["id"])
                    lat.append(time.perf_counter() - t0)
                    if b["status"] == "completed":
                        break
                    await asyncio.sleep(0.01)
                results.add(
                    "status.p50",
                    "status under load: GET p50",
                    "ms",
                    1000 * percentile(lat, 50),
                    higher=False,
                )
                results.add(
                    "status.p99",
                    "status under load: GET p99",
                    "ms",
                    1000 * percentile(lat, 99),
                    higher=False,
                )
                results.add("status.n", "status under load: GETs sampled", "count", float(len(lat)))
        finally:
            await ctx.server.drop_database(dsn)
