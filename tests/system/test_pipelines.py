"""Pipelines across real daemons: two daemons advancing the same runs create each
stage's batch once, and a daemon killed (SIGKILL) while it derives the next
stage's items, its transaction open and the run locked, leaves nothing behind:
another daemon (running alongside, or started later) derives them again and the
run ends with exactly one batch per stage."""

from __future__ import annotations

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
