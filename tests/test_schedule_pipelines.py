"""Schedules that fire pipeline runs, over real HTTP against a real daemon: every
slot of a seconds cron starts a run whose stages run to completion; GET
/v1/schedules names the pipeline and the last slot's run and its status; run now
starts a run; overlap skip with a run still going records the slot skipped,
naming the run, and refuses run now with the holder; the CLI shows it all. The
schedules fire every second; expectations are compared with the database."""

from __future__ import annotations

from typing import Any

from tests.conftest import DaemonFactory
from tests.daemon import Daemon, wait_for
from tests.test_api import assert_problem, db_rows
from tests.test_pipelines import HANDLERS, PIPELINES, get_run, wait_run

PORTFOLIO = [{"page": 1, "links": 2}]


def pipeline_schedule(name: str = "nightly", **kw: Any) -> dict[str, Any]:
    sched = {"cron": "* * * * * *", "pipeline": "nightly", "items": PORTFOLIO} | kw
    return {"pipelines": PIPELINES, "schedules": {name: sched}}


def slot_rows(db_url: str, name: str = "nightly") -> list[Any]:
    return db_rows(
        db_url,
        "SELECT slot_at, kind, outcome, batch_id, pipeline_run_id, detail"
        " FROM supervisor.schedule_runs WHERE schedule = $1 AND kind <> 'manual'"
        " ORDER BY slot_at",
        name,
    )


def wait_slots(db_url: str, n: int, outcome: str, name: str = "nightly") -> list[Any]:
    def enough() -> list[Any] | None:
        got = [r for r in slot_rows(db_url, name) if r["outcome"] == outcome]
        return got if len(got) >= n else None

    return wait_for(enough, 30, 0.05, f"{n} {outcome} slots of {name}")


def show(d: Daemon, name: str = "nightly") -> dict[str, Any]:
    code, body, _ = d.api("GET", f"/v1/schedules/{name}")
    assert code == 200, (code, body)
    return dict(body)


def test_each_slot_starts_a_pipeline_run_whose_stages_run_to_completion(
    daemons: DaemonFactory, db_url: str
) -> None:
    extra = pipeline_schedule(metadata={"portfolio": 123}, exclusive_key="portfolio:123")
    d = daemons(handlers=HANDLERS, extra=extra)
    created = wait_slots(db_url, 2, "created")
    for slot in created:
        assert slot["batch_id"] is None, slot
        run = wait_run(d, str(slot["pipeline_run_id"]))
        assert run["status"] == "completed", run
        assert [s["status"] for s in run["stages"]] == ["completed"] * 3, run
        assert run["exclusive_key"] == "portfolio:123"
        assert run["metadata"]["portfolio"] == 123
        assert run["metadata"]["schedule"]["kind"] == "scheduled"
        assert run["created_by"] == "schedule:nightly"
        # The run's items are the schedule's: its first stage fetched the portfolio,
        # its last one summarised the two links derived from it.
        summary = d.items(run["stages"][2]["batch_id"])
        assert [i["payload"] for i in summary] == [{"links": ["1/0", "1/1"]}], summary

    def shown_completed() -> dict[str, Any] | None:
        sc = show(d)
        last = sc["last_slot"]
        return sc if last and last["pipeline_run_status"] == "completed" else None

    sc = wait_for(shown_completed, 20, 0.05, "the last slot's run shown completed")
    assert sc["pipeline"] == "nightly" and sc["handler"] is None, sc
    assert sc["exclusive_key"] == "portfolio:123" and sc["overlap"] == "skip"
    last = sc["last_slot"]
    assert last["outcome"] == "created" and last["batch_id"] is None, last
    assert get_run(d, last["pipeline_run_id"])["status"] == "completed"
    code, listing, _ = d.api("GET", "/v1/schedules")
    assert code == 200 and listing["schedules"][0]["pipeline"] == "nightly", listing


def test_run_now_starts_a_pipeline_run_outside_the_slot_sequence(
    daemons: DaemonFactory, db_url: str
) -> None:
    d = daemons(handlers=HANDLERS, extra=pipeline_schedule(cron="0 0 1 1 *"))
    code, body, headers = d.api("POST", "/v1/schedules/nightly/run")
    assert code == 201, body
    run = body["run"]
    assert "batch" not in body and headers["Location"] == f"/v1/pipeline-runs/{run['id']}"
    assert run["pipeline"] == "nightly" and run["metadata"]["schedule"]["kind"] == "manual"
    assert wait_run(d, run["id"])["status"] == "completed"
    manual = show(d)["last_manual_run"]
    assert manual["pipeline_run_id"] == run["id"], manual
    assert manual["pipeline_run_status"] == "completed" and manual["batch_id"] is None
    assert slot_rows(db_url) == []  # manual runs are not slots
    out = d.cli("schedule", "run", "nightly")
    assert out.returncode == 0 and out.stdout.startswith("schedule nightly: pipeline run "), out
    out = d.cli("schedules")
    assert out.returncode == 0 and out.stdout.startswith("nightly "), out
    assert "pipeline nightly" in out.stdout and "never fired" in out.stdout, out.stdout


def test_overlap_skip_passes_slots_by_while_the_previous_run_is_going(
    daemons: DaemonFactory, db_url: str
) -> None:
    extra = pipeline_schedule(pipeline="slow", items=[{"sleep": 3600}])
    d = daemons(handlers=HANDLERS, extra=extra)
    first = wait_slots(db_url, 1, "created")[0]
    run_id = str(first["pipeline_run_id"])
    skipped = wait_slots(db_url, 2, "skipped")
    assert all(r["slot_at"] > first["slot_at"] for r in skipped), skipped
    assert all(run_id in r["detail"] and r["pipeline_run_id"] is None for r in skipped), skipped
    assert len(wait_slots(db_url, 1, "created")) == 1  # still the one run
    body = assert_problem(d.api("POST", "/v1/schedules/nightly/run"), 409)
    assert body["active_run_id"] == run_id and body["exclusive_key"] == "schedule:nightly", body
    out = d.cli("schedules")
    assert out.returncode == 0 and " skipped " in out.stdout, out.stdout
    # Once the run has ended, the key is free: the next slot starts a new run.
    assert d.api("POST", f"/v1/pipeline-runs/{run_id}/cancel")[0] == 200
    assert wait_run(d, run_id)["status"] == "cancelled"
    nxt = wait_slots(db_url, 2, "created")[1]
    assert nxt["slot_at"] > first["slot_at"] and str(nxt["pipeline_run_id"]) != run_id
