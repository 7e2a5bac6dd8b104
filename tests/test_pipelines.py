"""Pipelines over real HTTP against a real daemon: validation (422 naming the
field, unknown pipeline 404), the run's shape, stages derived from the previous
stage's results by the configured items function, the failure and empty-stage
rules, the controls, idempotency and the exclusive key, and the SSE stream."""

from __future__ import annotations

import pathlib
import uuid
from typing import Any

import pytest

from tests.conftest import DaemonFactory
from tests.daemon import DEFAULT_HANDLERS, Daemon, wait_for
from tests.test_api import assert_problem, db_rows, sha256hex
from tests.test_controls import read_events

TERMINAL = ("completed", "completed_with_errors", "failed", "cancelled")
HANDLERS = dict(DEFAULT_HANDLERS) | {
    "fetch": {"type": "python", "target": "tests.handlers:echo", "timeout": "30s"},
    "extract": {"type": "python", "target": "tests.handlers:echo", "timeout": "30s"},
    "summarize": {"type": "python", "target": "tests.handlers:echo", "timeout": "30s"},
}


def stages(*more: tuple[str, str, str]) -> list[dict[str, str]]:
    """A first stage of echo, then (name, handler, items function) stages."""
    first = [{"name": "fetch", "handler": "fetch"}]
    return first + [{"name": n, "handler": h, "items": f"tests.pipes:{fn}"} for n, h, fn in more]


NIGHTLY = stages(("extract", "extract", "one_per_link"), ("summarize", "summarize", "one_summary"))
PIPELINES: dict[str, Any] = {
    "nightly": {"stages": NIGHTLY},
    "tolerant": {
        "stages": stages(("again", "echo", "passthrough")),
        "on_stage_failure": "continue",
    },
    "strict": {"stages": stages(("again", "echo", "passthrough"))},
    "empty": {"stages": stages(("none", "echo", "nothing"), ("after", "echo", "passthrough"))},
    "broken": {"stages": stages(("boom", "echo", "raises"))},
    "invalid": {"stages": stages(("bad", "echo", "not_items"))},
    "slow": {"stages": [{"name": "wait", "handler": "sleeper"}, *NIGHTLY[1:]]},
    "napping": {
        "stages": [
            {"name": "wait", "handler": "sleeper"},
            {"name": "again", "handler": "echo", "items": "tests.pipes:results_of"},
            {"name": "more", "handler": "echo", "items": "tests.pipes:results_of"},
        ]
    },
}


def pipeline_daemon(daemons: DaemonFactory, name: str = "d1", **kw: Any) -> Daemon:
    return daemons(name, handlers=HANDLERS, extra={"pipelines": PIPELINES}, **kw)


def start_run(d: Daemon, pipeline: str, items: list[Any], **fields: Any) -> dict[str, Any]:
    path = f"/v1/pipelines/{pipeline}/runs"
    code, body, headers = d.api("POST", path, {"items": items, **fields})
    assert code == 201, (code, body)
    assert headers["Location"] == f"/v1/pipeline-runs/{body['id']}"
    return dict(body)


def get_run(d: Daemon, run_id: str) -> dict[str, Any]:
    code, body, _ = d.api("GET", f"/v1/pipeline-runs/{run_id}")
    assert code == 200, (code, body)
    return dict(body)


def wait_run(d: Daemon, run_id: str, timeout: float = 30) -> dict[str, Any]:
    def ended() -> dict[str, Any] | None:
        r = get_run(d, run_id)
        return r if r["status"] != "running" else None

    return wait_for(ended, timeout, 0.05, f"run {run_id} ended")


def stage_batches(db_url: str, run_id: str) -> list[Any]:
    """Every batch made for the run, by the run id its metadata carries."""
    return db_rows(
        db_url,
        "SELECT metadata->'pipeline_run'->>'stage' AS stage, count(*) AS n"
        " FROM supervisor.batches WHERE metadata->'pipeline_run'->>'id' = $1"
        " GROUP BY 1 ORDER BY min(created_at)",
        run_id,
    )


