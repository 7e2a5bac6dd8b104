"""Firing a schedule's slot against the database, without daemons: the slot and
its batch commit together or not at all, a slot is claimed once, never after a
newer one, never for a paused schedule, and a refused fire writes nothing."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from supervisor import config, schedules, store
from supervisor import db as dbm
from tests.integration.support import HANDLER

pytestmark = pytest.mark.anyio

T = datetime(2030, 1, 1, 2, 0, tzinfo=UTC)


def _cfg(**kw: object) -> config.Config:
    return config.from_mapping(
        {
            "handlers": {HANDLER: {"type": "python", "target": "supervisor.examples:echo"}},
            "schedules": {"s": {"cron": "0 2 * * *", "handler": HANDLER, "items": [1]} | kw},
        }
    )


async def _fire(db: dbm.Database, cfg: config.Config, at: datetime) -> schedules.Fired:
    plan = schedules.build_all(cfg)["s"]
    return await schedules.fire(db, cfg, plan, slot_at=at, kind="scheduled", worker="w")


async def _state(conn: asyncpg.Connection) -> tuple[int, int]:
    r = await conn.fetchrow(
        "SELECT (SELECT count(*) FROM supervisor.schedule_runs) AS runs,"
        " (SELECT count(*) FROM supervisor.batches) AS batches"
    )
    assert r is not None
    return r["runs"], r["batches"]


async def _ready(db: dbm.Database, conn: asyncpg.Connection) -> None:
    await store.Queries(db).ensure_schedules(["s"])
    await conn.execute("UPDATE supervisor.schedules SET since = $1", T - timedelta(days=30))


async def test_a_slot_is_fired_once_and_an_older_slot_never_after_a_newer_one(
    db: dbm.Database, conn: asyncpg.Connection
) -> None:
    cfg = _cfg(overlap="queue")
    await _ready(db, conn)
    first = await _fire(db, cfg, T)
    assert first.outcome == "created" and first.batch is not None
    assert (await _fire(db, cfg, T)).outcome == "taken"
    # A slow daemon's older slot (a catch-up computed from an earlier clock
    # reading) after the newer one was fired: refused, nothing written.
    assert (await _fire(db, cfg, T - timedelta(days=1))).outcome == "taken"
    assert await _state(conn) == (1, 1)
    assert (await _fire(db, cfg, T + timedelta(days=1))).outcome == "created"
    assert await _state(conn) == (2, 2)


async def test_no_slot_of_a_paused_schedule_nor_before_its_since(
    db: dbm.Database, conn: asyncpg.Connection
) -> None:
    cfg = _cfg()
    await _ready(db, conn)
    q = store.Queries(db)
    await q.set_schedule_paused("s", paused=True, actor="ops")
    assert (await _fire(db, cfg, T)).outcome == "taken"
    await q.set_schedule_paused("s", paused=False, actor="ops")  # since = now
    assert (await _fire(db, cfg, T - timedelta(days=3650))).outcome == "taken"
    assert await _state(conn) == (0, 0)


async def test_a_refused_skip_writes_the_slot_as_skipped_and_no_batch(
    db: dbm.Database, conn: asyncpg.Connection
) -> None:
    cfg = _cfg(overlap="skip")
    await _ready(db, conn)
    first = await _fire(db, cfg, T)
    assert first.outcome == "created" and first.batch is not None
    skipped = await _fire(db, cfg, T + timedelta(days=1))
    assert skipped.outcome == "skipped" and first.batch["id"] in (skipped.detail or "")
    assert await _state(conn) == (2, 1)
