"""Completion callbacks as a client sees them: ``submit --wait`` returns only once
the callback has run (it used to exit at the batch's terminal status, before the
callback), its failure is reported and exits non-zero, and an admin can redeliver
a failed callback with a fresh attempt budget."""

from __future__ import annotations

import json
import pathlib
from typing import Any

from tests.daemon import DEFAULT_HANDLERS, Daemon, wait_for

FAST = {"initial": "10ms", "max": "10ms", "jitter": 0.0}
HANDLERS = DEFAULT_HANDLERS | {
    "cb_slow": {"type": "python", "target": "tests.handlers:callback_slow", "timeout": "5s"},
    "cb_flag": {
        "type": "python",
        "target": "tests.handlers:callback_until_flag",
        "timeout": "5s",
        "max_attempts": 2,
        "retry_backoff": FAST,
    },
}


def _items(tmp_path: pathlib.Path) -> str:
    src = tmp_path / "items.jsonl"
    src.write_text("\n".join(json.dumps({"n": i}) for i in range(3)) + "\n")
    return str(src)


def test_submit_wait_returns_after_the_callback_ran(daemons: Any, tmp_path: pathlib.Path) -> None:
    d: Daemon = daemons(handlers=HANDLERS)
    out = d.cli("submit", "echo", _items(tmp_path), "--on-complete", "cb_slow", "--wait")
    assert out.returncode == 0, out
    batch_id = out.stdout.splitlines()[0]
    assert d.batch(batch_id)["callback"]["state"] == "succeeded", d.batch(batch_id)
    assert "completion callback cb_slow succeeded after 1 attempt(s)" in out.stdout, out


def test_a_failed_callback_is_reported_and_can_be_redelivered(
    daemons: Any, tmp_path: pathlib.Path
) -> None:
    d: Daemon = daemons(handlers=HANDLERS)
    flag = tmp_path / "downstream-up"
    meta = json.dumps({"flag": str(flag)})
    src = _items(tmp_path)
    out = d.cli("submit", "echo", src, "--on-complete", "cb_flag", "--metadata", meta, "--wait")
    assert out.returncode == 1, out
    batch_id = out.stdout.splitlines()[0]
    assert "completion callback cb_flag failed after 2 attempt(s)" in out.stdout, out
    assert "the downstream service is down" in out.stdout, out
    assert f"batch-supervisor redeliver {batch_id}" in out.stdout, out

    flag.touch()
    again = d.cli("redeliver", batch_id)
    assert again.returncode == 0, again
    wait_for(lambda: d.batch(batch_id)["callback"]["state"] == "succeeded", 20, 0.05)
    cb = d.batch(batch_id)["callback"]
    assert cb["attempts"] == 1 and cb["error"] is None, cb  # a fresh budget
    watched = d.cli("watch", batch_id)
    assert watched.returncode == 0, watched
    assert "completion callback cb_flag succeeded" in watched.stdout, watched

    # Only a finished callback is redelivered; a batch without one says so.
    plain = d.submit("echo", [1])
    d.wait_status(plain["id"], "completed", 20)
    status, body, _ = d.api("POST", f"/v1/batches/{plain['id']}/callback/redeliver")
    assert status == 409 and "no completion callback" in body["detail"], (status, body)
    status, body, _ = d.api(
        "POST", "/v1/batches/00000000-0000-0000-0000-000000000000/callback/redeliver"
    )
    assert status == 404, (status, body)


def test_callback_retries_keep_sub_second_backoff(daemons: Any, tmp_path: pathlib.Path) -> None:
    """The delay went through an integer parameter: 500 ms became 0."""
    backoff = {"initial": "500ms", "max": "500ms", "multiplier": 1.0, "jitter": 0.0}
    cb = {
        "type": "python",
        "target": "tests.handlers:callback_fails_timed",
        "timeout": "5s",
        "max_attempts": 2,
        "retry_backoff": backoff,
    }
    d: Daemon = daemons(handlers=HANDLERS | {"cb_timed": cb})
    times = tmp_path / "times"
    b = d.submit("echo", [1], on_complete="cb_timed", metadata={"times": str(times)})
    wait_for(lambda: d.batch(b["id"])["callback"]["state"] == "failed", 20, 0.05)
    first, second = (float(t) for t in times.read_text().split())
    assert second - first >= 0.5, second - first
