"""Scenario 6: peers on the same PostgreSQL in the same run, each in its own
process and database: PgQueuer 1.6.0, Procrastinate 3.10.0 and the raw limit of a
durable claim + complete cycle (1 and 4 claimers). The same number of no-op jobs
as scenario 1."""

from __future__ import annotations

import asyncio
import json
import sys

from bench.context import Ctx
from bench.harness import ROOT, Results

PEERS: list[tuple[str, str, list[str]]] = [
    ("pgqueuer", "PgQueuer 1.6.0", ["pgqueuer"]),
    ("procrastinate", "Procrastinate 3.10.0", ["procrastinate"]),
    ("raw1", "raw asyncpg claim+complete, 1 claimer", ["raw", "1"]),
    ("raw4", "raw asyncpg claim+complete, 4 claimers", ["raw", "4"]),
]


async def run_peer(dsn: str, argv: list[str], n: int, timeout_s: float = 1800) -> dict[str, float]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.peer_worker",
        argv[0],
        dsn,
        str(n),
        *argv[1:],
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"peer {argv} failed:\n{err.decode()[-3000:]}")
    result: dict[str, float] = json.loads(out.decode().strip().splitlines()[-1])
    return result


async def run(ctx: Ctx, results: Results) -> None:
    n = ctx.throughput_items
    for _ in range(ctx.runs):
        for key, label, argv in PEERS:
            dsn = await ctx.server.new_database(key)
            try:
                r = await run_peer(dsn, argv, n)
            finally:
                await ctx.server.drop_database(dsn)
            results.add(f"{key}.e2e", f"{label}: end to end ({n:,})", "items/s", n / r["total_s"])
            results.add(f"{key}.proc", f"{label}: processing only", "items/s", n / r["process_s"])
