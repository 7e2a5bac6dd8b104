"""One peer run in its own process: ``python -m bench.peer_worker KIND DSN N [ARGS]``.

Prints one JSON line: ``{"enqueue_s": ..., "process_s": ..., "total_s": ...}``.
KIND is ``pgqueuer``, ``procrastinate`` or ``raw`` (the plain asyncpg limit of a
durable claim + complete cycle; ARGS: the claimers). Each peer gets a fresh
database, the same number of no-op jobs, its idiomatic bulk enqueue and 64-way
concurrency.

The shapes of the small-batch and I/O scenarios:

- ``pgqueuer_groups`` / ``procrastinate_groups`` N GROUP CONNECTIONS: the N no-op
  jobs enqueued GROUP per call (one job per call when GROUP is 1) from
  CONNECTIONS concurrent connections, then drained at 64-way concurrency.
- ``pgqueuer_sleep`` N SECONDS CONCURRENCY: N jobs whose async entrypoint sleeps
  SECONDS, enqueued in one call, drained at CONCURRENCY; also reports the
  process's peak RSS (``maxrss_mb``).
- ``pgqueuer_horizon`` 0 RATE CLEAN HOLD AFTER: the ``horizon`` scenario's load
  (RATE single-job enqueue calls a second, open-loop) for CLEAN seconds, then HOLD
  seconds with the xmin horizon held, then AFTER; prints the phase times, every
  job's (enqueue, start, end) wall times, the POSTs' counterpart and table stats.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import resource
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any, TypeVar

import asyncpg

CONCURRENCY = 64
T = TypeVar("T")
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


async def _from_connections(
    connections: int,
    groups: int,
    open_client: Callable[[], Awaitable[T]],
    enqueue_one: Callable[[T], Awaitable[None]],
    close_client: Callable[[T], Awaitable[None]],
) -> None:
    """``connections`` clients take group numbers from one counter until ``groups``
    are enqueued, each through its own client (a connection)."""
    counter = itertools.count()

    async def client() -> None:
        c = await open_client()
        try:
            while next(counter) < groups:
                await enqueue_one(c)
        finally:
            await close_client(c)

    await asyncio.gather(*(client() for _ in range(connections)))


async def pgqueuer_groups(dsn: str, n: int, group: int, connections: int) -> dict[str, float]:
    from pgqueuer.db import AsyncpgDriver
    from pgqueuer.models import Job
    from pgqueuer.qm import QueueManager
    from pgqueuer.queries import Queries
    from pgqueuer.types import QueueExecutionMode

    conn = await asyncpg.connect(dsn)
    queries = Queries(AsyncpgDriver(conn))
    await queries.install()
    qm = QueueManager(queries)

    @qm.entrypoint("noop")
    async def noop(job: Job) -> None:
        return None

    async def open_client() -> tuple[asyncpg.Connection, Queries]:
        c = await asyncpg.connect(dsn)
        return c, Queries(AsyncpgDriver(c))

    async def close_client(c: tuple[asyncpg.Connection, Queries]) -> None:
        await c[0].close()

    payloads: list[bytes | None] = [None] * group
    names, prios = ["noop"] * group, [0] * group

    async def enqueue_one(c: tuple[asyncpg.Connection, Queries]) -> None:
        if group == 1:
            await c[1].enqueue("noop", None, 0)
        else:
            await c[1].enqueue(names, payloads, prios)

    t0 = time.perf_counter()
    await _from_connections(connections, n // group, open_client, enqueue_one, close_client)
    t1 = time.perf_counter()
    await qm.run(
        dequeue_timeout=timedelta(milliseconds=50),
        batch_size=CONCURRENCY // 2,
        mode=QueueExecutionMode.drain,
        max_concurrent_tasks=CONCURRENCY,
    )
    t2 = time.perf_counter()
    await _pgqueuer_check_drained(dsn)
    return {"enqueue_s": t1 - t0, "process_s": t2 - t1, "total_s": t2 - t0}


async def _pgqueuer_check_drained(dsn: str) -> None:
    left = await asyncpg.connect(dsn)
    try:
        queued = await left.fetchval("SELECT count(*) FROM pgqueuer")
    finally:
        await left.close()
    if queued:
        raise RuntimeError(f"pgqueuer left {queued} jobs")


async def procrastinate_groups(dsn: str, n: int, group: int, connections: int) -> dict[str, float]:
    from procrastinate import App, PsycopgConnector

    pool = max(32, connections)
    app = App(connector=PsycopgConnector(conninfo=dsn, min_size=4, max_size=pool))

    @app.task(name="noop")
    async def noop() -> None:
        return None

    # The connector's pool is shared: CONNECTIONS concurrent callers, at most
    # that many connections in use at once.
    async def nothing() -> None:
        return None

    async def no_close(_: None) -> None:
        return None

    async def enqueue_one(_: None) -> None:
        if group == 1:
            await noop.defer_async()
        else:
            await noop.batch_defer_async(*({} for _ in range(group)))

    async with app.open_async():
        await app.schema_manager.apply_schema_async()
        t0 = time.perf_counter()
        await _from_connections(connections, n // group, nothing, enqueue_one, no_close)
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


async def pgqueuer_sleep(dsn: str, n: int, seconds: float, concurrency: int) -> dict[str, float]:
    from pgqueuer.db import AsyncpgDriver
    from pgqueuer.models import Job
    from pgqueuer.qm import QueueManager
    from pgqueuer.queries import Queries
    from pgqueuer.types import QueueExecutionMode

    conn = await asyncpg.connect(dsn)
    queries = Queries(AsyncpgDriver(conn))
    await queries.install()
    qm = QueueManager(queries)

    @qm.entrypoint("sleep")
    async def sleep(job: Job) -> None:
        await asyncio.sleep(seconds)

    t0 = time.perf_counter()
    await queries.enqueue(["sleep"] * n, [None] * n, [0] * n)
    t1 = time.perf_counter()
    # PgQueuer requires max_concurrent_tasks >= 2 * batch_size; 500 per dequeue
    # is the daemon's claim_batch_size.
    await qm.run(
        dequeue_timeout=timedelta(milliseconds=50),
        batch_size=min(500, concurrency // 2),
        mode=QueueExecutionMode.drain,
        max_concurrent_tasks=concurrency,
    )
    t2 = time.perf_counter()
    await _pgqueuer_check_drained(dsn)
    maxrss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "enqueue_s": t1 - t0,
        "process_s": t2 - t1,
        "total_s": t2 - t0,
        "maxrss_mb": maxrss_mb,
    }


async def pgqueuer_horizon(
    dsn: str, rate: float, clean: float, hold: float, after: float
) -> dict[str, Any]:
    from pgqueuer.db import AsyncpgDriver
    from pgqueuer.models import Job
    from pgqueuer.qm import QueueManager
    from pgqueuer.queries import Queries

    from bench import horizon

    conn = await asyncpg.connect(dsn)
    queries = Queries(AsyncpgDriver(conn))
    await queries.install()
    qm = QueueManager(queries)
    enqueued: dict[int, float] = {}
    ran: dict[int, tuple[float, float]] = {}

    @qm.entrypoint("stamp")
    async def stamp(job: Job) -> None:
        started = time.time()
        assert job.payload is not None
        seq = int(job.payload.split(b" ")[0])
        ran[seq] = (started, time.time())

    # Each open-loop client has its own connections (an asyncpg connection runs one
    # query at a time), as many as the client may have calls in flight.
    free: list[asyncio.Queue[Queries]] = []
    opened: list[asyncpg.Connection] = []
    for _ in range(horizon.CLIENTS):
        q: asyncio.Queue[Queries] = asyncio.Queue()
        for _ in range(8):
            c = await asyncpg.connect(dsn)
            opened.append(c)
            q.put_nowait(Queries(AsyncpgDriver(c)))
        free.append(q)
    counter = itertools.count()

    async def send(client: int) -> str | None:
        qs = await free[client].get()
        try:
            seq = next(counter)
            t = time.time()
            enqueued[seq] = t
            await qs.enqueue("stamp", f"{seq} {t}".encode(), 0)
        finally:
            free[client].put_nowait(qs)
        return None

    worker = asyncio.create_task(
        qm.run(
            dequeue_timeout=timedelta(seconds=1),
            batch_size=CONCURRENCY // 2,
            max_concurrent_tasks=CONCURRENCY,
        )
    )
    probe = await asyncpg.connect(dsn)
    tables = ("pgqueuer", "pgqueuer_log", "pgqueuer_statistics")
    stats: dict[str, Any] = {}
    loop = asyncio.get_running_loop()
    t0, wall0 = loop.time() + 0.2, time.time() + 0.2
    load = asyncio.create_task(
        horizon.open_loop(rate, t0, t0 + clean + hold + after, horizon.CLIENTS, send)
    )
    await asyncio.sleep(t0 + clean - loop.time())
    stats["clean"] = await horizon.table_stats(probe, "public", tables, ())
    async with horizon.held_horizon(dsn, "pgqueuer") as xmin_age:
        wall_hold = time.time()
        await asyncio.sleep(t0 + clean + hold - loop.time())
        stats["hold"] = await horizon.table_stats(probe, "public", tables, ())
        stats["hold_xmin_age"] = await xmin_age()
    wall_release = time.time()
    await asyncio.sleep(max(0.0, t0 + clean + hold + after - loop.time()))
    stats["after"] = await horizon.table_stats(probe, "public", tables, ())
    wall_end = time.time()
    offered = await load
    deadline = time.monotonic() + horizon.DRAIN_S
    while time.monotonic() < deadline:
        if len(ran) >= len(enqueued):
            break
        await asyncio.sleep(0.2)
    cutoff = time.time()
    qm.shutdown.set()
    await worker
    for c in (*opened, probe, conn):
        await c.close()
    samples = [(t, *ran.get(seq, (None, None))) for seq, t in enqueued.items()]
    return {
        "timeline": [wall0, wall_hold, wall_release, wall_end],
        "samples": samples,
        "cutoff": cutoff,
        "posts": offered.summary(),
        "calls": offered.calls,
        "stats": stats,
    }


def main(argv: list[str]) -> int:
    kind, dsn, n = argv[0], argv[1], int(argv[2])
    result: Any
    if kind == "pgqueuer":
        result = asyncio.run(pgqueuer(dsn, n))
    elif kind == "procrastinate":
        result = asyncio.run(procrastinate(dsn, n))
    elif kind == "raw":
        result = asyncio.run(raw(dsn, n, int(argv[3])))
    elif kind == "pgqueuer_groups":
        result = asyncio.run(pgqueuer_groups(dsn, n, int(argv[3]), int(argv[4])))
    elif kind == "procrastinate_groups":
        result = asyncio.run(procrastinate_groups(dsn, n, int(argv[3]), int(argv[4])))
    elif kind == "pgqueuer_horizon":
        rate, clean, hold, after = (float(x) for x in argv[3:7])
        result = asyncio.run(pgqueuer_horizon(dsn, rate, clean, hold, after))
    elif kind == "pgqueuer_sleep":
        result = asyncio.run(pgqueuer_sleep(dsn, n, float(argv[3]), int(argv[4])))
    else:
        raise SystemExit(f"unknown peer {kind!r}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
