"""Schedules over real HTTP against a real daemon: GET /v1/schedules shows the
next fire time, the last slot, its batch and status; pause is durable (in the
database, across a restart) and resume does not fire the slots passed while
paused; run-now is an extra, manual run outside the slot sequence; the overlap
policies skip, cancel and queue on the schedule's exclusive key. The schedules
fire every second; expectations are compared with the database's clock."""

from __future__ import annotations

import hashlib
import itertools
from datetime import datetime, timedelta
from typing import Any

from tests.conftest import DaemonFactory
from tests.daemon import DEFAULT_HANDLERS, Daemon, wait_for
from tests.test_api import assert_problem, db_rows

SECOND = timedelta(seconds=1)


def schedule(name: str = "tick", **kw: Any) -> dict[str, Any]:
    return {
        "schedules": {name: {"cron": "* * * * * *", "handler": "echo", "items": [{"n": 1}]} | kw}
    }


def show(d: Daemon, name: str = "tick") -> dict[str, Any]:
    code, body, _ = d.api("GET", f"/v1/schedules/{name}")
    assert code == 200, (code, body)
    return dict(body)


def slot_runs(db_url: str, name: str = "tick") -> list[Any]:
    return db_rows(
        db_url,
        "SELECT id, slot_at, kind, outcome, batch_id, detail FROM supervisor.schedule_runs"
        " WHERE schedule = $1 AND kind <> 'manual' ORDER BY slot_at",
        name,
    )


def db_now(db_url: str) -> datetime:
    now: datetime = db_rows(db_url, "SELECT now() AS now")[0]["now"]
    return now


def wait_clock_past(db_url: str, t: datetime) -> None:
    wait_for(lambda: db_now(db_url) > t, 30, 0.05, f"the database clock past {t}")


def wait_runs(db_url: str, n: int, name: str = "tick", outcome: str = "created") -> list[Any]:
    def enough() -> list[Any] | None:
        got = [r for r in slot_runs(db_url, name) if r["outcome"] == outcome]
        return got if len(got) >= n else None

    return wait_for(enough, 30, 0.05, f"{n} {outcome} runs of {name}")


def iso(t: str) -> datetime:
    return datetime.fromisoformat(t)


def test_a_schedule_shows_its_next_fire_time_and_last_slot_with_batch_and_status(
    daemons: DaemonFactory, db_url: str
) -> None:
    d = daemons(extra=schedule(timezone="Europe/Zurich", metadata={"owner": "nightly"}))
    code, listing, _ = d.api("GET", "/v1/schedules")
    assert code == 200 and [s["name"] for s in listing["schedules"]] == ["tick"], listing

    def completed() -> dict[str, Any] | None:
        sc = show(d)
        last = sc["last_slot"]
        return sc if last and last["batch_status"] == "completed" else None

    sc = wait_for(completed, 20, 0.05, "a completed slot")
    last = sc["last_slot"]
    assert sc["cron"] == "* * * * * *" and sc["timezone"] == "Europe/Zurich"
    assert sc["paused"] is False and sc["exclusive_key"] == "schedule:tick"
    assert last["kind"] == "scheduled" and last["outcome"] == "created"
    assert iso(last["slot_at"]).microsecond == 0
    assert iso(sc["next_fire_at"]) > iso(last["slot_at"])
    assert iso(sc["next_fire_at"]) - db_now(db_url) <= SECOND
    b = d.batch(last["batch_id"])
    assert b["status"] == "completed" and b["exclusive_key"] == "schedule:tick"
    assert b["metadata"]["owner"] == "nightly"
    assert b["metadata"]["schedule"] == {
        "name": "tick",
        "slot_at": last["slot_at"],
        "kind": "scheduled",
    }
    assert_problem(d.api("GET", "/v1/schedules/nope"), 404)
    assert_problem(d.api("POST", "/v1/schedules/nope/pause"), 404)
    assert_problem(d.api("POST", "/v1/schedules/nope/run"), 404)


