"""Scenario 3: idle pick-up latency, from the client's send time of a single-item
POST to the handler's own start time (``bench.handlers:stamp`` returns
``time.time()``). Each sample waits for the previous batch to finish."""

from __future__ import annotations

import asyncio

from bench.context import Ctx
from bench.harness import Results, batch_body, percentile, running_daemon


async def run(ctx: Ctx, results: Results) -> None:
    samples = 30 if ctx.quick else 200
    body = batch_body("stamp", 1, payload={})
    for _ in range(ctx.runs):
        dsn = await ctx.server.new_database("lat")
        try:
            async with running_daemon(ctx.work_dir, dsn, "lat") as (d, session):
                lat: list[float] = []
                for _ in range(samples):
                    await asyncio.sleep(0.05)  # idle: nothing in flight, claim loop waiting
                    batch, sent, _ = await d.post_batch(session, body)
                    await d.wait_terminal(session, batch["id"], limit_s=30, interval=0.01)
                    async with session.get(f"{d.url}/v1/batches/{batch['id']}/items") as r:
                        item = (await r.json())["items"][0]
                    lat.append(item["result"]["t"] - sent)
                results.add(
                    "latency.p50",
                    "latency: submit -> handler start p50",
                    "ms",
                    1000 * percentile(lat, 50),
                    higher=False,
                )
                results.add(
                    "latency.p99",
                    "latency: submit -> handler start p99",
                    "ms",
                    1000 * percentile(lat, 99),
                    higher=False,
                )
        finally:
            await ctx.server.drop_database(dsn)
