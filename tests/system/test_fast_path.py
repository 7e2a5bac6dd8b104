"""The guarantees hold on the fast path: a 20,000-item batch of no-op items,
group-committed claims and outcomes, a SIGKILL in the middle, a restart under
the same name, and the batch still ends with exact counts."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg

from tests.daemon import DEFAULT_HANDLERS, Daemon, wait_for

N = 20_000


def item_states(url: str) -> dict[str, int]:
    async def go() -> dict[str, int]:
        conn = await asyncpg.connect(url)
        try:
            rows = await conn.fetch("SELECT status, count(*) AS n FROM supervisor.items GROUP BY 1")
            return {r["status"]: r["n"] for r in rows}
        finally:
            await conn.close()

    return asyncio.run(go())


def test_sigkill_mid_run_of_20000_items_completes_with_exact_counts(
    daemons: Any, db_url: str
) -> None:
    handlers = dict(DEFAULT_HANDLERS) | {
        "noop": {"type": "python", "target": "supervisor.examples:noop", "timeout": "10s"}
    }
    worker = {"concurrency": 64}
    d: Daemon = daemons("fast", handlers=handlers, worker=worker)
    b = d.submit("noop", list(range(N)))
    wait_for(lambda: d.batch(b["id"])["counts"]["succeeded"] >= N // 5, 60, what="progress")
    d.kill()  # mid-run: claimed and prefetched items stay `running` under the dead lease
    mid = item_states(db_url)
    assert sum(mid.values()) == N
    assert mid.get("succeeded", 0) < N, "the kill should land before the batch finished"

    d2 = daemons("fast", handlers=handlers, worker=worker)  # same name: reclaims at once
    done = d2.wait_status(b["id"], "completed", timeout=120)
    assert done["counts"] == {
        "total": N,
        "queued": 0,
        "running": 0,
        "succeeded": N,
        "failed": 0,
        "cancelled": 0,
    }
    assert item_states(db_url) == {"succeeded": N}
    out = d2.cli("doctor", "--config", str(d2.config_path))
    assert out.returncode == 0 and "no drift" in out.stdout, out.stdout + out.stderr


def test_sigkill_mid_run_of_many_small_batches_ends_each_exactly_once(
    daemons: Any, db_url: str
) -> None:
    """Claims and outcome writes settle dozens of small batches per statement: a
    kill in the middle must still leave every batch finished exactly once, with
    exact counts, its 'started' and 'finished' events written once each."""
    batches, size = 600, 5
    handlers = dict(DEFAULT_HANDLERS) | {
        "nap": {"type": "python", "target": "tests.handlers:sleeper", "timeout": "10s"}
    }
    worker = {"concurrency": 16}
    d: Daemon = daemons("small", handlers=handlers, worker=worker)
    ids = [d.submit("nap", [{"sleep": 0.05}] * size)["id"] for _ in range(batches)]
    total = batches * size
    wait_for(lambda: item_states(db_url).get("succeeded", 0) >= total // 5, 60, what="progress")
    d.kill()
    mid = item_states(db_url)
    assert sum(mid.values()) == total
    assert mid.get("succeeded", 0) < total, "the kill should land before the batches finished"

    d2 = daemons("small", handlers=handlers, worker=worker)  # same name: reclaims at once
    for bid in ids:
        done = d2.wait_status(bid, "completed", timeout=120)
        assert done["counts"]["succeeded"] == size, done
    assert item_states(db_url) == {"succeeded": total}

    async def events() -> dict[str, tuple[int, int, int]]:
        """Per action: (batches with it, fewest and most entries in one batch)."""
        conn = await asyncpg.connect(db_url)
        try:
            rows = await conn.fetch(
                "SELECT action, count(*) AS batches, min(n) AS lo, max(n) AS hi FROM ("
                "  SELECT action, batch_id, count(*) AS n FROM supervisor.batch_events"
                "   WHERE action IN ('created', 'started', 'finished') GROUP BY 1, 2) x"
                " GROUP BY action"
            )
            return {r["action"]: (r["batches"], r["lo"], r["hi"]) for r in rows}
        finally:
            await conn.close()

    once = (batches, 1, 1)
    assert asyncio.run(events()) == {"created": once, "started": once, "finished": once}
    out = d2.cli("doctor", "--config", str(d2.config_path))
    assert out.returncode == 0 and "no drift" in out.stdout, out.stdout + out.stderr