def test_pause_is_durable_and_resume_does_not_fire_the_slots_passed_while_paused(
    daemons: DaemonFactory, db_url: str
) -> None:
    d = daemons(extra=schedule(catch_up="latest"))
    wait_runs(db_url, 1)
    code, sc, _ = d.api("POST", "/v1/schedules/tick/pause")
    assert code == 200 and sc["paused"] is True and sc["next_fire_at"] is None, sc
    assert d.api("POST", "/v1/schedules/tick/pause")[0] == 200  # idempotent
    paused_at = db_now(db_url)
    before = slot_runs(db_url)
    wait_clock_past(db_url, paused_at + 3 * SECOND)
    assert slot_runs(db_url) == before  # no slot fired while paused
    # The flag is the database's: a restarted daemon keeps the schedule paused.
    assert d.stop() == 0, d.log()
    d.start()
    restarted = db_now(db_url)
    assert show(d)["paused"] is True
    wait_clock_past(db_url, restarted + 2 * SECOND)
    assert slot_runs(db_url) == before
    code, sc, _ = d.api("POST", "/v1/schedules/tick/resume")
    assert code == 200 and sc["paused"] is False and sc["next_fire_at"] is not None, sc
    resumed = db_now(db_url)
    after = wait_runs(db_url, len(before) + 2)[len(before) :]
    # Neither the paused slots nor a catch-up of them: the first run is after resume.
    assert after[0]["slot_at"] > resumed - SECOND, (resumed, after)
    assert {r["kind"] for r in after} == {"scheduled"}, after


def test_run_now_is_an_extra_manual_run_outside_the_slot_sequence(
    daemons: DaemonFactory, db_url: str
) -> None:
    d = daemons(extra=schedule(cron="0 0 1 1 *"))  # next fires in January
    assert d.api("POST", "/v1/schedules/tick/pause")[0] == 200
    code, body, headers = d.api("POST", "/v1/schedules/tick/run")  # paused or not
    assert code == 201, body
    b = body["batch"]
    assert headers["Location"] == f"/v1/batches/{b['id']}"
    assert b["metadata"]["schedule"]["kind"] == "manual"
    d.wait_status(b["id"], "completed")
    sc = show(d)
    assert sc["last_manual_run"]["batch_id"] == b["id"]
    assert sc["last_manual_run"]["batch_status"] == "completed"
    assert sc["last_slot"] is None and sc["paused"] is True
    second = d.api("POST", "/v1/schedules/tick/run")
    assert second[0] == 201 and second[1]["batch"]["id"] != b["id"]
    assert slot_runs(db_url) == []  # manual runs are not slots


def test_overlap_skip_records_the_slot_and_run_now_is_refused_with_the_holder(
    daemons: DaemonFactory, db_url: str
) -> None:
    d = daemons(extra=schedule(handler="sleeper", items=[{"sleep": 3600}], overlap="skip"))
    first = wait_runs(db_url, 1)[0]
    skipped = wait_runs(db_url, 2, outcome="skipped")
    assert all(r["slot_at"] > first["slot_at"] for r in skipped)
    assert str(first["batch_id"]) in skipped[0]["detail"], skipped
    body = assert_problem(d.api("POST", "/v1/schedules/tick/run"), 409)
    assert body["active_batch_id"] == str(first["batch_id"]), body
    assert d.api("POST", f"/v1/batches/{first['batch_id']}/cancel")[0] == 200
    d.wait_status(str(first["batch_id"]), "cancelled")
    nxt = wait_runs(db_url, 2)[1]
    assert nxt["slot_at"] > first["slot_at"] and nxt["batch_id"] != first["batch_id"]