@pytest.fixture
def d(daemons: DaemonFactory) -> Daemon:
    return pipeline_daemon(daemons)


def test_an_unknown_pipeline_is_404(d: Daemon) -> None:
    assert_problem(d.api("POST", "/v1/pipelines/nope/runs", {"items": [1]}), 404)
    assert_problem(d.api("GET", f"/v1/pipeline-runs/{uuid.uuid4()}"), 404)
    assert_problem(d.api("GET", "/v1/pipeline-runs/not-a-uuid"), 404)
    assert_problem(d.api("POST", f"/v1/pipeline-runs/{uuid.uuid4()}/cancel"), 404)


@pytest.mark.parametrize(
    ("body", "path"),
    [
        ({}, "/items"),
        ({"items": []}, "/items"),
        ({"items": "x"}, "/items"),
        ({"items": [{"payload": 1, "key": ""}]}, "/items/0/key"),
        ({"items": [1], "metadata": []}, "/metadata"),
        ({"items": [1], "metadata": {"pipeline_run": 1}}, "/metadata/pipeline_run"),
        ({"items": [1], "exclusive_key": ""}, "/exclusive_key"),
        ({"items": [1], "idempotency_key": 5}, "/idempotency_key"),
        ({"items": [1], "handler": "echo"}, "/handler"),
    ],
)
def test_a_bad_run_is_422_naming_the_field_and_writes_nothing(
    d: Daemon, db_url: str, body: dict[str, Any], path: str
) -> None:
    assert_problem(d.api("POST", "/v1/pipelines/nightly/runs", body), 422, path)
    assert db_rows(db_url, "SELECT id FROM supervisor.pipeline_runs") == []
    assert db_rows(db_url, "SELECT id FROM supervisor.batches") == []


def test_a_body_that_is_not_an_object_is_refused(d: Daemon) -> None:
    assert_problem(d.api("POST", "/v1/pipelines/nightly/runs", [1]), 422, "")


def test_the_run_shows_its_stages_and_its_first_batch(d: Daemon) -> None:
    run = start_run(d, "slow", [{"sleep": 30}], metadata={"portfolio": "p1"})
    assert set(run) >= {"id", "pipeline", "status", "stages", "created_at", "finished_at"}
    assert run["pipeline"] == "slow" and run["status"] == "running", run
    assert run["current_stage"] == "wait" and run["metadata"] == {"portfolio": "p1"}
    first, *rest = run["stages"]
    assert first["name"] == "wait" and first["handler"] == "sleeper"
    assert first["batch_id"] is not None and first["status"] in ("queued", "running")
    assert [(s["name"], s["batch_id"], s["status"]) for s in rest] == [
        ("extract", None, "pending"),
        ("summarize", None, "pending"),
    ]
    b = d.batch(first["batch_id"])
    assert b["metadata"]["pipeline_run"] == {
        "id": run["id"],
        "pipeline": "slow",
        "stage": "wait",
        "index": 0,
    }
    assert b["metadata"]["portfolio"] == "p1"
    code, listed, _ = d.api("GET", "/v1/pipeline-runs?pipeline=slow&status=running")
    assert code == 200 and [r["id"] for r in listed["runs"]] == [run["id"]], listed
    code, listed, _ = d.api("GET", "/v1/pipeline-runs?pipeline=nightly")
    assert code == 200 and listed["runs"] == [], listed
    code, conf, _ = d.api("GET", "/v1/pipelines")
    assert code == 200 and "nightly" in [p["name"] for p in conf["pipelines"]], conf


