"""Backpressure per key across daemons: a handler says its key is throttled
(RetryAfter(s, scope="key")), and no item of that key starts on any daemon until
the pause is over, while the other keys go on; the attempt that said so is not
counted against max_attempts."""

from __future__ import annotations

import pathlib
from typing import Any

from tests.daemon import DEFAULT_HANDLERS
from tests.system.test_key_limits import by_domain
from tests.test_scheduling import runlog

PAUSE_S = 2.0


def test_a_throttled_key_waits_on_both_daemons_while_the_others_run(
    daemons: Any, tmp_path: pathlib.Path
) -> None:
    log = tmp_path / "runs.jsonl"
    # max_attempts 1: were the throttled attempt counted, its item would fail.
    # Key concurrency 1: no other item of key a is claimed while a#0 runs.
    handlers = dict(DEFAULT_HANDLERS) | {
        "scrape": {
            "type": "python",
            "target": "tests.handlers:throttle_key",
            "timeout": "30s",
            "max_attempts": 1,
            "concurrency": 2,
            "key_limit": {"key": "/domain", "concurrency": 1},
        }
    }
    env = {"BSV_TEST_RUNLOG": str(log)}
    a = daemons("a", handlers=handlers, env=env, worker={"concurrency": 8})
    daemons("b", handlers=handlers, env=env, worker={"concurrency": 8})
    entries = [{"key": "a#0", "payload": {"domain": "a", "throttle": PAUSE_S}}]
    entries += [{"key": f"a#{i}", "payload": {"domain": "a", "sleep": 0.05}} for i in range(1, 5)]
    entries += [{"key": f"b#{i}", "payload": {"domain": "b", "sleep": 0.3}} for i in range(10)]
    batch = a.submit("scrape", entries)
    a.wait_status(batch["id"], "completed", timeout=60)

    events = runlog(log)
    (throttled,) = [e for e in events if e["event"] == "throttled"]
    assert throttled["key"] == "a#0", throttled
    t0 = throttled["mono"]  # CLOCK_MONOTONIC: one clock for both daemons' handlers
    per = by_domain([e for e in events if e["event"] == "start"])
    a_starts = sorted(e["mono"] for e in per["a"])
    assert len(a_starts) == 5, per["a"]  # a#0's second attempt and a#1..a#4
    # Nothing of key a started on either daemon before the pause was over (it runs
    # from the outcome write, just after the raise).
    assert a_starts[0] >= t0 + PAUSE_S - 0.01, (a_starts[0] - t0, per["a"])
    # Key b went on meanwhile.
    b_during = [t for t in (e["mono"] for e in per["b"]) if t0 < t < t0 + PAUSE_S]
    assert len(b_during) >= 2, [e["mono"] - t0 for e in per["b"]]
    assert len({e["pid"] for e in events}) == 2, "both daemons should have run some items"

    items = {i["key"]: i for i in a.items(batch["id"])}
    first = items["a#0"]
    # Its throttled attempt counted in attempts and given back in max_attempts.
    assert (first["status"], first["attempts"], first["max_attempts"]) == (
        "succeeded",
        2,
        2,
    ), first
    assert all(i["status"] == "succeeded" for i in items.values()), items
