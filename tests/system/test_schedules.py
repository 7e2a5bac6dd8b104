"""Schedules across real daemons: N daemons fire exactly one batch per slot,
with no leader, and slots missed while every daemon was down are handled by
the catch-up policy. The schedules fire every second (cron with a seconds
field); every expectation is computed from the slot times and the database's
clock, never from the test's own clock or a sleep."""

from __future__ import annotations

import itertools
from datetime import datetime, timedelta
from typing import Any

from tests.conftest import DaemonFactory
from tests.daemon import wait_for
from tests.test_api import db_rows

SECOND = timedelta(seconds=1)


def every_second(**kw: Any) -> dict[str, Any]:
    return {
        "schedules": {
            "tick": {
                "cron": "* * * * * *",
                "handler": "echo",
                "items": [{"n": 1}],
                "overlap": "queue",
            }
            | kw
        }
    }


def runs(db_url: str) -> list[Any]:
    return db_rows(
        db_url,
        "SELECT slot_at, kind, outcome, batch_id, worker FROM supervisor.schedule_runs"
        " WHERE schedule = 'tick' ORDER BY slot_at",
    )


def batches_per_slot(db_url: str) -> dict[str, int]:
    """The schedule's batches counted by the slot their metadata names (the batch
    side, independent of schedule_runs)."""
    rows = db_rows(
        db_url,
        "SELECT metadata->'schedule'->>'slot_at' AS slot, count(*) AS n FROM supervisor.batches"
        " WHERE metadata->'schedule'->>'name' = 'tick' GROUP BY 1",
    )
    return {r["slot"]: r["n"] for r in rows}


def gaps(slots: list[datetime]) -> list[tuple[datetime, datetime]]:
    """Successive slots further apart than one second."""
    return [(a, b) for a, b in itertools.pairwise(slots) if b - a != SECOND]


def rfc(t: datetime) -> str:
    """A slot time as the API and batch metadata write it."""
    return t.isoformat().replace("+00:00", "Z")


def db_now(db_url: str) -> datetime:
    now: datetime = db_rows(db_url, "SELECT now() AS now")[0]["now"]
    return now


def created(db_url: str, at_least: int, after: datetime | None = None) -> list[Any]:
    """Wait until the schedule has ``at_least`` created runs (after ``after``)."""

    def enough() -> list[Any] | None:
        got = [
            r
            for r in runs(db_url)
            if r["outcome"] == "created" and (after is None or r["slot_at"] > after)
        ]
        return got if len(got) >= at_least else None

    return wait_for(enough, 30 + at_least * 2, 0.1, f"{at_least} created runs")


def wait_db_clock_past(db_url: str, t: datetime) -> None:
    wait_for(lambda: db_now(db_url) > t, 30, 0.05, f"the database clock past {t}")


def test_two_daemons_fire_exactly_one_batch_per_slot_without_gaps(
    daemons: DaemonFactory, db_url: str
) -> None:
    extra = every_second(catch_up="latest")
    d1 = daemons("d1", extra=extra)
    d2 = daemons("d2", extra=extra)
    created(db_url, 30)  # 30 s of a schedule firing every second
    for d in (d1, d2):
        assert d.stop() == 0, d.log()
    got = runs(db_url)
    slots = [r["slot_at"] for r in got]
    assert all(s.microsecond == 0 for s in slots), slots
    # No gap: from the first slot to the last, every second has its run ...
    assert gaps(slots) == [], slots
    assert {r["outcome"] for r in got} == {"created"}, got
    # ... and exactly one batch, whichever daemon won it.
    per_slot = batches_per_slot(db_url)
    assert sorted(per_slot) == sorted(rfc(s) for s in slots), (per_slot, slots)
    assert set(per_slot.values()) == {1}, per_slot
    since = db_rows(db_url, "SELECT since FROM supervisor.schedules WHERE name = 'tick'")
    assert slots[0] > since[0]["since"]  # nothing before the schedule was first seen
    # Both daemons were there to race for every slot (the winner is whoever was first).
    assert {r["worker"] for r in got} <= {"d1", "d2"}


