"""Scenario 2: time to accept a 100,000-item batch (POST sent to 201 received).

The daemon runs with ``[worker] concurrency = 1`` so that claiming barely
competes with the insert; the number is the POST alone.
"""

from __future__ import annotations

from bench.context import Ctx
from bench.harness import Results, batch_body, running_daemon


async def run(ctx: Ctx, results: Results) -> None:
    n = 20_000 if ctx.quick else 100_000
    body = batch_body("hold", n, payload={"n": 1})
    for _ in range(ctx.runs):
        dsn = await ctx.server.new_database("sub")
        try:
            async with running_daemon(ctx.work_dir, dsn, "sub", worker={"concurrency": 1}) as (
                d,
                session,
            ):
                _, _, post_s = await d.post_batch(session, body)
                results.add(
                    "submission.post",
                    f"submission: POST {n:,} items -> 201",
                    "s",
                    post_s,
                    higher=False,
                )
                results.add("submission.rate", "submission: accepted", "items/s", n / post_s)
        finally:
            await ctx.server.drop_database(dsn)
