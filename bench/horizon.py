"""Scenario ``horizon``: a steady load while another session holds the xmin horizon.

PostgreSQL job queues are known to collapse behind a held xmin horizon: while any
snapshot older than the queue's churn is open, no dead row version can be removed
(autovacuum runs and finds nothing it may reclaim), so every scan of the queue's
tables and of its partial indexes walks more dead entries every second.

A real daemon (``running_daemon``, ``concurrency = 64``, the ``stamp`` handler
only) gets a steady offered load, open-loop: ``CLIENTS`` HTTP client tasks send
POSTs on a fixed schedule (each POST is its own task, so a slow answer does not
delay the next send; at most ``MAX_INFLIGHT`` in flight per client: beyond that
the schedule slips, reported as lag, and what could not be sent by the load's end
is dropped and reported), for three phases:

1. clean: nothing else on the server (the first ``WARMUP_S`` are not counted);
2. hold: a separate connection runs ``BEGIN ISOLATION LEVEL REPEATABLE READ;
   SELECT 1 FROM <schema>.items LIMIT 1`` (the snapshot is taken) and stays idle
   in transaction, holding the xmin horizon;
3. after: that transaction is rolled back, the load goes on.

Two shapes, each its own run and database, at the same items/s: 1-item batches
(``horizon1``: 500 POSTs/s at the default 500 items/s) and 10-item batches
(``horizon10``: 50 POSTs/s). Pick-up latency = the item's ``started_at`` (the
claim's transaction) - its batch's ``created_at`` (the submission's transaction),
both the database's clock, read from the tables once the load has stopped and the
queue has drained (at most ``DRAIN_S``; an item not started by then counts with
the time it waited so far, and is reported). A batch belongs to the phase in which
it was created; a POST still waiting for its 201 is not in the pick-up latency
but in the POSTs' time to answer. Per phase: p50/p95/p99 pick-up, items/s
completed (``finished_at`` in the phase) and accepted (batches created), the
POSTs' p99 lag behind their slots and time to 201, and, at the phase's end,
``n_dead_tup``, autovacuum runs and the total size (indexes included) of
batches, items and batch_events from ``pg_stat_user_tables`` (busy backends flush
their counters about once a second), plus the sizes of the partial indexes
``items_runnable`` and ``items_running``. Recovery: the seconds from the release
to the end of the first 5-s window (by batch creation) whose p95 is within 1.5x
the clean p95 (5 s: the first window after the release already was).

Peer (``pgqueuer`` in ``--peers``): PgQueuer 1.6.0 with the same offered load, one
job per ``enqueue`` call from the same number of connections, the same phases and
hold (``bench.peer_worker pgqueuer_horizon``); pick-up = the entrypoint's start
(wall clock) - the enqueue call's start (in the payload).

Phase lengths: ``--horizon-phases CLEAN,HOLD,AFTER`` seconds at ``--scale 1``
(default 600,600,600), multiplied by ``--scale`` (0.1 with ``--quick``: 3 minutes
per shape); the offered load ``--horizon-rate`` items/s (default 500).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import aiohttp
import asyncpg

from bench.context import Ctx
from bench.harness import BENCH_HANDLERS, Results, percentile, running_daemon
from bench.peers import run_peer

CLIENTS = 4
MAX_INFLIGHT = 64  # per client: beyond it the schedule slips (reported as lag)
WARMUP_S = 5.0
WINDOW_S = 5.0
RECOVERY_FACTOR = 1.5
DRAIN_S = 120.0
SCHEMA = "supervisor"
TABLES = ("batches", "items", "batch_events")
INDEXES = ("items_runnable", "items_running", "batches_claimable")
PHASES = ("clean", "hold", "after")

STATS_SQL = """
SELECT relname, n_dead_tup, n_live_tup, autovacuum_count,
       pg_total_relation_size(relid) AS size
  FROM pg_stat_user_tables WHERE schemaname = $1 AND relname = ANY ($2::text[])