def down_for_three_slots(daemons: DaemonFactory, db_url: str, extra: dict[str, Any]) -> datetime:
    """Run two daemons until the schedule fired twice, stop both, let at least
    three slots pass by the database's clock, start both again; the last slot
    before. Both restarted daemons compute the catch-up, each from its own clock
    reading: still one catch-up run."""
    ds = [daemons(name, extra=extra) for name in ("d1", "d2")]
    created(db_url, 2)
    for d in ds:
        assert d.stop() == 0, d.log()
    last: datetime = max(r["slot_at"] for r in runs(db_url))
    wait_db_clock_past(db_url, last + 4 * SECOND)
    for d in ds:
        d.start(wait=False)
    for d in ds:
        d.wait_ready()
    return last


def test_catch_up_latest_fires_only_the_newest_slot_missed_while_every_daemon_was_down(
    daemons: DaemonFactory, db_url: str
) -> None:
    last = down_for_three_slots(daemons, db_url, every_second(catch_up="latest"))
    created(db_url, 3, after=last)
    after = [r for r in runs(db_url) if r["slot_at"] > last]
    first = after[0]
    # The first run after the outage is the catch-up of the newest missed slot:
    # the slots between the last run and it were passed over, not fired late.
    assert first["kind"] == "catch_up" and first["outcome"] == "created", after
    assert first["slot_at"] >= last + 3 * SECOND, (last, after)
    assert [r["kind"] for r in after[1:]] == ["scheduled"] * (len(after) - 1), after
    slots = [r["slot_at"] for r in after]
    assert gaps(slots) == [], slots
    per_slot = batches_per_slot(db_url)
    missed = [last + n * SECOND for n in range(1, 100) if last + n * SECOND < first["slot_at"]]
    assert len(missed) >= 2
    assert not [s for s in missed if rfc(s) in per_slot], per_slot
    assert per_slot[rfc(first["slot_at"])] == 1
    assert [r["kind"] for r in runs(db_url)].count("catch_up") == 1


def test_catch_up_skip_fires_none_of_the_slots_missed_while_every_daemon_was_down(
    daemons: DaemonFactory, db_url: str
) -> None:
    last = down_for_three_slots(daemons, db_url, every_second(catch_up="skip"))
    created(db_url, 3, after=last)
    after = [r for r in runs(db_url) if r["slot_at"] > last]
    # The newest missed slot is recorded as missed (where the schedule's state
    # says so), without a batch; the first batch after the outage is on time.
    assert after[0]["outcome"] == "missed" and after[0]["batch_id"] is None, after
    assert after[0]["slot_at"] >= last + 3 * SECOND, (last, after)
    fired = [r for r in after if r["outcome"] == "created"]
    assert {r["kind"] for r in fired} == {"scheduled"}, after
    per_slot = batches_per_slot(db_url)
    passed = [last + n * SECOND for n in range(1, 100) if last + n * SECOND < fired[0]["slot_at"]]
    assert len(passed) >= 3
    assert not [s for s in passed if rfc(s) in per_slot], per_slot


def test_a_killed_daemon_leaves_no_slot_to_the_other_unfired(
    daemons: DaemonFactory, db_url: str
) -> None:
    extra = every_second(catch_up="latest")
    d1 = daemons("d1", extra=extra)
    d2 = daemons("d2", extra=extra)
    created(db_url, 3)
    d1.kill()  # mid-whatever: a slot transaction it had open is rolled back
    last = max(r["slot_at"] for r in runs(db_url))
    created(db_url, 5, after=last)
    assert d2.stop() == 0, d2.log()
    got = runs(db_url)
    slots = [r["slot_at"] for r in got]
    assert gaps(slots) == [], slots
    assert set(batches_per_slot(db_url).values()) == {1}
