"""Scenario: a batch's results as a dataset (``GET /v1/batches/{id}/results``).

One batch of 1,000,000 no-op items (times ``--scale``) is processed by one daemon,
which is then stopped; a fresh daemon streams the results over HTTP, as JSON
Lines and then as CSV, to a client that only counts records. Reported: rows/s of
each export, the exporting daemon's CPU per 1,000 rows, and its VmHWM before and
after the exports. A fresh process, so that its peak is the exports' own and not
the parse of the million-item submission, which the first daemon carries: an
export that built its body in memory would show here as hundreds of MB."""

from __future__ import annotations

import time

import aiohttp

from bench.context import Ctx
from bench.harness import Daemon, Results, batch_body, cpu_seconds, proc_status_kb, running_daemon

ITEMS = 1_000_000
# The export of a million rows takes a while; a stalled one must not hang the run.
STREAM_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_read=120)


async def _export(
    d: Daemon, session: aiohttp.ClientSession, batch_id: str, fmt: str
) -> tuple[int, float]:
    """(records received, seconds from request to the last byte)."""
    url = f"{d.url}/v1/batches/{batch_id}/results?format={fmt}"
    t0 = time.perf_counter()
    lines = 0
    async with session.get(url, timeout=STREAM_TIMEOUT) as r:
        if r.status != 200:
            raise RuntimeError(f"GET {url} -> {r.status}: {(await r.text())[:500]}")
        async for chunk in r.content.iter_any():
            lines += chunk.count(b"\n")  # no-op rows hold no newline of their own
    return lines - (1 if fmt == "csv" else 0), time.perf_counter() - t0


async def run(ctx: Ctx, results: Results) -> None:
    n = ctx.scaled(ITEMS)
    big = {"max_items_per_batch": max(n, 100_000), "max_body_bytes": 256 * 1024 * 1024}
    for _ in range(ctx.runs):
        dsn = await ctx.server.new_database("results")
        try:
            async with running_daemon(ctx.work_dir, dsn, "rw", server=big) as (d, session):
                batch, _, _ = await d.post_batch(session, batch_body("noop", n))
                await d.wait_terminal(session, batch["id"], limit_s=3600, interval=0.2)
            async with running_daemon(ctx.work_dir, dsn, "rx") as (d, session):
                done = await d.get_batch(session, batch["id"])  # warms the API pool
                assert done["status"] == "completed", done
                hwm_before = proc_status_kb(d.pid, "VmHWM") / 1024
                for fmt, label in (("jsonl", "JSON Lines"), ("csv", "CSV")):
                    cpu0 = cpu_seconds(d.pid)
                    rows, seconds = await _export(d, session, batch["id"], fmt)
                    cpu = cpu_seconds(d.pid) - cpu0
                    if rows != n:
                        raise RuntimeError(f"{fmt} export gave {rows} rows of {n}")
                    results.add(
                        f"results.{fmt}",
                        f"results: {label} export ({n:,} rows)",
                        "rows/s",
                        n / seconds,
                    )
                    results.add(
                        f"results.{fmt}.cpu_daemon",
                        f"results: {label} daemon CPU per 1k rows",
                        "ms",
                        1000 * cpu / n * 1000,
                        higher=False,
                    )
                hwm_after = proc_status_kb(d.pid, "VmHWM") / 1024
                results.add(
                    "results.hwm_before",
                    "results: exporting daemon VmHWM before the exports",
                    "MB",
                    hwm_before,
                    higher=False,
                )
                results.add(
                    "results.hwm_after",
                    "results: exporting daemon VmHWM after both",
                    "MB",
                    hwm_after,
                    higher=False,
                )
        finally:
            await ctx.server.drop_database(dsn)