"""
INDEX_SQL = """
SELECT c.relname, pg_relation_size(c.oid) AS size
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE n.nspname = $1 AND c.relname = ANY ($2::text[])
"""
SAMPLES_SQL = f"""
SELECT extract(epoch FROM b.created_at)::float8 AS created,
       extract(epoch FROM i.started_at)::float8 AS started,
       extract(epoch FROM i.finished_at)::float8 AS finished
  FROM {SCHEMA}.items i JOIN {SCHEMA}.batches b ON b.id = i.batch_id
"""


@dataclasses.dataclass
class Offered:
    """What the open-loop clients did: calls due, sent, failed, and per call sent
    (wall time sent, seconds behind its slot, seconds to its answer)."""

    due: int = 0
    sent: int = 0
    failed: int = 0
    calls: list[tuple[float, float, float]] = dataclasses.field(default_factory=list)
    errors: list[str] = dataclasses.field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        lag = [c[1] for c in self.calls]
        took = [c[2] for c in self.calls]
        return {
            "due": self.due,
            "sent": self.sent,
            "failed": self.failed,
            "errors": self.errors,
            "lag_p99_ms": round(1000 * percentile(lag, 99), 1),
            "call_p99_ms": round(1000 * percentile(took, 99), 1),
        }


async def open_loop(
    rate: float,
    start: float,
    end: float,
    clients: int,
    send: Callable[[int], Awaitable[str | None]],
) -> Offered:
    """Call ``send(client)`` ``rate`` times a second between the loop times ``start``
    and ``end``, open-loop: client ``c`` owns the slots ``c, c + clients, ...`` and
    starts each at its time whether or not its previous calls have returned (at most
    ``MAX_INFLIGHT`` in flight; beyond that the schedule slips, reported as lag,
    and the slots not sent by ``end`` are dropped: ``due`` - ``sent``). ``send``
    returns None, or what went wrong."""
    loop = asyncio.get_running_loop()
    out = Offered()

    async def one(c: int, sem: asyncio.Semaphore, due: float) -> None:
        wall, t0 = time.time(), loop.time()
        try:
            err = await send(c)
        except (OSError, TimeoutError, aiohttp.ClientError, asyncpg.PostgresError) as exc:
            err = repr(exc)
        finally:
            sem.release()
        out.calls.append((wall, max(0.0, t0 - due), loop.time() - t0))
        if err is not None:
            out.failed += 1
            if len(out.errors) < 5:
                out.errors.append(err)

    async def client(c: int) -> None:
        sem = asyncio.Semaphore(MAX_INFLIGHT)
        tasks: set[asyncio.Task[None]] = set()
        k = c
        while (due := start + k / rate) < end:
            out.due += 1
            k += clients
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            if loop.time() >= end:
                continue  # too late: dropped, not sent after the load's end
            await sem.acquire()
            if loop.time() >= end:
                sem.release()
                continue
            out.sent += 1
            t = asyncio.create_task(one(c, sem, due))
            tasks.add(t)
            t.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.gather(*tasks)

    await asyncio.gather(*(client(c) for c in range(clients)))
    return out


async def offer_http(
    url: str, body: bytes, posts_per_s: float, start: float, end: float
) -> Offered:
    """POST ``body`` to ``url`` open-loop from ``CLIENTS`` sessions (one each)."""
    headers = {"Content-Type": "application/json"}
    timeout = aiohttp.ClientTimeout(total=300)
    async with contextlib.AsyncExitStack() as stack:
        sessions = [
            await stack.enter_async_context(
                aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(limit=MAX_INFLIGHT), timeout=timeout
                )
            )
            for _ in range(CLIENTS)
        ]

        async def send(c: int) -> str | None:
            async with sessions[c].post(url, data=body, headers=headers) as r:
                await r.read()
                return None if r.status == 201 else f"HTTP {r.status}"

        return await open_loop(posts_per_s, start, end, CLIENTS, send)


async def table_stats(
    conn: asyncpg.Connection, schema: str, tables: Sequence[str], indexes: Sequence[str]
) -> dict[str, dict[str, float]]:
    """``n_dead_tup``, ``n_live_tup``, autovacuum runs and total size per table, and
    the size of each index, now. Busy backends flush their counters at most once a
    second, so what is read lags the load by about that much."""
    await conn.execute("SELECT pg_stat_force_next_flush()")
    await conn.execute("SELECT pg_stat_clear_snapshot()")
    out: dict[str, dict[str, float]] = {}
    for r in await conn.fetch(STATS_SQL, schema, list(tables)):
        out[r["relname"]] = {
            "dead": float(r["n_dead_tup"]),
            "live": float(r["n_live_tup"]),
            "autovacuum": float(r["autovacuum_count"]),
            "size_mb": r["size"] / 1e6,
        }
    for r in await conn.fetch(INDEX_SQL, schema, list(indexes)):
        out[r["relname"]] = {"size_mb": r["size"] / 1e6}
    return out


@contextlib.asynccontextmanager
async def held_horizon(dsn: str, table: str) -> AsyncIterator[Callable[[], Awaitable[int]]]:
    """An idle-in-transaction session whose REPEATABLE READ snapshot holds the xmin
    horizon for the body's duration; yields a callable for its ``age(backend_xmin)``."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        await conn.fetchval(f"SELECT 1 FROM {table} LIMIT 1")
        pid = conn.get_server_pid()
        watch = await asyncpg.connect(dsn)
        try:

            async def xmin_age() -> int:
                v = await watch.fetchval(
                    "SELECT age(backend_xmin) FROM pg_stat_activity WHERE pid = $1", pid
                )
                return int(v) if v is not None else -1

            yield xmin_age
        finally:
            await watch.close()
        await conn.execute("ROLLBACK")
    finally:
        await conn.close()


