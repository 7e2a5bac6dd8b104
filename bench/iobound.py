"""Scenario ``io``: I/O-bound items (``bench.handlers:sleep``, an async sleep) at
high concurrency, against the ideal of waves of ``concurrency`` items each taking
exactly the sleep: ideal = ceil(items / concurrency) x sleep.

- 20,000 items x 200 ms at ``[worker] concurrency = 1000`` (ideal 4 s);
- 20,000 items x 1 s at ``concurrency = 5000`` (ideal 4 s), with the daemon's
  peak RSS (VmHWM) over its whole life, submission included.

One batch each, one daemon each. % of ideal = ideal / actual, end to end (POST
sent -> ``finished_at``) and processing only (``started_at`` -> ``finished_at``).
Peer: PgQueuer 1.6.0 with an async entrypoint sleeping as long, the same jobs
enqueued in one call and drained with ``max_concurrent_tasks`` = the same
concurrency (``batch_size`` 500, our ``claim_batch_size``); its peak RSS is the
whole process's (enqueue included).
"""

from __future__ import annotations

import json
import math

from bench.context import Ctx
from bench.harness import (
    BENCH_HANDLERS,
    SLEEP_HANDLER,
    Results,
    cpu_seconds,
    parse_ts,
    proc_status_kb,
    running_daemon,
)
from bench.peers import run_peer

# (key, items before scaling, seconds each, concurrency)
SHAPES: list[tuple[str, int, float, int]] = [
    ("io_200ms", 20_000, 0.2, 1_000),
    ("io_1s", 20_000, 1.0, 5_000),
]


async def ours(ctx: Ctx, results: Results, key: str, n: int, sleep_s: float, conc: int) -> None:
    ideal = math.ceil(n / conc) * sleep_s
    body = json.dumps({"handler": "sleep", "items": [{"s": sleep_s}] * n}).encode()
    dsn = await ctx.server.new_database(key)
    handlers = BENCH_HANDLERS | SLEEP_HANDLER
    try:
        async with running_daemon(
            ctx.work_dir, dsn, key, worker={"concurrency": conc}, handlers=handlers
        ) as (d, session):
            cpu0 = cpu_seconds(d.pid)
            batch, sent, _ = await d.post_batch(session, body)
            b = await d.wait_terminal(session, batch["id"], limit_s=600, interval=0.05)
            cpu1 = cpu_seconds(d.pid)
            hwm = proc_status_kb(d.pid, "VmHWM") / 1024
    finally:
        await ctx.server.drop_database(dsn)
    assert b["status"] == "completed", b
    fin = parse_ts(b["finished_at"])
    e2e, proc = fin - sent, fin - parse_ts(b["started_at"])
    shape = f"{n:,} x {sleep_s * 1000:g} ms, concurrency {conc:,}"
    results.add(f"{key}.e2e", f"{key}: end to end ({shape})", "s", e2e, higher=False)
    results.add(
        f"{key}.ideal_e2e", f"{key}: % of ideal ({ideal:g} s), end to end", "%", 100 * ideal / e2e
    )
    results.add(f"{key}.ideal_proc", f"{key}: % of ideal, processing only", "%", 100 * ideal / proc)
    results.add(f"{key}.items", f"{key}: items/s end to end", "items/s", n / e2e)
    results.add(f"{key}.hwm", f"{key}: daemon VmHWM", "MB", hwm, higher=False)
    results.cpu_per_1k(key, "daemon", "daemon", cpu1 - cpu0, n)


async def pgqueuer(ctx: Ctx, results: Results, key: str, n: int, sleep_s: float, conc: int) -> None:
    ideal = math.ceil(n / conc) * sleep_s
    dsn = await ctx.server.new_database(f"{key}_pgq")
    try:
        r = await run_peer(dsn, ["pgqueuer_sleep", str(sleep_s), str(conc)], n)
    finally:
        await ctx.server.drop_database(dsn)
    label = f"{key}: PgQueuer 1.6.0"
    results.add(f"{key}.pgqueuer.e2e", f"{label} end to end", "s", r["total_s"], higher=False)
    results.add(
        f"{key}.pgqueuer.ideal_e2e",
        f"{label} % of ideal, end to end",
        "%",
        100 * ideal / r["total_s"],
    )
    results.add(
        f"{key}.pgqueuer.ideal_proc",
        f"{label} % of ideal, processing only",
        "%",
        100 * ideal / r["process_s"],
    )
    results.add(
        f"{key}.pgqueuer.hwm", f"{label} process peak RSS", "MB", r["maxrss_mb"], higher=False
    )


async def run(ctx: Ctx, results: Results) -> None:
    for _ in range(ctx.runs):
        for key, items, sleep_s, conc in SHAPES:
            n = ctx.scaled(items, conc)
            await ours(ctx, results, key, n, sleep_s, conc)
            if "pgqueuer" in ctx.peers:
                await pgqueuer(ctx, results, key, n, sleep_s, conc)
