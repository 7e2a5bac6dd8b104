"""Delayed batches with real daemons and the database's clock: a batch reads
``scheduled`` with nothing attempted until its ``not_before``, no item starts
before it (times from the database), it starts then without waiting for a poll
(the daemons poll every 30 s here), PATCH to null starts it at once, two
daemons promote each batch once, a batch whose time passed while every daemon
was down (killed) runs when one comes back, streams see the release, and the
metrics do not count scheduled work as queued."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import Any

from tests.conftest import DaemonFactory
from tests.daemon import wait_for
from tests.system.test_operations import metrics_of
from tests.test_api import db_rows
from tests.test_controls import read_events

SLOW_POLL = {"poll_interval": "30s"}
# Pick-up is meant to be within a second of not_before; this bound only has to
# tell the delayed starter's timer from the 30 s poll on a loaded test machine.
PROMPT_S = 5.0


def db_now(db_url: str) -> datetime:
    return db_rows(db_url, "SELECT now() AS t")[0]["t"]  # type: ignore[no-any-return]


def starts(db_url: str, batch_id: str) -> list[Any]:
    """Each item's attempts and start, and the batch's not_before, from the database."""
    return db_rows(
        db_url,
        "SELECT i.attempts, i.started_at, b.not_before FROM supervisor.items i"
        " JOIN supervisor.batches b ON b.id = i.batch_id WHERE i.batch_id = $1 ORDER BY i.id",
        uuid.UUID(batch_id),
    )


def events(db_url: str, batch_id: str, action: str) -> int:
    rows = db_rows(
        db_url,
        "SELECT count(*) AS n FROM supervisor.batch_events WHERE batch_id = $1 AND action = $2",
        uuid.UUID(batch_id),
        action,
    )
    return int(rows[0]["n"])


def test_a_batch_two_seconds_ahead_is_scheduled_then_starts_at_its_time(
    daemons: DaemonFactory, db_url: str
) -> None:
    d = daemons(worker=SLOW_POLL)
    not_before = db_now(db_url) + timedelta(seconds=2)
    b = d.submit("echo", list(range(20)), not_before=not_before.isoformat())
    assert b["status"] == "scheduled", b
    seen = d.batch(b["id"])
    assert seen["status"] == "scheduled" and seen["counts"]["queued"] == 20, seen
    assert all(r["attempts"] == 0 for r in starts(db_url, b["id"]))

    d.wait_status(b["id"], "completed", timeout=20)
    rows = starts(db_url, b["id"])
    assert all(r["attempts"] == 1 for r in rows), rows  # each start is its first
    assert all(r["started_at"] >= r["not_before"] == not_before for r in rows), rows
    first = min(r["started_at"] for r in rows)
    assert (first - not_before).total_seconds() < PROMPT_S, (first, not_before)
    assert events(db_url, b["id"], "not_before_reached") == 1


def test_patch_to_null_starts_a_scheduled_batch_at_once(
    daemons: DaemonFactory, db_url: str
) -> None:
    d = daemons(worker=SLOW_POLL)
    b = d.submit("echo", [1, 2, 3], not_before=(db_now(db_url) + timedelta(hours=1)).isoformat())
    assert b["status"] == "scheduled", b
    patched_at = db_now(db_url)
    code, body, _ = d.api("PATCH", f"/v1/batches/{b['id']}", {"not_before": None})
    assert code == 200 and body["status"] != "scheduled", body
    d.wait_status(b["id"], "completed", timeout=PROMPT_S)
    rows = starts(db_url, b["id"])
    assert all(r["started_at"] >= patched_at for r in rows), rows


def test_two_daemons_promote_each_batch_once(daemons: DaemonFactory, db_url: str) -> None:
    d1 = daemons("w1", worker=SLOW_POLL)
    d2 = daemons("w2", worker=SLOW_POLL)
    not_before = (db_now(db_url) + timedelta(seconds=2)).isoformat()
    ids = [
        (d1 if i % 2 else d2).submit("echo", [i, i], not_before=not_before)["id"] for i in range(30)
    ]
    for bid in ids:
        d1.wait_status(bid, "completed", timeout=20)
    for bid in ids:
        rows = starts(db_url, bid)
        assert all(r["attempts"] == 1 and r["started_at"] >= r["not_before"] for r in rows)
        assert events(db_url, bid, "not_before_reached") == 1, bid


def test_a_batch_due_while_every_daemon_was_down_runs_when_one_comes_back(
    daemons: DaemonFactory, db_url: str
) -> None:
    d = daemons(worker=SLOW_POLL)
    not_before = db_now(db_url) + timedelta(seconds=2)
    b = d.submit("echo", [1, 2], not_before=not_before.isoformat())
    d.kill()  # SIGKILL, before it is due
    wait_for(lambda: db_now(db_url) > not_before + timedelta(seconds=1), 10, 0.1, "its time")
    status = db_rows(
        db_url, "SELECT status FROM supervisor.batches WHERE id = $1", uuid.UUID(b["id"])
    )
    assert status[0]["status"] == "scheduled", status  # nobody was up to start it
    d.start()  # polling every 30 s: it starts the batch as it comes up
    d.wait_status(b["id"], "completed", timeout=PROMPT_S)
    assert all(r["attempts"] == 1 for r in starts(db_url, b["id"]))


def test_scheduled_work_is_not_queued_work_in_the_metrics(
    daemons: DaemonFactory, db_url: str
) -> None:
    """A batch scheduled for later is not lag (BatchQueueLagging would fire on a
    batch that is exactly on time); its age shows under its own status."""
    d = daemons(extra={"server": {"metrics_sample_interval": "200ms"}})
    d.submit("echo", [1, 2, 3], not_before=(db_now(db_url) + timedelta(hours=1)).isoformat())
    p = "batch_supervisor_"

    def sampled() -> dict[str, float] | None:
        m = metrics_of(d)
        return (
            m if m.get(p + 'oldest_unfinished_batch_seconds{status="scheduled"}', 0) > 0 else None
        )

    m = wait_for(sampled, 10, 0.1, "a sample with the scheduled batch")
    assert m.get(p + 'items_queued{handler="echo"}', 0) == 0, m
    assert m.get(p + 'queue_lag_seconds{handler="echo"}', 0) == 0, m


def test_a_stream_opened_while_scheduled_sees_it_released_and_finished(
    daemons: DaemonFactory, db_url: str
) -> None:
    d = daemons(worker=SLOW_POLL)
    b = d.submit("echo", [1], not_before=(db_now(db_url) + timedelta(seconds=2)).isoformat())
    events = read_events(f"{d.url}/v1/batches/{b['id']}/events")
    statuses = [data["status"] for kind, data, _, _ in events if kind == "snapshot"]
    assert statuses[0] == "scheduled" and statuses[-1] == "completed", statuses
    assert events[-1][0] == "end", events