def test_three_stages_run_with_items_derived_as_configured(d: Daemon, db_url: str) -> None:
    pages = [{"page": 1, "links": 2}, {"page": 2, "links": 3}]
    run = wait_run(d, start_run(d, "nightly", pages)["id"])
    assert run["status"] == "completed", run
    assert [s["status"] for s in run["stages"]] == ["completed"] * 3, run
    assert run["finished_at"] is not None and run["error"] is None
    _, extract, summarize = (s["batch_id"] for s in run["stages"])
    links = sorted((i["key"], i["payload"]["link"]) for i in d.items(extract))
    assert links == [("1/0", 0), ("1/1", 1), ("2/0", 0), ("2/1", 1), ("2/2", 2)]
    (summary,) = d.items(summarize)
    assert summary["payload"] == {"links": ["1/0", "1/1", "2/0", "2/1", "2/2"]}
    assert [(r["stage"], r["n"]) for r in stage_batches(db_url, run["id"])] == [
        ("fetch", 1),
        ("extract", 1),
        ("summarize", 1),
    ]


def test_a_stage_with_failures_stops_a_strict_run_and_a_tolerant_one_goes_on(
    daemons: DaemonFactory,
) -> None:
    handlers = HANDLERS | {"fetch": DEFAULT_HANDLERS["permanent"]}
    pipes = {
        "strict": {"stages": stages(("again", "echo", "passthrough"))},
        "tolerant": PIPELINES["tolerant"],
    }
    d = daemons(handlers=handlers, extra={"pipelines": pipes})
    strict = wait_run(d, start_run(d, "strict", [1])["id"])
    assert strict["status"] == "failed", strict
    assert strict["error"]["stage"] == "fetch" and "failed" in strict["error"]["message"]
    assert [s["status"] for s in strict["stages"]] == ["failed", "skipped"], strict
    tolerant = wait_run(d, start_run(d, "tolerant", [1])["id"])
    # No result succeeded, so the next stage has no items: skipped, and the run
    # ends with errors.
    assert tolerant["status"] == "completed_with_errors", tolerant
    assert [s["status"] for s in tolerant["stages"]] == ["failed", "skipped"], tolerant


def test_no_items_skip_the_rest_and_the_run_completes(d: Daemon) -> None:
    run = wait_run(d, start_run(d, "empty", [1])["id"])
    assert run["status"] == "completed", run
    assert [(s["status"], s["batch_id"]) for s in run["stages"][1:]] == [
        ("skipped", None),
        ("skipped", None),
    ]


def test_an_items_function_that_raises_fails_the_run_with_its_error(d: Daemon) -> None:
    run = wait_run(d, start_run(d, "broken", [1])["id"])
    assert run["status"] == "failed", run
    assert run["error"] == {
        "stage": "boom",
        "type": "ValueError",
        "message": "no links in \ufffd these pages",
    }
    assert [s["status"] for s in run["stages"]] == ["completed", "skipped"]


def test_items_a_submission_would_refuse_fail_the_run_naming_them(d: Daemon) -> None:
    run = wait_run(d, start_run(d, "invalid", [1])["id"])
    assert run["status"] == "failed" and run["error"]["type"] == "InvalidItems", run
    assert [e["path"] for e in run["error"]["errors"]] == ["/items/0/key"]


def test_retry_derives_the_items_of_a_failed_stage_again(d: Daemon) -> None:
    run = wait_run(d, start_run(d, "broken", [1])["id"])
    code, body, _ = d.api("POST", f"/v1/pipeline-runs/{run['id']}/retry")
    assert code == 200 and body["status"] == "running" and body["error"] is None, body
    again = wait_run(d, run["id"])
    assert again["status"] == "failed" and again["error"]["type"] == "ValueError", again


def test_cancel_stops_the_current_stage_and_no_later_one_starts(d: Daemon, db_url: str) -> None:
    run = start_run(d, "slow", [{"sleep": 60}])
    first = run["stages"][0]["batch_id"]
    d.wait_status(first, "running")
    code, body, _ = d.api("POST", f"/v1/pipeline-runs/{run['id']}/cancel")
    assert code == 200 and body["cancel_requested"] is True, body
    ended = wait_run(d, run["id"])
    assert ended["status"] == "cancelled", ended
    assert [s["status"] for s in ended["stages"]] == ["cancelled", "skipped", "skipped"]
    assert [r["stage"] for r in stage_batches(db_url, run["id"])] == ["wait"]
    assert_problem(d.api("POST", f"/v1/pipeline-runs/{run['id']}/pause"), 409)
    code, again, _ = d.api("POST", f"/v1/pipeline-runs/{run['id']}/cancel")
    assert code == 200 and again["status"] == "cancelled"