@dataclasses.dataclass
class Timeline:
    """Wall-clock (epoch) phase boundaries of one run."""

    start: float
    hold: float
    release: float
    end: float

    def windows(self) -> dict[str, tuple[float, float]]:
        return {
            "clean": (self.start + WARMUP_S, self.hold),
            "hold": (self.hold, self.release),
            "after": (self.release, self.end),
        }


def summarise(
    samples: Sequence[tuple[float, float | None, float | None]],
    calls: Sequence[tuple[float, float, float]],
    tl: Timeline,
    cutoff: float,
    size: int,
) -> dict[str, Any]:
    """Per phase: pick-up percentiles (ms), items/s completed and accepted (created),
    items not started by ``cutoff``, the calls' (POSTs') lag behind their slots and
    time to answer; and the recovery after the release (seconds, or None)."""
    out: dict[str, Any] = {}
    for phase, (a, b) in tl.windows().items():
        lat = [(s if s is not None else cutoff) - c for c, s, _ in samples if a <= c < b]
        done = sum(1 for _, _, f in samples if f is not None and a <= f < b)
        mine = [c for c in calls if a <= c[0] < b]
        out[phase] = {
            "n": len(lat),
            "unstarted": sum(1 for c, s, _ in samples if a <= c < b and s is None),
            **{f"p{p}": 1000 * percentile(lat, p) for p in (50, 95, 99)},
            "completed": done / (b - a),
            "accepted": len(lat) / (b - a),
            "lag_p99": 1000 * percentile([c[1] for c in mine], 99),
            "call_p99": 1000 * percentile([c[2] for c in mine], 99),
        }
    base = out["clean"]["p95"]
    windows = []
    t = tl.release
    recovery: float | None = None
    while t + WINDOW_S <= tl.end + 1e-9:
        lat = [(s if s is not None else cutoff) - c for c, s, _ in samples if t <= c < t + WINDOW_S]
        p95 = 1000 * percentile(lat, 95) if lat else float("nan")
        windows.append(round(p95, 1))
        if recovery is None and lat and p95 <= RECOVERY_FACTOR * base:
            recovery = t + WINDOW_S - tl.release
        t += WINDOW_S
    hold_windows = []
    t = tl.hold
    while t + WINDOW_S <= tl.release + 1e-9:
        lat = [(s if s is not None else cutoff) - c for c, s, _ in samples if t <= c < t + WINDOW_S]
        hold_windows.append(round(1000 * percentile(lat, 95), 1) if lat else float("nan"))
        t += WINDOW_S
    out["recovery_s"] = recovery
    out["after_windows_p95"] = windows
    out["hold_windows_p95"] = hold_windows
    out["size"] = size
    return out