def test_overlap_cancel_stops_the_previous_run_and_starts_the_new_one_after_it(
    daemons: DaemonFactory, db_url: str
) -> None:
    d = daemons(extra=schedule(handler="sleeper", items=[{"sleep": 3600}], overlap="cancel"))
    first = wait_runs(db_url, 1)[0]
    d.wait_status(str(first["batch_id"]), "running")
    runs = wait_runs(db_url, 2)
    d.wait_status(str(first["batch_id"]), "cancelled")
    second = d.batch(str(runs[1]["batch_id"]))
    assert second["status"] in ("waiting", "queued", "running", "cancelling", "cancelled"), second
    code, log, _ = d.api("GET", f"/v1/batches/{first['batch_id']}/log")
    assert code == 200, log
    events = log["entries"]
    assert any(
        e["action"] == "cancel_requested" and e["actor"] == "schedule:tick" for e in events
    ), events


def test_overlap_queue_chains_the_runs_behind_each_other(
    daemons: DaemonFactory, db_url: str
) -> None:
    d = daemons(extra=schedule(handler="sleeper", items=[{"sleep": 3600}], overlap="queue"))
    runs = wait_runs(db_url, 3)
    d.wait_status(str(runs[0]["batch_id"]), "running")
    for before, batch in itertools.pairwise(runs):
        b = d.batch(str(batch["batch_id"]))
        assert b["status"] == "waiting" and b["waiting_on"] == [str(before["batch_id"])], b


def test_items_from_is_called_at_fire_time_and_its_failure_is_the_runs_outcome(
    daemons: DaemonFactory, db_url: str
) -> None:
    extra = {
        "schedules": {
            "tick": {
                "cron": "* * * * * *",
                "handler": "echo",
                "items_from": "tests.handlers:schedule_items",
            },
            "broken": {
                "cron": "* * * * * *",
                "handler": "echo",
                "items_from": "tests.handlers:schedule_items_fail",
            },
        }
    }
    d = daemons(extra=extra)
    run = wait_runs(db_url, 1)[0]
    items = d.items(str(run["batch_id"]))
    assert [i["key"] for i in items] == ["scheduled"]
    assert iso(items[0]["payload"]["slot_at"]) == run["slot_at"]
    failed = wait_runs(db_url, 1, name="broken", outcome="failed")[0]
    assert failed["batch_id"] is None
    assert "RuntimeError: no portfolios for broken" in failed["detail"], failed
    assert show(d, "broken")["last_slot"]["outcome"] == "failed"
    assert_problem(d.api("POST", "/v1/schedules/broken/run"), 409)


def test_cli_lists_pauses_resumes_and_runs_a_schedule(daemons: DaemonFactory) -> None:
    d = daemons(extra=schedule(cron="0 0 1 1 *", handler="echo"), handlers=DEFAULT_HANDLERS)
    out = d.cli("schedules")
    assert out.returncode == 0 and out.stdout.startswith("tick "), out
    out = d.cli("schedule", "pause", "tick")
    assert out.returncode == 0 and "paused" in out.stdout, out
    out = d.cli("schedule", "run", "tick")
    assert out.returncode == 0 and out.stdout.startswith("schedule tick: batch "), out
    out = d.cli("schedule", "resume", "tick", "--json")
    assert out.returncode == 0 and '"paused": false' in out.stdout, out
    out = d.cli("schedule", "show", "nope")
    assert out.returncode == 1 and "404" in out.stderr, out