def test_pause_and_resume_apply_to_the_current_stage(d: Daemon) -> None:
    run = start_run(d, "slow", [{"sleep": 60}, {"sleep": 60}], exclusive_key="pf-1")
    first = run["stages"][0]["batch_id"]
    code, body, _ = d.api("POST", f"/v1/pipeline-runs/{run['id']}/pause")
    assert code == 200 and body["paused"] is True, body
    assert d.batch(first)["status"] == "paused"
    code, body, _ = d.api("POST", f"/v1/pipeline-runs/{run['id']}/resume")
    assert code == 200 and body["paused"] is False, body
    assert d.batch(first)["status"] in ("queued", "running")
    d.api("POST", f"/v1/pipeline-runs/{run['id']}/cancel")


def test_an_idempotent_repeat_returns_the_run_and_other_content_conflicts(
    d: Daemon, db_url: str
) -> None:
    body = {"items": [{"sleep": 60}], "idempotency_key": "nightly-2026-12-04"}
    code, first, _ = d.api("POST", "/v1/pipelines/slow/runs", body)
    assert code == 201
    code, again, _ = d.api("POST", "/v1/pipelines/slow/runs", body)
    assert code == 200 and again["id"] == first["id"], again
    assert_problem(d.api("POST", "/v1/pipelines/slow/runs", body | {"items": [2]}), 409)
    assert len(db_rows(db_url, "SELECT id FROM supervisor.pipeline_runs")) == 1
    assert len(db_rows(db_url, "SELECT id FROM supervisor.batches")) == 1
    d.api("POST", f"/v1/pipeline-runs/{first['id']}/cancel")


def test_an_exclusive_key_admits_one_running_run(d: Daemon, db_url: str) -> None:
    run = start_run(d, "slow", [{"sleep": 60}], exclusive_key="portfolio-7")
    resp = d.api(
        "POST", "/v1/pipelines/nightly/runs", {"items": [1], "exclusive_key": "portfolio-7"}
    )
    problem = assert_problem(resp, 409)
    assert problem["active_run_id"] == run["id"], problem
    assert len(db_rows(db_url, "SELECT id FROM supervisor.batches")) == 1  # nothing half-written
    other = start_run(d, "slow", [{"sleep": 60}], exclusive_key="portfolio-8")
    d.api("POST", f"/v1/pipeline-runs/{run['id']}/cancel")
    wait_run(d, run["id"])
    again = start_run(d, "nightly", [{"page": 1, "links": 1}], exclusive_key="portfolio-7")
    assert wait_run(d, again["id"])["status"] == "completed"
    d.api("POST", f"/v1/pipeline-runs/{other['id']}/cancel")


def test_the_event_stream_tells_each_stage_start_and_end_then_the_end(d: Daemon) -> None:
    run = start_run(d, "nightly", [{"page": 1, "links": 2}])
    events = read_events(f"{d.url}/v1/pipeline-runs/{run['id']}/events")
    kinds = [(e, data.get("event"), data.get("name")) for e, data, _, _ in events if e == "stage"]
    assert kinds == [
        ("stage", "started", "fetch"),
        ("stage", "ended", "fetch"),
        ("stage", "started", "extract"),
        ("stage", "ended", "extract"),
        ("stage", "started", "summarize"),
        ("stage", "ended", "summarize"),
    ], events
    assert events[-1][0] == "end" and events[-1][1]["status"] == "completed", events[-1]
    snapshots = [data for e, data, _, _ in events if e == "snapshot"]
    assert snapshots[-1]["status"] == "completed" and snapshots[0]["id"] == run["id"]