def phase_lengths(ctx: Ctx) -> tuple[float, float, float]:
    clean, hold, after = (max(15.0, p * ctx.scale) for p in ctx.horizon_phases)
    return clean, hold, after


async def _sleep_until(loop_t: float) -> None:
    delay = loop_t - asyncio.get_running_loop().time()
    if delay > 0:
        await asyncio.sleep(delay)


async def _drain(conn: asyncpg.Connection, limit_s: float) -> float:
    """Wait until nothing is queued or running (at most ``limit_s``); returns the
    wall time at which it stopped waiting."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        left = await conn.fetchval(
            f"SELECT count(*) FROM {SCHEMA}.items WHERE status IN ('queued', 'running')"
        )
        if not left:
            break
        await asyncio.sleep(0.5)
    return time.time()


async def ours(ctx: Ctx, size: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """One run of one shape; returns (summary, table stats per phase end)."""
    clean, hold, after = phase_lengths(ctx)
    posts_per_s = ctx.horizon_rate / size
    body = json.dumps({"handler": "stamp", "items": [{}] * size}).encode()
    key = f"horizon{size}"
    dsn = await ctx.server.new_database(key)
    stats: dict[str, Any] = {}
    try:
        handlers = {"stamp": BENCH_HANDLERS["stamp"]}
        async with running_daemon(ctx.work_dir, dsn, key, handlers=handlers) as (d, _):
            probe = await asyncpg.connect(dsn)
            try:
                loop = asyncio.get_running_loop()
                t0 = loop.time() + 0.2
                wall0 = time.time() + 0.2
                load = asyncio.create_task(
                    offer_http(
                        d.url + "/v1/batches", body, posts_per_s, t0, t0 + clean + hold + after
                    )
                )
                await _sleep_until(t0 + clean)
                stats["clean"] = await table_stats(probe, SCHEMA, TABLES, INDEXES)
                async with held_horizon(dsn, f"{SCHEMA}.items") as xmin_age:
                    wall_hold = time.time()
                    await _sleep_until(t0 + clean + hold)
                    stats["hold"] = await table_stats(probe, SCHEMA, TABLES, INDEXES)
                    stats["hold_xmin_age"] = await xmin_age()
                wall_release = time.time()
                await _sleep_until(t0 + clean + hold + after)
                stats["after"] = await table_stats(probe, SCHEMA, TABLES, INDEXES)
                wall_end = time.time()
                offered = await load
                cutoff = await _drain(probe, DRAIN_S)
                rows = await probe.fetch(SAMPLES_SQL)
            finally:
                await probe.close()
    finally:
        await ctx.server.drop_database(dsn)
    tl = Timeline(wall0, wall_hold, wall_release, wall_end)
    samples = [(r["created"], r["started"], r["finished"]) for r in rows]
    summary = summarise(samples, offered.calls, tl, cutoff, size)
    summary["posts"] = offered.summary()
    return summary, stats


def _report(
    results: Results,
    key: str,
    label: str,
    summary: dict[str, Any],
    stats: dict[str, Any],
    rate: float,
    call: str = "POST",
) -> None:
    for phase in PHASES:
        s = summary[phase]
        for p in (50, 95, 99):
            results.add(
                f"{key}.{phase}.p{p}",
                f"{label} {phase}: pick-up p{p}",
                "ms",
                s[f"p{p}"],
                higher=False,
            )
        results.add(
            f"{key}.{phase}.completed", f"{label} {phase}: completed", "items/s", s["completed"]
        )
        results.add(
            f"{key}.{phase}.accepted",
            f"{label} {phase}: accepted (of {rate:g} offered)",
            "items/s",
            s["accepted"],
        )
        results.add(
            f"{key}.{phase}.lag_p99",
            f"{label} {phase}: {call} behind schedule p99",
            "ms",
            s["lag_p99"],
            higher=False,
        )
        results.add(
            f"{key}.{phase}.call_p99",
            f"{label} {phase}: {call} time to answer p99",
            "ms",
            s["call_p99"],
            higher=False,
        )
        if s["unstarted"]:
            results.add(
                f"{key}.{phase}.unstarted",
                f"{label} {phase}: not started after the drain",
                "items",
                s["unstarted"],
                higher=False,
            )
        for table, v in stats.get(phase, {}).items():
            if "dead" in v:
                results.add(
                    f"{key}.{phase}.{table}.dead",
                    f"{label} {phase} end: {table} n_dead_tup",
                    "rows",
                    v["dead"],
                    higher=False,
                )
            results.add(
                f"{key}.{phase}.{table}.size",
                f"{label} {phase} end: {table} size",
                "MB",
                v["size_mb"],
                higher=False,
            )
    clean = summary["clean"]["p95"]
    results.add(
        f"{key}.hold_ratio",
        f"{label}: during-hold p95 / clean p95",
        "ratio",
        summary["hold"]["p95"] / clean if clean else float("nan"),
        higher=False,
    )
    rec = summary["recovery_s"]
    results.add(
        f"{key}.recovery",
        f"{label}: after release, p95 (5-s windows) within 1.5x clean",
        "s",
        rec if rec is not None else float("inf"),
        higher=False,
    )


async def peer(ctx: Ctx) -> tuple[dict[str, Any], dict[str, Any]]:
    clean, hold, after = phase_lengths(ctx)
    dsn = await ctx.server.new_database("horizon_pgqueuer")
    try:
        argv = ["pgqueuer_horizon", str(ctx.horizon_rate), str(clean), str(hold), str(after)]
        limit = clean + hold + after + DRAIN_S + 600
        r: dict[str, Any] = dict(await run_peer(dsn, argv, 0, timeout_s=limit))
    finally:
        await ctx.server.drop_database(dsn)
    tl = Timeline(*r["timeline"])
    samples = [(c, s, f) for c, s, f in r["samples"]]
    calls = [(w, lag, took) for w, lag, took in r["calls"]]
    summary = summarise(samples, calls, tl, r["cutoff"], 1)
    summary["posts"] = r["posts"]
    return summary, r["stats"]


def _print(label: str, summary: dict[str, Any], stats: dict[str, Any]) -> None:
    """The per-window p95s and the phase-end table stats (not medians: one run's)."""
    print(f"    {label}: POSTs {summary['posts']}")
    print(f"    {label}: p95 by 5-s window during the hold (ms): {summary['hold_windows_p95']}")
    print(f"    {label}: p95 by 5-s window after release (ms): {summary['after_windows_p95']}")
    for phase in PHASES:
        row = ", ".join(
            f"{t} "
            + (
                f"dead {v['dead']:,.0f} live {v['live']:,.0f} av {v['autovacuum']:.0f} "
                if "dead" in v
                else ""
            )
            + f"{v['size_mb']:.2f} MB"
            for t, v in stats.get(phase, {}).items()
        )
        print(f"    {label}: {phase} end: {row}")
    if "hold_xmin_age" in stats:
        print(f"    {label}: age(backend_xmin) of the holder at release: {stats['hold_xmin_age']}")


async def run(ctx: Ctx, results: Results) -> None:
    for _ in range(ctx.runs):
        for size in (1, 10):
            key = f"horizon{size}"
            label = f"horizon {size}-item batches"
            summary, stats = await ours(ctx, size)
            _print(label, summary, stats)
            _report(results, key, label, summary, stats, ctx.horizon_rate)
        if "pgqueuer" in ctx.peers:
            summary, stats = await peer(ctx)
            _print("horizon PgQueuer", summary, stats)
            _report(
                results,
                "horizon_pgq",
                "horizon PgQueuer 1 job/call",
                summary,
                stats,
                ctx.horizon_rate,
                call="enqueue call",
            )
