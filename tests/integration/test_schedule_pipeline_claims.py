"""Firing a pipeline schedule's slot against the database, without daemons: the
slot, its pipeline run and the run's first stage commit together or not at all;
a slot is claimed once; a run holding the schedule's exclusive key makes the
next slot skipped with nothing else written; the slot row names its run."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from supervisor import config, pipeline_runs, schedules, store
from supervisor import db as dbm
from tests.integration.support import HANDLER

pytestmark = pytest.mark.anyio

T = datetime(2030, 1, 1, 2, 0, tzinfo=UTC)


def _cfg(**kw: object) -> config.Config:
    return config.from_mapping(
        {
            "handlers": {HANDLER: {"type": "python", "target": "supervisor.examples:echo"}},
            "pipelines": {"p": {"stages": [{"name": "first", "handler": HANDLER}]}},
            "schedules": {"s": {"cron": "0 2 * * *", "pipeline": "p", "items": [1, 2]} | kw},
        }
    )


async def _fire(db: dbm.Database, cfg: config.Config, at: datetime) -> schedules.Fired:
    plan = schedules.build_all(cfg)["s"]
    return await schedules.fire(db, cfg, plan, slot_at=at, kind="scheduled", worker="w")


async def _state(conn: asyncpg.Connection) -> tuple[int, int, int]:
    r = await conn.fetchrow(
        "SELECT (SELECT count(*) FROM supervisor.schedule_runs) AS slots,"
        " (SELECT count(*) FROM supervisor.pipeline_runs) AS runs,"
        " (SELECT count(*) FROM supervisor.batches) AS batches"
    )
    assert r is not None
    return r["slots"], r["runs"], r["batches"]


async def _ready(db: dbm.Database, conn: asyncpg.Connection) -> None:
    await store.Queries(db).ensure_schedules(["s"])
    await conn.execute("UPDATE supervisor.schedules SET since = $1", T - timedelta(days=30))


async def test_a_slot_fires_one_run_with_its_first_stage_and_the_slot_names_it(
    db: dbm.Database, conn: asyncpg.Connection
) -> None:
    cfg = _cfg(metadata={"owner": "ops"}, tenant="A")
    await _ready(db, conn)
    first = await _fire(db, cfg, T)
    assert first.outcome == "created" and first.batch is None and first.run is not None
    run = first.run
    assert run["pipeline"] == "p" and run["tenant"] == "A" and run["status"] == "running"
    assert run["exclusive_key"] == "schedule:s"
    assert run["metadata"] == {
        "owner": "ops",
        "schedule": {"name": "s", "slot_at": "2030-01-01T02:00:00Z", "kind": "scheduled"},
    }
    assert run["stages"][0]["batch_id"] is not None
    assert (await _fire(db, cfg, T)).outcome == "taken"
    assert await _state(conn) == (1, 1, 1)
    row = await conn.fetchrow("SELECT batch_id, pipeline_run_id FROM supervisor.schedule_runs")
    assert row is not None
    assert row["batch_id"] is None and str(row["pipeline_run_id"]) == run["id"]
    (last,) = await store.Queries(db).schedule_last_runs(["s"])
    assert str(last.pipeline_run_id) == run["id"] and last.pipeline_run_status == "running"


async def test_a_running_run_makes_the_next_slot_skipped_and_writes_nothing_else(
    db: dbm.Database, conn: asyncpg.Connection
) -> None:
    cfg = _cfg()
    await _ready(db, conn)
    first = await _fire(db, cfg, T)
    assert first.run is not None
    skipped = await _fire(db, cfg, T + timedelta(days=1))
    assert skipped.outcome == "skipped" and first.run["id"] in (skipped.detail or ""), skipped
    assert await _state(conn) == (2, 1, 1)
    outcomes = await conn.fetch(
        "SELECT outcome, pipeline_run_id FROM supervisor.schedule_runs ORDER BY slot_at"
    )
    assert [(r["outcome"], r["pipeline_run_id"] is None) for r in outcomes] == [
        ("created", False),
        ("skipped", True),
    ]
    # Once the run has ended the key is free: the slot after fires.
    await conn.execute(
        "UPDATE supervisor.pipeline_runs SET status = 'cancelled', finished_at = now()"
    )
    assert (await _fire(db, cfg, T + timedelta(days=2))).outcome == "created"
    assert await _state(conn) == (3, 2, 2)


async def test_a_refused_first_stage_leaves_neither_the_slot_nor_the_run(
    db: dbm.Database, conn: asyncpg.Connection
) -> None:
    cfg = _cfg()
    await _ready(db, conn)
    # The first stage's handler is gone from this daemon's configuration: the
    # run cannot be made, and the slot's claim is undone with it.
    broken = config.Config(
        **{f: getattr(cfg, f) for f in ("database", "server", "worker", "schedules", "pipelines")}
    )
    with pytest.raises(pipeline_runs.StageUnavailable, match="no handler"):
        await _fire(db, broken, T)
    assert await _state(conn) == (0, 0, 0)
    assert (await _fire(db, cfg, T)).outcome == "created"


async def test_items_from_gives_the_first_stage_its_items_and_its_failure_is_the_slots(
    db: dbm.Database, conn: asyncpg.Connection
) -> None:
    await _ready(db, conn)
    cfg = _cfg(items=[], items_from="tests.handlers:schedule_items")
    fired = await _fire(db, cfg, T)
    assert fired.run is not None, fired
    batch_id = fired.run["stages"][0]["batch_id"]
    keys = await conn.fetch(
        "SELECT key, payload FROM supervisor.items WHERE batch_id = $1::uuid", batch_id
    )
    assert [r["key"] for r in keys] == ["scheduled"], keys
    failing = _cfg(items=[], items_from="tests.handlers:schedule_items_fail")
    failed = await _fire(db, failing, T + timedelta(days=1))
    assert failed.outcome == "failed" and "no portfolios for s" in (failed.detail or "")
    assert await _state(conn) == (2, 1, 1)
