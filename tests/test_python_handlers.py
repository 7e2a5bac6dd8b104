"""Python handlers: plain functions run in a thread; exceptions are
retried with backoff; RetryAfter chooses the delay; timeouts are recorded."""

from __future__ import annotations

import signal
from datetime import datetime
from typing import Any

from tests.daemon import DEFAULT_HANDLERS

FAST_RETRY = {"initial": "10ms", "max": "20ms", "multiplier": 2.0, "jitter": 0.0}
HANDLERS = dict(DEFAULT_HANDLERS) | {
    "sync": {"type": "python", "target": "tests.handlers:sync_echo", "timeout": "5s"},
    "flaky": {
        "type": "python",
        "target": "tests.handlers:flaky",
        "timeout": "5s",
        "retry_backoff": FAST_RETRY,
    },
    "later": {"type": "python", "target": "tests.handlers:retry_after", "timeout": "5s"},
    "slow": {
        "type": "python",
        "target": "tests.handlers:sleeper",
        "timeout": "200ms",
        "max_attempts": 2,
        "retry_backoff": FAST_RETRY,
    },
}


def ts(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def one_item(d: Any, handler: str, payload: Any, status: str) -> dict[str, Any]:
    b = d.submit(handler, [payload])
    d.wait_status(b["id"], status, timeout=20)
    (item,) = d.items(b["id"])
    code, full, _ = d.api("GET", f"/v1/items/{item['id']}")
    assert code == 200
    return dict(full)


def test_plain_function_runs_and_its_result_is_stored(daemons: Any) -> None:
    d = daemons(handlers=HANDLERS)
    it = one_item(d, "sync", {"x": 1}, "completed")
    assert it["result"] == {"sync": {"x": 1}} and it["attempts"] == 1


def test_exception_is_retried_and_recorded_then_succeeds(daemons: Any) -> None:
    d = daemons(handlers=HANDLERS)
    it = one_item(d, "flaky", "p", "completed")
    assert it["attempts"] == 2 and it["result"] == {"ok": 2}
    assert [(e["attempt"], e["type"]) for e in it["errors"]] == [(1, "ConnectionError")]
    assert it["errors"][0]["message"] == "transient upstream failure"


def test_retry_after_sets_the_delay_before_the_next_attempt(daemons: Any) -> None:
    d = daemons(handlers=HANDLERS)
    it = one_item(d, "later", "p", "completed")
    assert it["attempts"] == 2
    (err,) = it["errors"]
    assert err["type"] == "RetryAfter"
    assert (ts(it["started_at"]) - ts(err["at"])).total_seconds() >= 0.45


def test_timeout_is_recorded_and_retried_until_attempts_are_spent(daemons: Any) -> None:
    d = daemons(handlers=HANDLERS)
    it = one_item(d, "slow", {"sleep": 30}, "failed")
    assert it["attempts"] == 2
    assert [e["type"] for e in it["errors"]] == ["Timeout", "Timeout"]
    assert "timeout of 0.2s" in it["errors"][0]["message"]


def _threads(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Threads:"))


def test_hung_plain_functions_leak_a_bounded_number_of_threads(daemons: Any) -> None:
    """Each timed-out attempt abandons its thread (threads cannot be killed); a
    handler that always hangs must not grow the daemon's threads without bound."""
    from supervisor.handlers.python import ABANDONED_MAX

    hangs = {
        "type": "python",
        "target": "tests.handlers:sync_hangs",
        "timeout": "100ms",
        "max_attempts": 1,
        "concurrency": 4,
    }
    d = daemons(handlers=HANDLERS | {"hangs": hangs})
    baseline = _threads(d.pid)
    n = 4 * ABANDONED_MAX
    b = d.submit("hangs", [{"sleep": 120, "n": i} for i in range(n)])
    done = d.wait_status(b["id"], "failed", timeout=60)
    assert done["counts"]["failed"] == n
    assert _threads(d.pid) <= baseline + ABANDONED_MAX + 4, (baseline, _threads(d.pid))
    kinds: set[str] = set()
    for item in d.items(b["id"]):
        code, full, _ = d.api("GET", f"/v1/items/{item['id']}")
        assert code == 200
        kinds.update(e["type"] for e in full["errors"])
    assert kinds == {"Timeout", "ThreadsExhausted"}, kinds
    code, text, _ = d.api("GET", "/metrics")
    gauge = 'batch_supervisor_handler_threads_abandoned{handler="hangs"} '
    (line,) = [x for x in str(text).splitlines() if x.startswith(gauge)]
    # The cap, plus at most the attempts that were running when it was reached.
    assert ABANDONED_MAX <= float(line.split()[-1]) <= ABANDONED_MAX + 4, line


def test_a_drain_does_not_wait_for_abandoned_threads(daemons: Any) -> None:
    """The interpreter joins non-daemon threads at exit: a hung plain def used to
    keep a drained daemon alive forever after 'app.stopped'."""
    hangs = {
        "type": "python",
        "target": "tests.handlers:sync_hangs",
        "timeout": "100ms",
        "max_attempts": 1,
    }
    d = daemons(handlers=HANDLERS | {"hangs": hangs})
    b = d.submit("hangs", [{"sleep": 600, "n": i} for i in range(3)])
    d.wait_status(b["id"], "failed", timeout=30)
    d.signal(signal.SIGTERM)
    assert d.wait_exit(30) == 0, d.log()
    assert "abandoned handler thread(s) still running" in d.log(), d.log()
