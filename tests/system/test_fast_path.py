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