def test_a_daemon_refuses_to_start_with_an_items_function_it_cannot_load(
    daemons: DaemonFactory,
) -> None:
    broken = {"broken": {"stages": stages(("x", "echo", "no_such_function"))}}
    d = daemons(handlers=HANDLERS, extra={"pipelines": broken}, start=False)
    res = d.cli("check", "--config", str(d.config_path))
    assert res.returncode == 78, res
    assert "pipelines.broken.stages[1].items" in res.stderr, res
    d.start(wait=False)
    assert d.wait_exit(30) == 78
    assert "no_such_function" in d.log()


def test_the_cli_starts_a_run_follows_its_stages_and_shows_it(
    d: Daemon, tmp_path: pathlib.Path
) -> None:
    src = tmp_path / "pages.jsonl"
    src.write_text('{"page": 1, "links": 2}\n{"page": 2, "links": 1}\n')
    r = d.cli("pipeline-run", "nightly", str(src), "--exclusive-key", "portfolio:1", "--wait")
    assert r.returncode == 0, r
    run_id, *rest = r.stdout.splitlines()
    assert rest == [f"run {run_id} ended completed"], r.stdout
    assert "stage summarize ended: completed" in r.stderr, r.stderr
    r = d.cli("pipeline-status", run_id)
    assert r.returncode == 0 and "summarize" in r.stdout and "completed" in r.stdout, r
    r = d.cli("pipeline-cancel", run_id)
    assert r.returncode == 1 and r.stderr.startswith("error: ") and "409" in r.stderr, r
    assert "Traceback" not in r.stderr
    r = d.cli("pipeline-run", "nope", str(src))
    assert r.returncode == 1 and "no pipeline 'nope'" in r.stderr, r


def test_a_stage_that_starts_while_the_run_is_paused_starts_paused(d: Daemon) -> None:
    run = start_run(d, "napping", [{"sleep": 1}])
    d.wait_status(run["stages"][0]["batch_id"], "running")
    code, body, _ = d.api("POST", f"/v1/pipeline-runs/{run['id']}/pause")
    assert code == 200 and body["paused"], body
    # The running item finishes (pause stops claims only), the stage ends, and
    # the next one is created paused: none of its items starts.
    second = wait_for(
        lambda: get_run(d, run["id"])["stages"][1]["batch_id"], 20, what="the second stage"
    )
    b = d.batch(second)
    assert b["status"] == "paused" and b["counts"]["queued"] == 1, b
    code, body, _ = d.api("POST", f"/v1/pipeline-runs/{run['id']}/resume")
    assert code == 200 and not body["paused"], body
    assert wait_run(d, run["id"])["status"] == "completed"


def test_retry_of_a_run_stopped_by_a_failed_stage_runs_it_on(
    daemons: DaemonFactory, tmp_path: pathlib.Path
) -> None:
    handlers = HANDLERS | {
        "fetch": {"type": "python", "target": "tests.handlers:until_file", "timeout": "1h"},
    }
    pipes = {"strict": {"stages": stages(("again", "echo", "results_of"))}}
    d = daemons(handlers=handlers, extra={"pipelines": pipes})
    flag = tmp_path / "go"
    flag.touch()
    run = start_run(d, "strict", [{"file": str(flag), "fail_first": True}])
    stopped = wait_run(d, run["id"])
    assert stopped["status"] == "failed" and stopped["stages"][0]["status"] == "failed", stopped
    code, body, _ = d.api("POST", f"/v1/pipeline-runs/{run['id']}/retry")
    assert code == 200 and body["status"] == "running", body
    again = wait_run(d, run["id"])  # the second attempt succeeds, and the run goes on
    assert again["status"] == "completed", again
    assert [s["status"] for s in again["stages"]] == ["completed", "completed"], again
    assert d.items(again["stages"][1]["batch_id"])[0]["payload"] == {"released": str(flag)}
    assert_problem(d.api("POST", f"/v1/pipeline-runs/{run['id']}/retry", {"x": 1}), 422, "")


