"""Progress and deadline extensions from inside running attempts, through real
daemons: python handlers (async and plain), exec commands' control lines, the
item JSON, the batch's SSE stream and the stalled-progress gauge."""

from __future__ import annotations

import pathlib
import sys
import textwrap
import threading
from datetime import datetime
from typing import Any

from tests.daemon import DEFAULT_HANDLERS, sse_events, wait_for
from tests.test_handlers_exec import exec_handler

HANDLERS = dict(DEFAULT_HANDLERS) | {
    "steps": {"type": "python", "target": "tests.handlers:reports_progress", "timeout": "30s"},
    "sync_steps": {
        "type": "python",
        "target": "tests.handlers:sync_reports_progress",
        "timeout": "30s",
    },
    "bad": {
        "type": "python",
        "target": "tests.handlers:bad_progress",
        "timeout": "5s",
        "max_attempts": 1,
    },
    "extends": {
        "type": "python",
        "target": "tests.handlers:extends",
        "timeout": "500ms",
        "max_timeout": "2s",
        "max_attempts": 1,
    },
}


def ts(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def item_of(d: Any, batch_id: str) -> dict[str, Any]:
    (it,) = d.items(batch_id)
    code, full, _ = d.api("GET", f"/v1/items/{it['id']}")
    assert code == 200, full
    return dict(full)


def progress_shown(d: Any, batch_id: str, done: float) -> dict[str, Any] | None:
    it = item_of(d, batch_id)
    p = it["progress"]
    return it if p is not None and p["done"] == done else None


def events_until(url: str, out: list[tuple[str, Any]], stop_on: str) -> None:
    """Collect a batch's SSE events until one of kind ``stop_on`` or the end."""
    for event, data, _ in sse_events(url):
        out.append((event, data))
        if event == stop_on:
            return


def test_python_progress_shows_in_the_item_sse_and_metrics_while_it_runs(
    daemons: Any, tmp_path: pathlib.Path
) -> None:
    d = daemons(handlers=HANDLERS)
    gate = tmp_path / "go"
    note = "page 3 <NUL> of the site"
    b = d.submit("steps", [{"total": 5, "holds": {"3": str(gate)}, "note": note}])
    it = wait_for(lambda: progress_shown(d, b["id"], 3), 20, what="progress 3/5 in the item")
    p = it["progress"]
    assert it["status"] == "running"
    assert (p["done"], p["total"], p["attempt"]) == (3, 5, 1)
    assert p["note"] == "page 3 \\u0000 of the site"  # stored, with the NUL spelled out
    assert ts(p["reported_at"]) >= ts(it["started_at"])

    # A stream opened now gets the running item's latest progress at once.
    events: list[tuple[str, Any]] = []
    reader = threading.Thread(
        target=events_until, args=(f"{d.url}/v1/batches/{b['id']}/events", events, "progress")
    )
    reader.start()
    reader.join(30)
    assert not reader.is_alive()
    kind, ev = events[-1]
    assert kind == "progress" and ev["id"] == it["id"] and (ev["done"], ev["total"]) == (3, 5)

    code, metrics, _ = d.api("GET", "/metrics")
    assert code == 200
    stalled = [
        line
        for line in metrics.splitlines()
        if line.startswith('batch_supervisor_progress_stalled_seconds{handler="steps"}')
    ]
    assert stalled and float(stalled[0].split()[-1]) > 0, stalled

    gate.touch()
    d.wait_status(b["id"], "completed")
    done = item_of(d, b["id"])
    assert done["result"] == {"steps": 5} and done["progress"]["attempt"] == 1


def test_a_plain_function_reports_progress_without_await(
    daemons: Any, tmp_path: pathlib.Path
) -> None:
    d = daemons(handlers=HANDLERS)
    gate = tmp_path / "go"
    b = d.submit("sync_steps", [{"file": str(gate)}])
    it = wait_for(lambda: progress_shown(d, b["id"], 1), 20, what="progress 1/2")
    assert (it["progress"]["total"], it["progress"]["note"]) == (2, "half")
    gate.touch()
    d.wait_status(b["id"], "completed")


def test_a_bad_progress_argument_fails_the_attempt_naming_it(daemons: Any) -> None:
    d = daemons(handlers=HANDLERS)
    b = d.submit("bad", [1])
    d.wait_status(b["id"], "failed")
    err = item_of(d, b["id"])["errors"][-1]
    assert err["type"] == "TypeError"
    assert err["message"] == "progress done must be a number, not str"


def test_extend_outlives_the_timeout_up_to_max_timeout(daemons: Any) -> None:
    # timeout 0.5 s, max_timeout 2 s: asking for 1.5 s more lets a 1 s sleep finish;
    # asking for 30 s is capped (the attempt times out 2 s after it started); not
    # asking times out at 0.5 s.
    d = daemons(handlers=HANDLERS)
    b = d.submit(
        "extends",
        [{"extend": 1.5, "sleep": 1.0}, {"extend": 30, "sleep": 10}, {"sleep": 1.0}],
    )
    d.wait_status(b["id"], "completed_with_errors", timeout=30)
    code, body, _ = d.api("GET", f"/v1/batches/{b['id']}/items")
    assert code == 200
    extended, capped, plain = body["items"]
    assert extended["status"] == "succeeded", extended
    assert 1.0 < extended["result"]["left"] <= 1.5
    for it in (capped, plain):
        code, full, _ = d.api("GET", f"/v1/items/{it['id']}")
        assert full["status"] == "failed" and full["errors"][-1]["type"] == "Timeout", full
    ran = ts(capped["finished_at"]) - ts(capped["started_at"])
    assert 1.9 <= ran.total_seconds() < 9, ran  # capped at max_timeout, not 30 s
    assert "attempt.extend_capped" in d.log()


EXEC_PROGRESS = """
import os, sys, time
payload = sys.stdin.read()
print('::bsv-progress {"done": 1, "total": 2, "note": "from exec"}', flush=True)
print("::bsv-progress this is not json", flush=True)
while not os.path.exists(GATE):
    time.sleep(0.02)
print("::bsv-extend 1", flush=True)
print('{"ok": 1}')
"""


def test_exec_control_lines_report_progress_and_stay_out_of_the_result(
    daemons: Any, tmp_path: pathlib.Path
) -> None:
    gate = tmp_path / "go"
    path = tmp_path / "progress.py"
    path.write_text(f"GATE = {str(gate)!r}\n" + textwrap.dedent(EXEC_PROGRESS))
    d = daemons(handlers={"run": exec_handler([sys.executable, str(path)])})
    b = d.submit("run", [{}])
    it = wait_for(lambda: progress_shown(d, b["id"], 1), 20, what="exec progress 1/2")
    assert (it["progress"]["total"], it["progress"]["note"]) == (2, "from exec")
    gate.touch()
    d.wait_status(b["id"], "completed")
    assert item_of(d, b["id"])["result"] == {"ok": 1}  # the control lines are not output
    assert "exec.control_line_ignored" in d.log()  # the malformed one, named
