"""The dashboard's schedules and pipeline-run views in a real headless Chromium
(same browser setup as test_dashboard_browser.py; skips the same way): a schedule's
last run links to its batch, pause and run now from the page; a pipeline run's
stages advance to completed over its event stream, and cancel from the page."""

from __future__ import annotations

import hashlib
import pathlib
import re
import uuid
from typing import Any

from tests.conftest import DaemonFactory
from tests.daemon import DEFAULT_HANDLERS, Daemon, wait_for
from tests.test_dashboard_browser import OUTPUT, _confirm, _open, _same_page, expect
from tests.test_dashboard_browser import page as page

HANDLERS = DEFAULT_HANDLERS | {
    "hold": {"type": "python", "target": "tests.handlers:until_file", "timeout": "1h"},
}
PIPELINES = {
    "two": {
        "stages": [
            {"name": "hold", "handler": "hold"},
            {"name": "again", "handler": "echo", "items": "tests.pipes:results_of"},
        ]
    },
    "long": {
        "stages": [
            {"name": "wait", "handler": "sleeper"},
            {"name": "after", "handler": "echo", "items": "tests.pipes:results_of"},
        ]
    },
}


def _api(d: Daemon, method: str, path: str, body: Any = None) -> Any:
    code, out, _ = d.api(method, path, body)
    assert 200 <= code < 300, (code, out)
    return out


def _shot(page: Any, name: str) -> None:
    OUTPUT.mkdir(exist_ok=True)
    page.get_by_test_id("toast").evaluate("el => { el.hidden = true; }")
    page.screenshot(path=str(OUTPUT / name), full_page=True)
    assert (OUTPUT / name).stat().st_size > 10_000


def test_schedules_view_links_last_run_pauses_and_runs_now(
    daemons: DaemonFactory, page: Any
) -> None:
    tick = {"cron": "* * * * * *", "handler": "echo", "items": [{"n": 1}], "overlap": "queue"}
    d = daemons("dash-schedules", extra={"schedules": {"tick": tick}})
    _open(page, d.url + "/")
    page.get_by_test_id("nav-schedules").click()
    expect(page.get_by_test_id("schedule-row-tick")).to_be_visible()
    expect(page.get_by_test_id("schedule-row-tick")).to_contain_text("* * * * * *")
    # Fired every second: the polled view gets a last slot with its batch.
    link = page.get_by_test_id("schedule-slot-tick-batch")
    expect(link).to_have_attribute("href", re.compile(r"^#/batches/[0-9a-f-]{36}$"))
    expect(page.get_by_test_id("schedule-slot-tick-outcome")).not_to_be_empty()
    expect(page.get_by_test_id("schedule-manual-tick")).to_have_text("never")

    page.get_by_test_id("schedule-pause-tick").click()
    expect(page.get_by_test_id("confirm-message")).to_contain_text("tick")
    _confirm(page, ok=False)
    assert _api(d, "GET", "/v1/schedules/tick")["paused"] is False
    page.get_by_test_id("schedule-pause-tick").click()
    _confirm(page)
    expect(page.get_by_test_id("schedule-paused-tick")).to_have_text("paused")
    expect(page.get_by_test_id("schedule-pause-tick")).to_have_text("Resume")
    sc = _api(d, "GET", "/v1/schedules/tick")
    assert sc["paused"] is True and sc["next_fire_at"] is None, sc

    # Run now works while paused: one manual run, with its own batch.
    page.get_by_test_id("schedule-run-tick").click()
    _confirm(page)
    manual = page.get_by_test_id("schedule-manual-tick-batch")
    expect(manual).to_be_visible()
    run = wait_for(lambda: _api(d, "GET", "/v1/schedules/tick")["last_manual_run"], timeout=10)
    assert run["kind"] == "manual" and run["batch_id"], run
    expect(manual).to_have_attribute("href", f"#/batches/{run['batch_id']}")
    expect(page.get_by_test_id("schedule-manual-tick-batch-status")).to_have_text("completed")
    _shot(page, "dashboard-schedules.png")

    manual.click()
    expect(page.get_by_test_id("detail-id")).to_have_text(run["batch_id"])
    expect(page.get_by_test_id("detail-status")).to_have_text("completed")
    _same_page(page)


