"""Delayed batches over real HTTP against a real daemon: ``not_before`` is
validated (422 naming it, nothing written), a batch submitted with a future one
is ``scheduled`` (listed, filtered, cancellable, holding its exclusive key, its
items never claimed), PATCH moves it while the batch is scheduled (409 after),
and pause and ``after`` combine with it as documented in README."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from tests.conftest import DaemonFactory
from tests.daemon import Daemon
from tests.test_api import assert_problem, batch_count, db_rows


def later(**delta: float) -> str:
    """A time far enough ahead that no test reaches it."""
    return (datetime.now(UTC) + timedelta(**delta)).isoformat()


def at(text: str | None) -> datetime:
    assert text is not None
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def post(d: Daemon, body: Any) -> tuple[int, Any, dict[str, str]]:
    return d.api("POST", "/v1/batches", body)


def patch(d: Daemon, batch_id: str, body: Any) -> tuple[int, Any, dict[str, str]]:
    return d.api("PATCH", f"/v1/batches/{batch_id}", body)


def item_rows(db_url: str, batch_id: str) -> list[Any]:
    return db_rows(
        db_url,
        "SELECT status, attempts, run_after, started_at FROM supervisor.items"
        " WHERE batch_id = $1 ORDER BY id",
        uuid.UUID(batch_id),
    )


BAD = [
    "2026-12-24T18:00:00",  # no offset
    "2026-12-24",
    "tomorrow",
    "2026-13-01T00:00:00Z",
    "2026-12-24T18:00:60Z",
    "2026-12-24T18:00:00+25:00",
    "0001-01-01T00:00:00+01:00",  # before year 1 in UTC
    1767290400,
    True,
    {"at": "2026-12-24T18:00:00Z"},
    "",
]


def test_a_bad_not_before_is_a_422_naming_it_and_writes_nothing(
    daemons: DaemonFactory, db_url: str
) -> None:
    d = daemons()
    before = batch_count(db_url)
    for bad in BAD:
        resp = post(d, {"handler": "echo", "items": [1], "not_before": bad})
        assert_problem(resp, 422, "/not_before")
    assert batch_count(db_url) == before
    b = d.submit("echo", [1], not_before=later(hours=1))
    for bad in BAD:
        assert_problem(patch(d, b["id"], {"not_before": bad}), 422, "/not_before")
    assert d.batch(b["id"])["not_before"] == b["not_before"]


def test_a_scheduled_batch_is_listed_filtered_and_never_claimed_until_cancelled(
    daemons: DaemonFactory, db_url: str
) -> None:
    d = daemons()
    when = later(hours=1)
    b = d.submit("echo", [1, 2, 3], not_before=when)
    assert b["status"] == "scheduled", b
    assert at(b["not_before"]) == at(when), b
    other = d.submit("echo", [1])
    d.wait_status(other["id"], "completed")  # the daemon claims, just not this batch

    assert d.batch(b["id"])["status"] == "scheduled"
    code, page, _ = d.api("GET", "/v1/batches?status=scheduled")
    assert code == 200 and [x["id"] for x in page["batches"]] == [b["id"]], page
    rows = item_rows(db_url, b["id"])
    assert [(r["status"], r["attempts"]) for r in rows] == [("queued", 0)] * 3, rows
    # Its items carry the time too: the claim's own run_after check holds them.
    assert all(r["run_after"] == at(when) for r in rows), rows

    code, body, _ = d.api("POST", f"/v1/batches/{b['id']}/cancel")
    assert code == 200 and body["status"] == "cancelled", body
    assert body["counts"]["cancelled"] == 3 and body["started_at"] is None, body
    code, page, _ = d.api("GET", "/v1/batches?status=scheduled")
    assert code == 200 and page["batches"] == [], page


def test_a_past_not_before_means_now(daemons: DaemonFactory) -> None:
    d = daemons()
    past = (datetime.now(UTC) - timedelta(days=3)).isoformat()
    b = d.submit("echo", [1, 2], not_before=past)
    assert b["status"] == "queued", b
    done = d.wait_status(b["id"], "completed")
    assert at(done["not_before"]) == at(past), done


def test_patch_moves_not_before_while_scheduled_then_409(
    daemons: DaemonFactory, db_url: str
) -> None:
    d = daemons()
    b = d.submit("echo", [1, 2], not_before=later(hours=1))
    moved = later(hours=2)
    code, body, _ = patch(d, b["id"], {"not_before": moved, "priority": 3})
    assert code == 200 and body["status"] == "scheduled", body
    assert at(body["not_before"]) == at(moved) and body["priority"] == 3, body
    assert all(r["run_after"] == at(moved) for r in item_rows(db_url, b["id"]))

    # null (or a past time) means now: it starts at once.
    code, body, _ = patch(d, b["id"], {"not_before": None})
    assert code == 200 and body["status"] in ("queued", "running", "completed"), body
    assert body["not_before"] is None, body
    d.wait_status(b["id"], "completed")
    assert_problem(patch(d, b["id"], {"not_before": later(hours=1)}), 409)

    gate = d.submit("sleeper", [{"sleep": 3600}])
    d.wait_status(gate["id"], "running")
    body = assert_problem(patch(d, gate["id"], {"not_before": later(hours=1)}), 409)
    assert "running" in body["detail"], body
    # The other fields of a running batch still change (not_before alone is refused).
    code, body, _ = patch(d, gate["id"], {"priority": 2})
    assert code == 200 and body["priority"] == 2 and body["not_before"] is None, body
    d.api("POST", f"/v1/batches/{gate['id']}/cancel")


def test_a_paused_scheduled_batch_stays_paused_when_due(daemons: DaemonFactory) -> None:
    d = daemons()
    b = d.submit("echo", [1], not_before=later(hours=1))
    code, body, _ = d.api("POST", f"/v1/batches/{b['id']}/pause")
    assert code == 200 and body["status"] == "scheduled", body
    code, body, _ = patch(d, b["id"], {"not_before": None})
    assert code == 200 and body["status"] == "paused", body
    assert d.batch(b["id"])["counts"]["queued"] == 1
    code, body, _ = d.api("POST", f"/v1/batches/{b['id']}/resume")
    assert code == 200, body
    d.wait_status(b["id"], "completed")


def test_after_and_not_before_both_hold_before_it_starts(daemons: DaemonFactory) -> None:
    d = daemons()
    dep = d.submit("echo", [1], not_before=later(hours=1))
    b = d.submit("echo", [1, 2], after=[dep["id"]], not_before=later(hours=1))
    assert b["status"] == "waiting", b  # its dependency first
    # The dependency ends; the dependent still waits for its time.
    code, _, _ = patch(d, dep["id"], {"not_before": None})
    assert code == 200
    d.wait_status(dep["id"], "completed")
    assert d.wait_status(b["id"], "scheduled")["counts"]["queued"] == 2
    code, body, _ = patch(d, b["id"], {"not_before": None})
    assert code == 200, body
    d.wait_status(b["id"], "completed")

    # The other way round: its time has come, its dependency has not ended.
    dep2 = d.submit("echo", [1], not_before=later(hours=1))
    c = d.submit("echo", [1], after=[dep2["id"]])
    code, body, _ = patch(d, c["id"], {"not_before": later(hours=1)})
    assert code == 200 and body["status"] == "waiting", body
    code, body, _ = patch(d, c["id"], {"not_before": None})
    assert code == 200 and body["status"] == "waiting", body
    patch(d, dep2["id"], {"not_before": None})
    d.wait_status(c["id"], "completed")


def test_a_scheduled_batch_holds_its_exclusive_key_and_is_an_idempotent_repeat(
    daemons: DaemonFactory,
) -> None:
    d = daemons()
    when = later(hours=1)
    body = {"handler": "echo", "items": [1], "not_before": when, "idempotency_key": "n-1"}
    code, first, _ = post(d, body | {"exclusive_key": "k"})
    assert code == 201 and first["status"] == "scheduled", first
    problem = assert_problem(post(d, {"handler": "echo", "items": [1], "exclusive_key": "k"}), 409)
    assert problem["active_batch_id"] == first["id"], problem

    # The same instant in another offset is the same content; another time is not.
    same = at(when).astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f+00:00")
    code, again, _ = post(d, body | {"exclusive_key": "k", "not_before": same})
    assert code == 200 and again["id"] == first["id"], again
    assert_problem(post(d, body | {"exclusive_key": "k", "not_before": later(hours=3)}), 409)
    d.api("POST", f"/v1/batches/{first['id']}/cancel")
    code, queued, _ = post(d, {"handler": "echo", "items": [1], "exclusive_key": "k"})
    assert code == 201, queued


def test_a_large_scheduled_batch_gets_its_time_on_every_item_and_a_retry_runs_it_now(
    daemons: DaemonFactory, db_url: str
) -> None:
    """Past 1,000 items the items come by COPY: they carry not_before as well."""
    d = daemons()
    when = later(hours=1)
    b = d.submit("echo", list(range(1500)), not_before=when)
    assert b["status"] == "scheduled", b
    rows = db_rows(
        db_url,
        "SELECT count(*) FILTER (WHERE run_after = $2) AS at, count(*) AS n"
        " FROM supervisor.items WHERE batch_id = $1",
        uuid.UUID(b["id"]),
        at(when),
    )
    assert (rows[0]["at"], rows[0]["n"]) == (1500, 1500), rows
    code, body, _ = d.api("POST", f"/v1/batches/{b['id']}/cancel")
    assert code == 200 and body["status"] == "cancelled", body
    # An ended batch no longer waits for its time: a retry runs it now.
    code, body, _ = d.api("POST", f"/v1/batches/{b['id']}/retry", {"include_cancelled": True})
    assert code == 200 and body["status"] != "scheduled", body
    done = d.wait_status(b["id"], "completed", timeout=60)
    assert done["counts"]["succeeded"] == 1500, done