def test_retention_forgets_old_runs_but_keeps_the_slot_the_next_one_counts_from(
    daemons: DaemonFactory, db_url: str
) -> None:
    # "minutely" fires once a minute, a few seconds from now; "busy" every second.
    # Once retention has deleted a run of busy newer than minutely's run, the same
    # sweep could have deleted minutely's too: it must have kept it (the next
    # slot is counted from it; without it the slot would be due again).
    second = (db_now(db_url) + 6 * SECOND).second
    extra = {
        "schedules": {
            "minutely": {"cron": f"{second} * * * * *", "handler": "echo", "items": [1]},
            "busy": {"cron": "* * * * * *", "handler": "echo", "items": [1]},
        },
        "retention": {"finished_after": "2s", "interval": "1s"},
    }
    daemons(extra=extra)
    kept = wait_runs(db_url, 1, name="minutely")[0]

    def run_rows() -> list[Any]:
        return db_rows(
            db_url, "SELECT id, schedule, slot_at, created_at FROM supervisor.schedule_runs"
        )

    def newer_busy_run() -> Any:
        got = [r for r in run_rows() if r["schedule"] == "busy" and r["slot_at"] > kept["slot_at"]]
        return got[0] if got else None

    busy = wait_for(newer_busy_run, 20, 0.05, "a run of busy after minutely's")
    wait_for(lambda: busy["id"] not in [r["id"] for r in run_rows()], 20, 0.1, "busy's run deleted")
    rows = [r for r in run_rows() if r["schedule"] == "minutely"]
    assert [(r["slot_at"], r["id"]) for r in rows] == [(kept["slot_at"], kept["id"])], rows


def test_a_tenants_tokens_see_and_control_only_its_schedules(daemons: DaemonFactory) -> None:
    secrets = {"a": "token-of-a", "b": "token-of-b", "ro": "token-read-only"}
    tokens = [
        {
            "name": name,
            "tenant": "B" if name == "b" else "A",
            "sha256": hashlib.sha256(secret.encode()).hexdigest(),
            "scopes": ["read"] if name == "ro" else ["read", "write"],
        }
        for name, secret in secrets.items()
    ]
    extra = schedule(cron="0 0 1 1 *", tenant="A") | {"auth": {"tokens": tokens}}
    d = daemons(extra=extra)

    def as_(who: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {secrets[who]}"}

    code, mine, _ = d.api("GET", "/v1/schedules", headers=as_("a"))
    assert code == 200 and [s["name"] for s in mine["schedules"]] == ["tick"], mine
    code, theirs, _ = d.api("GET", "/v1/schedules", headers=as_("b"))
    assert code == 200 and theirs["schedules"] == [], theirs
    assert_problem(d.api("GET", "/v1/schedules/tick", headers=as_("b")), 404)
    assert_problem(d.api("POST", "/v1/schedules/tick/pause", headers=as_("b")), 404)
    assert_problem(d.api("POST", "/v1/schedules/tick/run", headers=as_("ro")), 403)
    assert_problem(d.api("GET", "/v1/schedules"), 401)
    code, body, _ = d.api("POST", "/v1/schedules/tick/run", headers=as_("a"))
    assert code == 201 and body["batch"]["tenant"] == "A", body


def test_a_hung_items_from_fails_its_run_and_does_not_hold_back_other_schedules(
    daemons: DaemonFactory, db_url: str
) -> None:
    extra = {
        "schedules": {
            "hung": {
                "cron": "* * * * * *",
                "handler": "echo",
                "items_from": "tests.handlers:schedule_items_hang",
                "items_timeout": "500ms",
            },
            "tick": {"cron": "* * * * * *", "handler": "echo", "items": [1]},
        }
    }
    sync = {"sync_echo": {"type": "python", "target": "tests.handlers:sync_echo"}}
    d = daemons(extra=extra, handlers=DEFAULT_HANDLERS | sync)
    # More hung calls than the schedules' threads: the later ones time out waiting
    # for a thread, and the handlers' threads are not the ones used up.
    failed = wait_runs(db_url, 6, name="hung", outcome="failed")
    assert all("did not return within 0.5s" in r["detail"] for r in failed), failed
    wait_runs(db_url, 3)  # "tick" fires meanwhile
    b = d.submit("sync_echo", [{"n": i} for i in range(8)])
    d.wait_status(b["id"], "completed")
    assert d.stop(timeout=30) == 0, d.log()  # abandoned threads do not keep it alive
