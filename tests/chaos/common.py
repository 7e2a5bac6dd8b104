"""Shared pieces of the chaos tests: worker settings, run-log parsing, direct reads
of the database (to see what a client cannot: rows that must not exist) and the
``doctor`` check."""

from __future__ import annotations

import asyncio
import json
import pathlib
from collections import Counter
from typing import Any

import asyncpg

from tests.daemon import Daemon

TERMINAL = ("completed", "completed_with_errors", "failed", "cancelled")

# Short liveness intervals so reclaiming after a kill takes a second or two.
FAST_WORKER: dict[str, Any] = {
    "concurrency": 8,
    "poll_interval": "200ms",
    "heartbeat_interval": "200ms",
    "dead_after": "1500ms",
    "drain_timeout": "5s",
}

# A generous attempt budget: these tests count duplicate executions, they are not
# about exhausting attempts (an item caught in several kills must still succeed).
ECHO: dict[str, dict[str, Any]] = {
    "echo": {
        "type": "python",
        "target": "tests.handlers:echo",
        "timeout": "30s",
        "max_attempts": 20,
    }
}


def read_runlog(path: pathlib.Path) -> list[dict[str, Any]]:
    """Every line the test handlers wrote (one JSON object per event)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def starts_per_attempt(runs: list[dict[str, Any]]) -> Counter[tuple[str, int]]:
    return Counter((r["id"], r["attempt"]) for r in runs if r["event"] == "start")


def query(db_url: str, sql: str, *args: Any) -> list[dict[str, Any]]:
    """Rows of one statement run straight on PostgreSQL (test-side inspection and setup)."""

    async def go() -> list[dict[str, Any]]:
        conn = await asyncpg.connect(db_url)
        try:
            return [dict(r) for r in await conn.fetch(sql, *args)]
        finally:
            await conn.close()

    return asyncio.run(go())


def assert_no_drift(d: Daemon) -> None:
    """``batch-supervisor doctor`` finds every batch consistent with its items."""
    res = d.cli("doctor", "--config", str(d.config_path))
    assert res.returncode == 0, (res.returncode, res.stdout, res.stderr)
    assert "no drift" in res.stdout, res.stdout
