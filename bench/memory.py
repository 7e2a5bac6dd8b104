"""Scenario 5: the daemon's peak RSS (VmHWM) with many items queued and 64 running.

Items are submitted in batches of 100,000 (the default ``max_items_per_batch``):
1,000,000 with ``--large``, else 100,000. The handler (``bench.handlers:hold``)
keeps every claimed item running, so 64 run and the rest stay queued. VmHWM
includes the peak of parsing the submissions; VmRSS is the steady state after."""

from __future__ import annotations

import asyncio
import time

from bench.context import Ctx
from bench.harness import Results, batch_body, proc_status_kb, running_daemon


async def run(ctx: Ctx, results: Results) -> None:
    total = 1_000_000 if ctx.large else 100_000
    per = 100_000
    body = batch_body("hold", per, payload={"n": 1})
    label = f"{total:,} queued"
    for _ in range(ctx.runs):
        dsn = await ctx.server.new_database("mem")
        try:
            async with running_daemon(ctx.work_dir, dsn, "mem", worker={"drain_timeout": "1s"}) as (
                d,
                session,
            ):
                ids = []
                for _ in range(total // per):
                    b, _, _ = await d.post_batch(session, body)
                    ids.append(b["id"])
                deadline = time.monotonic() + 60
                while True:
                    running = 0
                    for bid in ids:
                        running += (await d.get_batch(session, bid))["counts"]["running"]
                    if running >= 64 or time.monotonic() > deadline:
                        break
                    await asyncio.sleep(0.2)
                await asyncio.sleep(3.0)  # a few heartbeats and claim polls at steady state
                results.add(
                    "memory.hwm",
                    f"memory: daemon VmHWM ({label}, 64 running)",
                    "MB",
                    proc_status_kb(d.pid, "VmHWM") / 1024,
                    higher=False,
                )
                results.add(
                    "memory.rss",
                    "memory: daemon VmRSS at steady state",
                    "MB",
                    proc_status_kb(d.pid, "VmRSS") / 1024,
                    higher=False,
                )
        finally:
            await ctx.server.drop_database(dsn)