def test_doctor_names_runs_whose_stages_disagree_with_their_status(d: Daemon, db_url: str) -> None:
    done = wait_run(d, start_run(d, "strict", [1])["id"])
    going = start_run(d, "slow", [{"sleep": 60}])
    res = d.cli("doctor", "--config", str(d.config_path))
    assert res.returncode == 0 and "no drift" in res.stdout, res
    d.kill()  # no daemon to move the drifted runs on behind doctor's back
    # Drift made on purpose: an ended run whose current stage's batch runs, and a
    # running run whose stage's batch ended long ago without the run moving on.
    db_rows(
        db_url,
        "UPDATE supervisor.pipeline_runs SET status = 'failed', finished_at = now()"
        " WHERE id = $1::uuid",
        going["id"],
    )
    db_rows(
        db_url,
        "UPDATE supervisor.pipeline_runs SET status = 'running', finished_at = NULL"
        " WHERE id = $1::uuid",
        done["id"],
    )
    db_rows(
        db_url,
        "UPDATE supervisor.batches SET finished_at = now() - interval '1 hour' WHERE id = $1::uuid",
        done["stages"][-1]["batch_id"],
    )
    res = d.cli("doctor", "--config", str(d.config_path))
    assert res.returncode == 1, res
    assert f"pipeline: run {going['id']} (slow) ended failed but" in res.stdout, res.stdout
    assert f"pipeline: run {done['id']} (strict) is running but" in res.stdout, res.stdout


def test_a_large_stage_is_copied_and_its_results_are_read_page_by_page(d: Daemon) -> None:
    """1,500 derived items (past the inline limit: COPY in the advancing
    transaction), whose 1,500 results reach the next function over three pages."""
    run = wait_run(d, start_run(d, "nightly", [{"page": 7, "links": 1500}])["id"], timeout=120)
    assert run["status"] == "completed", run
    extract, summarize = (d.batch(s["batch_id"]) for s in run["stages"][1:])
    assert extract["counts"]["succeeded"] == 1500, extract
    (summary,) = d.items(summarize["id"])
    assert summary["payload"]["links"] == sorted(f"7/{i}" for i in range(1500))


def test_a_token_sees_and_steers_only_its_tenants_runs_with_its_handlers(
    daemons: DaemonFactory, db_url: str
) -> None:
    tokens = [
        {"name": "a", "tenant": "A", "sha256": sha256hex("token-a"), "scopes": ["read", "write"]},
        {"name": "b", "tenant": "B", "sha256": sha256hex("token-b"), "scopes": ["read", "write"]},
        {
            "name": "narrow",
            "tenant": "A",
            "sha256": sha256hex("token-narrow"),
            "scopes": ["read", "write"],
            "handlers": ["fetch", "extract"],
        },
    ]
    d = daemons(handlers=HANDLERS, extra={"pipelines": PIPELINES, "auth": {"tokens": tokens}})
    a, b = ({"Authorization": f"Bearer token-{t}"} for t in "ab")
    code, run, _ = d.api("POST", "/v1/pipelines/slow/runs", {"items": [{"sleep": 60}]}, a)
    assert code == 201 and run["tenant"] == "A", run
    code, first, _ = d.api("GET", f"/v1/batches/{run['stages'][0]['batch_id']}", None, a)
    assert code == 200 and first["tenant"] == "A", first
    assert_problem(d.api("GET", f"/v1/pipeline-runs/{run['id']}", None, b), 404)
    assert_problem(d.api("POST", f"/v1/pipeline-runs/{run['id']}/cancel", None, b), 404)
    code, listed, _ = d.api("GET", "/v1/pipeline-runs", None, b)
    assert code == 200 and listed["runs"] == [], listed
    # A token granted only some of a pipeline's handlers cannot start it.
    narrow = {"Authorization": "Bearer token-narrow"}
    problem = assert_problem(
        d.api("POST", "/v1/pipelines/nightly/runs", {"items": [1]}, narrow), 403
    )
    assert "summarize" in problem["detail"], problem
    assert len(db_rows(db_url, "SELECT id FROM supervisor.pipeline_runs")) == 1
    code, body, _ = d.api("POST", f"/v1/pipeline-runs/{run['id']}/cancel", None, a)
    assert code == 200, body
