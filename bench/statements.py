"""Where PostgreSQL's time goes during the ``small`` scenario (our side only):
``python -m bench.statements [--batches N] [--size N] [--api-pool-max N]``.

Starts the benchmark server with ``pg_stat_statements`` preloaded
(``track = all``, ``track_planning = on``), runs ``small``'s daemon side once
(N batches of SIZE no-op items from 16 clients), and prints the top-level and the
nested statements (inside the PL/pgSQL functions) by execution + planning time.
``--api-pool-max`` sets ``[database] api_pool_max`` (the API's connections; 5 by
default) to see whether submissions wait for a connection.
"""

from __future__ import annotations

import argparse
import asyncio
import pathlib
import shutil
import tempfile
from typing import Any

import asyncpg

from bench import harness, small
from bench.context import Ctx
from bench.harness import BenchServer, Results

TOP_SQL = """
SELECT calls, total_exec_time AS exec_ms, total_plan_time AS plan_ms,
       left(regexp_replace(query, '\\s+', ' ', 'g'), 100) AS query
  FROM pg_stat_statements
 WHERE toplevel = $1 AND query NOT LIKE '%pg_stat_statements%'
 ORDER BY total_exec_time + total_plan_time DESC
 LIMIT $2
"""


async def amain(args: argparse.Namespace) -> None:
    harness.PG_SETTINGS.update(
        {
            "shared_preload_libraries": "pg_stat_statements",
            "pg_stat_statements.track": "all",
            "pg_stat_statements.track_planning": "on",
        }
    )
    server = BenchServer()
    work = pathlib.Path(tempfile.mkdtemp(prefix="bsv-bench-stmts-"))
    try:
        server.start()
        ctx = Ctx(server, work, 1, False, False)
        conn = await asyncpg.connect(server.server.dsn)
        try:
            await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            await conn.execute("SELECT pg_stat_statements_reset()")
        finally:
            await conn.close()
        database: dict[str, Any] | None = None
        if args.api_pool_max is not None:
            database = {"api_pool_max": args.api_pool_max}
        results = Results()
        await small.ours(ctx, results, "small", args.batches, args.size, database=database)
        for m in results.metrics.values():
            print(f"{m.name}: {m.values[0]:,.1f} {m.unit}")
        conn = await asyncpg.connect(server.server.dsn)
        try:
            for toplevel, title in ((True, "top-level"), (False, "nested (inside functions)")):
                print(f"\n{title} statements: calls, exec ms, plan ms")
                for r in await conn.fetch(TOP_SQL, toplevel, args.top):
                    print(f"{r['calls']:7d} {r['exec_ms']:9.1f} {r['plan_ms']:8.1f}  {r['query']}")
        finally:
            await conn.close()
    finally:
        server.close()
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.statements", description=__doc__)
    p.add_argument("--batches", type=int, default=1_000)
    p.add_argument("--size", type=int, default=10)
    p.add_argument("--api-pool-max", type=int, default=None)
    p.add_argument("--top", type=int, default=14, help="statements listed per table")
    asyncio.run(amain(p.parse_args()))


if __name__ == "__main__":
    main()
