"""Batch controls and live progress: pause/resume, retry, PATCH,
DELETE, the failure budget, and SSE across daemons."""

from __future__ import annotations

import threading
import time
from typing import Any

from tests.daemon import DEFAULT_HANDLERS, Daemon, sse_events, wait_for


def read_events(
    url: str, headers: dict[str, str] | None = None, timeout: float = 30
) -> list[tuple[str, Any, str | None, float]]:
    """(event, data, id, arrival time) for every event until the server closes."""
    return [
        (event, data, eid, time.monotonic())
        for event, data, eid in sse_events(url, headers, timeout)
    ]


def test_pause_freezes_progress_and_resume_continues(daemons: Any) -> None:
    d = daemons(worker={"concurrency": 2})
    b = d.submit("echo", [{"sleep": 0.3} for _ in range(10)])
    wait_for(lambda: d.batch(b["id"])["counts"]["running"] >= 2, 10, what="2 running")
    status, paused, _ = d.api("POST", f"/v1/batches/{b['id']}/pause")
    assert status == 200 and paused["status"] == "paused"
    assert d.api("POST", f"/v1/batches/{b['id']}/pause")[0] == 200  # idempotent
    # running ones finish (at most `concurrency` of them), nothing new starts; claimed
    # items that had not started yet are handed back to the queue
    frozen = wait_for(
        lambda: (c := d.batch(b["id"])["counts"])["running"] == 0 and c,
        10,
        what="running items finished",
    )
    done_at_pause = paused["counts"]["succeeded"]
    # what may still finish: attempts running at the pause and outcomes not yet
    # written, at most concurrency + prefetch (2 + 2); claimed-but-unstarted ones
    # were handed back
    assert done_at_pause <= frozen["succeeded"] <= done_at_pause + 4
    assert frozen["queued"] == 10 - frozen["succeeded"]
    time.sleep(0.8)  # a window in which an unpaused daemon would have started more
    assert d.batch(b["id"])["counts"] == frozen
    status, resumed, _ = d.api("POST", f"/v1/batches/{b['id']}/resume")
    assert status == 200 and resumed["status"] == "running"
    done = d.wait_status(b["id"], "completed", timeout=20)
    assert done["counts"]["succeeded"] == 10
    assert d.api("POST", f"/v1/batches/{b['id']}/pause")[0] == 409  # terminal
    _, log, _ = d.api("GET", f"/v1/batches/{b['id']}/log")
    actions = [e["action"] for e in log["entries"]]
    assert actions.index("paused") < actions.index("resumed") < actions.index("finished")
    assert all(e["actor"] and e["at"] for e in log["entries"])


def test_retry_of_completed_with_errors_batch_ends_completed(daemons: Any, tmp_path: Any) -> None:
    flag = tmp_path / "fixed"
    handlers = dict(DEFAULT_HANDLERS) | {
        "gated": {
            "type": "python",
            "target": "tests.handlers:gated",
            "timeout": "5s",
            "max_attempts": 1,
        },
    }
    d = daemons(handlers=handlers, env={"BSV_TEST_GATE": str(flag)})
    b = d.submit("gated", [{"ok": True}, {"ok": False}, {"ok": False}])
    done = d.wait_status(b["id"], "completed_with_errors")
    assert done["counts"]["failed"] == 2
    flag.write_text("fixed")  # the upstream problem is fixed: failing items now succeed
    status, body, _ = d.api("POST", f"/v1/batches/{b['id']}/retry")
    assert status == 200 and body["status"] == "running" and body["finished_at"] is None
    again = d.wait_status(b["id"], "completed")
    assert again["counts"]["succeeded"] == 3
    for it in d.items(b["id"]):
        if it["payload"]["ok"] is False:
            assert it["attempts"] == 2 and it["max_attempts"] == 2  # budget grew by 1 (original)
    assert d.api("POST", f"/v1/batches/{b['id']}/retry")[0] == 409  # nothing to retry
    _, log, _ = d.api("GET", f"/v1/batches/{b['id']}/log")
    assert [e["action"] for e in log["entries"]].count("finished") == 2


