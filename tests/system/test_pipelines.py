"""Pipelines across real daemons: two daemons advancing the same runs create each
stage's batch once, and a daemon killed (SIGKILL) while it derives the next
stage's items, its transaction open and the run locked, leaves nothing behind:
another daemon (running alongside, or started later) derives them again and the
run ends with exactly one batch per stage."""

from __future__ import annotations

import concurrent.futures
import pathlib
from typing import Any

from tests.conftest import DaemonFactory
from tests.daemon import Daemon, wait_for
from tests.test_api import db_rows
from tests.test_pipelines import HANDLERS, PIPELINES, stage_batches, stages, start_run, wait_run

GATED = PIPELINES | {
    "gated": {"stages": stages(("derive", "echo", "gated"), ("last", "echo", "passthrough"))}
}


def gated_daemon(daemons: DaemonFactory, name: str, gate: pathlib.Path, **kw: Any) -> Daemon:
    return daemons(
        name,
        handlers=HANDLERS,
        extra={"pipelines": GATED},
        env={"BSV_PIPE_GATE": str(gate)},
        **kw,
    )


def one_batch_per_stage(db_url: str, run_id: str, names: list[str]) -> None:
    rows = stage_batches(db_url, run_id)
    assert [(r["stage"], r["n"]) for r in rows] == [(n, 1) for n in names], rows
    stage_rows = db_rows(
        db_url,
        "SELECT stage, batch_id FROM supervisor.pipeline_stages WHERE run_id = $1::uuid"
        " ORDER BY stage",
        run_id,
    )
    assert [r["stage"] for r in stage_rows] == list(range(len(names))), stage_rows


def test_two_daemons_create_each_stage_once(daemons: DaemonFactory, db_url: str) -> None:
    d1 = daemons("d1", handlers=HANDLERS, extra={"pipelines": PIPELINES})
    d2 = daemons("d2", handlers=HANDLERS, extra={"pipelines": PIPELINES})
    runs = [
        start_run(d1 if i % 2 else d2, "nightly", [{"page": p, "links": 2} for p in range(3)])
        for i in range(12)
    ]
    for run in runs:
        ended = wait_run(d1, run["id"], timeout=60)
        assert ended["status"] == "completed", ended
        one_batch_per_stage(db_url, run["id"], ["fetch", "extract", "summarize"])
    started = d1.log().count("pipelines.stage_started") + d2.log().count("pipelines.stage_started")
    assert started == 2 * len(runs), (d1.log()[-2000:], d2.log()[-2000:])


def test_a_daemon_killed_while_deriving_a_stage_leaves_one_batch_per_stage(
    daemons: DaemonFactory, db_url: str, tmp_path: pathlib.Path
) -> None:
    gate = tmp_path / "gate"
    d1 = gated_daemon(daemons, "d1", gate)
    run = start_run(d1, "gated", [1, 2, 3])
    entered = pathlib.Path(f"{gate}.entered")
    wait_for(entered.exists, 30, what="d1 deriving the second stage's items")
    d1.kill()  # SIGKILL: its transaction (the run's lock, nothing written yet) dies with it
    assert [r["stage"] for r in stage_batches(db_url, run["id"])] == ["fetch"]
    gate.touch()
    d2 = gated_daemon(daemons, "d2", gate)
    ended = wait_run(d2, run["id"], timeout=60)
    assert ended["status"] == "completed", ended
    one_batch_per_stage(db_url, run["id"], ["fetch", "derive", "last"])
    assert [i["payload"] for i in d2.items(ended["stages"][2]["batch_id"])] == [1, 2, 3]


def test_the_other_daemon_takes_over_a_run_whose_deriving_daemon_was_killed(
    daemons: DaemonFactory, db_url: str, tmp_path: pathlib.Path
) -> None:
    gate = tmp_path / "gate"
    d1 = gated_daemon(daemons, "d1", gate)
    d2 = gated_daemon(daemons, "d2", gate)
    run = start_run(d1, "gated", [1, 2])
    entered = pathlib.Path(f"{gate}.entered")
    wait_for(entered.exists, 30, what="a daemon deriving the second stage's items")
    pid = int(wait_for(lambda: entered.read_text(), 5, what="the deriving daemon's pid"))
    victim, survivor = (d1, d2) if d1.pid == pid else (d2, d1)
    assert victim.pid == pid
    victim.kill()
    gate.touch()
    ended = wait_run(survivor, run["id"], timeout=60)
    assert ended["status"] == "completed", ended
    one_batch_per_stage(db_url, run["id"], ["fetch", "derive", "last"])
    assert "pipelines.stage_started" in survivor.log()


def test_a_cancel_while_the_next_stage_is_derived_lets_no_later_stage_start(
    daemons: DaemonFactory, db_url: str, tmp_path: pathlib.Path
) -> None:
    gate = tmp_path / "gate"
    d = gated_daemon(daemons, "d1", gate)
    run = start_run(d, "gated", [1, 2])
    wait_for(pathlib.Path(f"{gate}.entered").exists, 30, what="the second stage being derived")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        cancel = pool.submit(d.api, "POST", f"/v1/pipeline-runs/{run['id']}/cancel")

        def cancel_waits_for_the_run() -> bool:
            return bool(
                db_rows(
                    db_url,
                    "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                    " AND query ILIKE '%pipeline_runs%FOR UPDATE%'",
                )
            )

        wait_for(cancel_waits_for_the_run, 20, what="the cancel waiting for the run's lock")
        gate.touch()
        code, body, _ = cancel.result(timeout=60)
    assert code == 200 and body["cancel_requested"], body
    ended = wait_run(d, run["id"])
    assert ended["status"] == "cancelled", ended
    fetch, derive, last = ended["stages"]
    assert fetch["status"] == "completed"
    # The stage being created when the cancel came is created, then cancelled
    # (unless its two echo items finished first); the one after it never starts.
    assert derive["batch_id"] is not None and derive["status"] in ("cancelled", "completed")
    assert last == last | {"batch_id": None, "status": "skipped"}, last
    assert [r["stage"] for r in stage_batches(db_url, run["id"])] == ["fetch", "derive"]


def test_a_run_cancelled_after_its_stage_completed_starts_no_later_stage(
    daemons: DaemonFactory, db_url: str, tmp_path: pathlib.Path
) -> None:
    """The state a cancel leaves when it comes between a stage's end and the
    next stage's creation (the batch completed, so only the run's flag says
    stop), made with no daemon running: the next daemon ends the run."""
    gate = tmp_path / "gate"
    d1 = gated_daemon(daemons, "d1", gate)
    run = start_run(d1, "gated", [1])
    wait_for(pathlib.Path(f"{gate}.entered").exists, 30, what="the second stage being derived")
    d1.kill()
    db_rows(
        db_url,
        "UPDATE supervisor.pipeline_runs SET cancel_requested = true WHERE id = $1::uuid",
        run["id"],
    )
    gate.touch()
    d2 = gated_daemon(daemons, "d2", gate)
    ended = wait_run(d2, run["id"])
    assert ended["status"] == "cancelled", ended
    assert [(s["status"], s["batch_id"] is None) for s in ended["stages"]] == [
        ("completed", False),
        ("skipped", True),
        ("skipped", True),
    ], ended
    assert [r["stage"] for r in stage_batches(db_url, run["id"])] == ["fetch"]