def test_a_pipeline_schedules_row_names_the_pipeline_and_links_its_runs(
    daemons: DaemonFactory, page: Any
) -> None:
    nightly = {"cron": "0 0 1 1 *", "pipeline": "long", "items": [{"sleep": 3600}]}
    d = daemons(
        "dash-sched-runs",
        handlers=HANDLERS,
        extra={"pipelines": PIPELINES, "schedules": {"nightly": nightly}},
    )
    _open(page, d.url + "/")
    page.get_by_test_id("nav-schedules").click()
    expect(page.get_by_test_id("schedule-row-nightly")).to_contain_text("pipeline long")
    page.get_by_test_id("schedule-run-nightly").click()
    _confirm(page)
    expect(page.get_by_test_id("toast")).to_contain_text("pipeline run")
    run = wait_for(lambda: _api(d, "GET", "/v1/schedules/nightly")["last_manual_run"], timeout=10)
    link = page.get_by_test_id("schedule-manual-nightly-run")
    expect(link).to_have_attribute("href", f"#/runs/{run['pipeline_run_id']}")
    expect(page.get_by_test_id("schedule-manual-nightly-run-status")).to_have_text("running")
    _api(d, "POST", f"/v1/pipeline-runs/{run['pipeline_run_id']}/cancel")
    _same_page(page)


def test_pipeline_run_view_follows_its_stages_to_completed(
    daemons: DaemonFactory, page: Any, tmp_path: pathlib.Path
) -> None:
    d = daemons("dash-runs", handlers=HANDLERS, extra={"pipelines": PIPELINES})
    release = tmp_path / "release"
    run = _api(d, "POST", "/v1/pipelines/two/runs", {"items": [{"file": str(release)}]})
    rid = run["id"]
    _open(page, d.url + "/")
    page.get_by_test_id("nav-runs").click()
    expect(page.get_by_test_id(f"run-status-{rid}")).to_have_text("running")
    page.get_by_test_id(f"run-link-{rid}").click()
    expect(page.get_by_test_id("run-detail-id")).to_have_text(rid)
    expect(page.get_by_test_id("run-detail-status")).to_have_text("running")
    expect(page.locator("[data-testid^=stage-row-]")).to_have_count(2)
    expect(page.get_by_test_id("stage-row-0")).to_contain_text("hold")
    expect(page.get_by_test_id("stage-row-1")).to_contain_text("again")
    expect(page.get_by_test_id("stage-status-0")).to_have_text("running")
    expect(page.get_by_test_id("stage-status-1")).to_have_text("pending")
    expect(page.get_by_test_id("stage-progress-0")).to_have_attribute("aria-valuenow", "0")
    expect(page.get_by_test_id("run-cancel")).to_be_enabled()
    expect(page.get_by_test_id("run-retry")).to_be_disabled()

    # From here on, only the streams can tell the page: it does not poll a run.
    release.touch()
    expect(page.get_by_test_id("run-detail-status")).to_have_text("completed")
    for i in (0, 1):
        expect(page.get_by_test_id(f"stage-status-{i}")).to_have_text("completed")
        expect(page.get_by_test_id(f"stage-progress-{i}")).to_have_attribute("aria-valuenow", "100")
    done = _api(d, "GET", f"/v1/pipeline-runs/{rid}")
    assert done["status"] == "completed", done
    second = done["stages"][1]["batch_id"]
    expect(page.get_by_test_id("stage-batch-1")).to_have_attribute("href", f"#/batches/{second}")
    expect(page.get_by_test_id("run-cancel")).to_be_disabled()
    _same_page(page)
    _shot(page, "dashboard-pipeline-run.png")

    page.get_by_test_id("stage-batch-1").click()
    expect(page.get_by_test_id("detail-id")).to_have_text(second)
    page.get_by_test_id("nav-runs").click()
    page.get_by_test_id("runs-filter-status").select_option("completed")
    expect(page.get_by_test_id(f"run-status-{rid}")).to_have_text("completed")
    page.get_by_test_id("runs-filter-status").select_option("cancelled")
    expect(page.get_by_test_id("no-runs")).to_be_visible()
    _same_page(page)


