"""A pipeline schedule across two real daemons sharing the database: exactly one
pipeline run per slot, with no leader, and every run's stages run to completion.
The schedule fires every second (cron with a seconds field); expectations come
from the slot rows and the runs' own metadata, never from the test's clock."""

from __future__ import annotations

from collections import Counter
from typing import Any

from tests.conftest import DaemonFactory
from tests.system.test_schedules import gaps, rfc
from tests.test_api import db_rows
from tests.test_pipelines import HANDLERS, wait_run
from tests.test_schedule_pipelines import pipeline_schedule, slot_rows, wait_slots

SLOTS = 6  # slots fired while both daemons race for them (about as many seconds)


def runs_per_slot(db_url: str) -> Counter[str]:
    """The schedule's pipeline runs counted by the slot their metadata names (the
    run side, independent of schedule_runs)."""
    rows = db_rows(
        db_url,
        "SELECT metadata->'schedule'->>'slot_at' AS slot FROM supervisor.pipeline_runs"
        " WHERE metadata->'schedule'->>'name' = 'nightly'",
    )
    return Counter(r["slot"] for r in rows)


def test_two_daemons_start_exactly_one_pipeline_run_per_slot(
    daemons: DaemonFactory, db_url: str
) -> None:
    extra: dict[str, Any] = pipeline_schedule(catch_up="latest")
    d1 = daemons("d1", handlers=HANDLERS, extra=extra)
    d2 = daemons("d2", handlers=HANDLERS, extra=extra)
    wait_slots(db_url, SLOTS, "created")
    for d in (d1, d2):
        assert d.stop() == 0, d.log()
    got = slot_rows(db_url)
    slots = [r["slot_at"] for r in got]
    # Every second from the first slot to the last has its one row ...
    assert gaps(slots) == [], slots
    assert len(set(slots)) == len(slots)
    # ... a created slot names one run and exactly one run names it; a slot
    # skipped (the previous run had not ended within the second) names none.
    assert {r["outcome"] for r in got} <= {"created", "skipped"}, got
    created = [r for r in got if r["outcome"] == "created"]
    assert len(created) >= SLOTS
    per_slot = runs_per_slot(db_url)
    assert sorted(per_slot) == sorted(rfc(r["slot_at"]) for r in created), (per_slot, got)
    assert set(per_slot.values()) == {1}, per_slot
    assert all(r["pipeline_run_id"] is not None for r in created), created
    # The runs the daemons were stopped in the middle of finish once one is back.
    d1.start()
    for r in created:
        run = wait_run(d1, str(r["pipeline_run_id"]), timeout=60)
        assert run["status"] == "completed", run
        assert [s["status"] for s in run["stages"]] == ["completed"] * 3, run