def test_failure_budget_stops_the_batch_early_as_failed(daemons: Any) -> None:
    # prefetch pinned: an "auto" window would grow for this instant handler
    d = daemons(worker={"concurrency": 2, "prefetch": 2})
    b = d.submit("permanent", list(range(50)), max_failures="10%")
    done = d.wait_status(b["id"], "failed", timeout=20)
    c = done["counts"]
    # 10% of 50 = 5: the write that records the 6th failure stops it. What can still
    # fail is bounded by what the daemon held: the outcomes in that same write and
    # the attempts running when the stop arrived, each at most concurrency +
    # prefetch (2 + 2 here); everything else is cancelled.
    assert 6 <= c["failed"] <= 5 + 1 + 2 * (2 + 2), c
    assert c["cancelled"] == 50 - c["failed"] and c["succeeded"] == 0
    _, log, _ = d.api("GET", f"/v1/batches/{b['id']}/log")
    assert "failure_budget_exceeded" in [e["action"] for e in log["entries"]]


def test_patch_and_delete(daemons: Any) -> None:
    d = daemons(worker={"concurrency": 1})
    b = d.submit("sleeper", [{"sleep": 3600}, {"sleep": 3600}])
    status, body, _ = d.api(
        "PATCH", f"/v1/batches/{b['id']}", {"priority": 5, "max_concurrency": 1, "max_failures": 3}
    )
    assert status == 200
    assert (body["priority"], body["max_concurrency"], body["max_failures"]) == (5, 1, 3)
    assert body["version"] > b["version"]
    assert d.api("PATCH", f"/v1/batches/{b['id']}", {"priority": "high"})[0] == 422
    assert d.api("DELETE", f"/v1/batches/{b['id']}")[0] == 409  # not terminal
    d.api("POST", f"/v1/batches/{b['id']}/cancel")
    d.wait_status(b["id"], "cancelled")
    assert d.api("PATCH", f"/v1/batches/{b['id']}", {"priority": 1})[0] == 409
    assert d.api("DELETE", f"/v1/batches/{b['id']}")[0] == 204
    assert d.api("GET", f"/v1/batches/{b['id']}")[0] == 404


def test_sse_client_mid_run_gets_terminal_snapshot_within_a_second(daemons: Any) -> None:
    d = daemons(worker={"concurrency": 4})
    b = d.submit("echo", [{"sleep": 0.2} for _ in range(12)])
    wait_for(lambda: d.batch(b["id"])["counts"]["succeeded"] > 0, 10, what="progress")
    events = read_events(f"{d.url}/v1/batches/{b['id']}/events")
    kinds = [e[0] for e in events]
    assert kinds[0] == "snapshot" and kinds[-1] == "end"
    snaps = [e for e in events if e[0] == "snapshot"]
    assert len(snaps) >= 2, "progress snapshots while running"
    assert [int(str(e[2])) for e in snaps] == sorted(int(str(e[2])) for e in snaps)  # id: version
    terminal = snaps[-1]
    assert terminal[1]["status"] == "completed"
    # the batch finished at finished_at; the snapshot arrived within a second of that
    finished = d.batch(b["id"])["finished_at"]
    assert finished is not None
    end_arrival = events[-1][3]
    assert end_arrival - terminal[3] < 1.0
    assert sum(1 for k in kinds if k == "item") >= 1


def test_sse_on_daemon_b_sees_batch_processed_by_daemon_a(daemons: Any) -> None:
    handlers_a = dict(DEFAULT_HANDLERS)
    handlers_b = {k: v for k, v in DEFAULT_HANDLERS.items() if k != "echo"}
    handlers_b["echo"] = {"type": "python", "target": "tests.handlers:echo", "concurrency": 1}
    a: Daemon = daemons("a", handlers=handlers_a)
    b: Daemon = daemons("b", handlers=handlers_b, worker={"concurrency": 1})
    batch = a.submit("echo", [{"sleep": 0.2} for _ in range(6)])
    results: list[list[tuple[str, Any, str | None, float]]] = []
    t = threading.Thread(
        target=lambda: results.append(read_events(f"{b.url}/v1/batches/{batch['id']}/events"))
    )
    t.start()
    t.join(30)
    assert results, "stream on daemon b did not end"
    events = results[0]
    assert events[-1][0] == "end"
    assert [e for e in events if e[0] == "snapshot"][-1][1]["status"] == "completed"


def test_last_event_id_resumes_item_events(daemons: Any) -> None:
    d = daemons(worker={"concurrency": 1})
    b = d.submit("echo", [{"sleep": 0.1, "i": i} for i in range(5)])
    done = d.wait_status(b["id"], "completed")
    events = read_events(f"{d.url}/v1/batches/{b['id']}/events", headers={"Last-Event-ID": "1"})
    items = [e for e in events if e[0] == "item"]
    assert len({e[1]["id"] for e in items}) == 5  # every item since version 1
    assert events[-1][0] == "end" and events[-2][2] == str(done["version"])