def test_cancel_a_pipeline_run_from_the_page(daemons: DaemonFactory, page: Any) -> None:
    d = daemons("dash-cancel", handlers=HANDLERS, extra={"pipelines": PIPELINES})
    run = _api(d, "POST", "/v1/pipelines/long/runs", {"items": [{"sleep": 3600}]})
    rid = run["id"]
    first = run["stages"][0]["batch_id"]
    _open(page, d.url + "/")
    page.goto(f"{d.url}/#/runs/{rid}")
    expect(page.get_by_test_id("stage-status-0")).to_have_text("running")

    page.get_by_test_id("run-cancel").click()
    expect(page.get_by_test_id("confirm-message")).to_contain_text(rid[:8])
    _confirm(page, ok=False)
    assert _api(d, "GET", f"/v1/pipeline-runs/{rid}")["status"] == "running"
    page.get_by_test_id("run-cancel").click()
    _confirm(page)
    expect(page.get_by_test_id("run-detail-status")).to_have_text("cancelled")
    expect(page.get_by_test_id("stage-status-0")).to_have_text("cancelled")
    expect(page.get_by_test_id("stage-status-1")).to_have_text("skipped")
    expect(page.get_by_test_id("stage-progress-0")).to_have_attribute("aria-valuenow", "100")
    expect(page.get_by_test_id("run-cancel")).to_be_disabled()
    expect(page.get_by_test_id("run-retry")).to_be_enabled()
    assert _api(d, "GET", f"/v1/pipeline-runs/{rid}")["status"] == "cancelled"
    assert d.batch(first)["status"] == "cancelled"
    _same_page(page)

    page.goto(f"{d.url}/#/runs/{uuid.uuid4()}")
    expect(page.get_by_test_id("run-error")).to_contain_text("No pipeline run")
    _same_page(page)


def test_schedules_need_the_token_and_a_refused_run_now_says_why(
    daemons: DaemonFactory, page: Any
) -> None:
    token = "views-test-token"
    grant = {
        "name": "ops",
        "sha256": hashlib.sha256(token.encode()).hexdigest(),
        "scopes": ["read", "write"],
    }
    # Its first slot's batch sleeps for an hour and holds the schedule's key, so
    # "skip" refuses a manual run meanwhile.
    nap = {"cron": "* * * * * *", "handler": "sleeper", "items": [{"sleep": 3600}]}
    d = daemons("dash-sched-auth", extra={"schedules": {"nap": nap}, "auth": {"tokens": [grant]}})
    page.goto(d.url + "/#/schedules")
    expect(page.get_by_test_id("token-panel")).to_be_visible()
    page.get_by_test_id("token-input").fill(token)
    page.get_by_test_id("token-save").click()
    # The next slots are skipped, saying so: the first one's batch holds the key.
    expect(page.get_by_test_id("schedule-slot-nap-outcome")).to_have_text("skipped")
    expect(page.get_by_test_id("schedule-slot-nap")).to_contain_text("is held by batch")
    page.get_by_test_id("schedule-run-nap").click()
    _confirm(page)
    expect(page.get_by_test_id("toast")).to_contain_text("Run now failed")
    expect(page.get_by_test_id("toast")).to_have_class("error")
    expect(page.get_by_test_id("schedule-manual-nap")).to_have_text("never")
