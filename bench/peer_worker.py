"""One peer run in its own process: ``python -m bench.peer_worker KIND DSN N [CLAIMERS]``.

Prints one JSON line: ``{"enqueue_s": ..., "process_s": ..., "total_s": ...}``.
KIND is ``pgqueuer``, ``procrastinate`` or ``raw`` (the plain asyncpg limit of a
durable claim + complete cycle). Each peer gets a fresh database, the same
number of no-op jobs, its idiomatic bulk enqueue and 64-way concurrency.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from datetime import timedelta
from typing import Any

import asyncpg

CONCURRENCY = 64
RAW_CLAIM = 500


async def pgqueuer(dsn: str, n: int) -> dict[str, float]:
    from pgqueuer.db import AsyncpgDriver
    from pgqueuer.models import Job
    from pgqueuer.qm import QueueManager
    from pgqueuer.queries import Queries
    from pgqueuer.types import QueueExecutionMode

    conn = await asyncpg.connect(dsn)
    driver = AsyncpgDriver(conn)
    queries = Queries(driver)
    await queries.install()
    qm = QueueManager(queries)

    @qm.entrypoint("noop")
    async def noop(job: Job) -> None:
        return None

    t0 = time.perf_counter()
    await queries.enqueue(["noop"] * n, [None] * n, [0] * n)
    t1 = time.perf_counter()
    # batch_size 32: PgQueuer requires max_concurrent_tasks >= 2 * batch_size.
    # In drain mode PgQueuer stops only after one dequeue_timeout finds nothing:
    # keep that tail short (50 ms) so it is not charged a second it did not work.
    await qm.run(
        dequeue_timeout=timedelta(milliseconds=50),
        batch_size=CONCURRENCY // 2,
        mode=QueueExecutionMode.drain,
        max_concurrent_tasks=CONCURRENCY,
    )
    t2 = time.perf_counter()
    left = await asyncpg.connect(dsn)
    try:
        queued = await left.fetchval("SELECT count(*) FROM pgqueuer WHERE status = 'queued'")
    finally:
        await left.close()
    if queued:
        raise RuntimeError(f"pgqueuer left {queued} jobs queued")
    return {"enqueue_s": t1 - t0, "process_s": t2 - t1, "total_s": t2 - t0}


async def procrastinate(dsn: str, n: int) -> dict[str, float]:
    from procrastinate import App, PsycopgConnector

    app = App(connector=PsycopgConnector(conninfo=dsn, min_size=4, max_size=32))

    @app.task(name="noop")
    async def noop() -> None:
        return None

    async with app.open_async():
        await app.schema_manager.apply_schema_async()
        t0 = time.perf_counter()
        await noop.batch_defer_async(*({} for _ in range(n)))
        t1 = time.perf_counter()
        await app.run_worker_async(
            concurrency=CONCURRENCY,
            wait=False,
            install_signal_handlers=False,
            fetch_job_polling_interval=0.5,
        )
        t2 = time.perf_counter()
    conn = await asyncpg.connect(dsn)
    try:
        done = await conn.fetchval(
            "SELECT count(*) FROM procrastinate_jobs WHERE status = 'succeeded'"
        )
    finally:
        await conn.close()
    if done != n:
        raise RuntimeError(f"procrastinate finished {done} of {n} jobs")
    return {"enqueue_s": t1 - t0, "process_s": t2 - t1, "total_s": t2 - t0}


RAW_SCHEMA = """
CREATE TABLE jobs (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    status text NOT NULL DEFAULT 'queued',
    payload jsonb NOT NULL,
    attempts integer NOT NULL DEFAULT 0,
    lease uuid,
    started_at timestamptz,
    finished_at timestamptz
);
CREATE INDEX jobs_queued ON jobs (id) WHERE status = 'queued';
"""
RAW_CLAIM_SQL = """
UPDATE jobs j SET status = 'running', attempts = j.attempts + 1, lease = $2,
       started_at = now()
  FROM (SELECT id FROM jobs WHERE status = 'queued' ORDER BY id LIMIT $1
        FOR UPDATE SKIP LOCKED) c
 WHERE j.id = c.id
RETURNING j.id, j.payload, j.attempts
"""
RAW_COMPLETE_SQL = """
UPDATE jobs j SET status = 'succeeded', lease = NULL, finished_at = now()
  FROM unnest($1::bigint[], $2::integer[]) AS u (id, attempt)
 WHERE j.id = u.id AND j.status = 'running' AND j.lease = $3 AND j.attempts = u.attempt
"""


async def raw(dsn: str, n: int, claimers: int) -> dict[str, float]:
    """Each claimer: claim 500 (one autocommit = durable transaction), complete them
    in one fenced UPDATE (another durable transaction), until nothing is queued."""
    import uuid

    setup = await asyncpg.connect(dsn)
    await setup.execute(RAW_SCHEMA)
    t0 = time.perf_counter()
    await setup.copy_records_to_table(
        "jobs", columns=["payload"], records=[(json.dumps(i),) for i in range(n)]
    )
    await setup.execute("ANALYZE jobs")
    t1 = time.perf_counter()

    async def claimer() -> int:
        conn = await asyncpg.connect(dsn)
        lease = uuid.uuid4()
        done = 0
        try:
            while True:
                rows = await conn.fetch(RAW_CLAIM_SQL, RAW_CLAIM, lease)
                if not rows:
                    return done
                ids = [r["id"] for r in rows]
                atts = [r["attempts"] for r in rows]
                await conn.execute(RAW_COMPLETE_SQL, ids, atts, lease)
                done += len(ids)
        finally:
            await conn.close()

    counts = await asyncio.gather(*(claimer() for _ in range(claimers)))
    t2 = time.perf_counter()
    left = await setup.fetchval("SELECT count(*) FROM jobs WHERE status <> 'succeeded'")
    await setup.close()
    if left or sum(counts) != n:
        raise RuntimeError(f"raw loop: {left} left, {sum(counts)} done of {n}")
    return {"enqueue_s": t1 - t0, "process_s": t2 - t1, "total_s": t2 - t0}


def main(argv: list[str]) -> int:
    kind, dsn, n = argv[0], argv[1], int(argv[2])
    result: Any
    if kind == "pgqueuer":
        result = asyncio.run(pgqueuer(dsn, n))
    elif kind == "procrastinate":
        result = asyncio.run(procrastinate(dsn, n))
    elif kind == "raw":
        result = asyncio.run(raw(dsn, n, int(argv[3])))
    else:
        raise SystemExit(f"unknown peer {kind!r}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
