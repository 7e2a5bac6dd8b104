"""Backpressure per key across daemons: a handler says its key is throttled
(RetryAfter(s, scope="key")), and no item of that key starts on any daemon until
the pause is over, while the other keys go on; the attempt that said so is not
counted against max_attempts."""

from __future__ import annotations

import pathlib
from datetime import UTC, datetime, timedelta
from typing import Any

from tests.daemon import DEFAULT_HANDLERS, wait_for
from tests.system.test_key_limits import by_domain
from tests.system.test_operations import metrics_of
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
    # Which daemon claims what is up to timing (on a loaded machine one daemon can
    # take every item); that the other daemon honours a pause it did not write is
    # test_the_pause_outlives_the_daemon_that_wrote_it's to show, deterministically.

    items = {i["key"]: i for i in a.items(batch["id"])}
    first = items["a#0"]
    # Its throttled attempt counted in attempts and given back in max_attempts.
    assert (first["status"], first["attempts"], first["max_attempts"]) == (
        "succeeded",
        2,
        2,
    ), first
    assert all(i["status"] == "succeeded" for i in items.values()), items


def test_get_limits_lists_the_throttled_keys_and_the_metric_counts_them(daemons: Any) -> None:
    handlers = dict(DEFAULT_HANDLERS) | {
        "scrape": {
            "type": "python",
            "target": "tests.handlers:throttle_key",
            "timeout": "30s",
            "key_limit": {"key": "/domain", "concurrency": 1},
        }
    }
    d = daemons("a", handlers=handlers)
    status, body, _ = d.api("GET", "/v1/limits")
    assert status == 200, body
    # echo (no key_limit) is not listed; scrape is, with nothing throttled yet.
    assert body == {
        "handlers": [
            {
                "name": "scrape",
                "key_limit": {
                    "key": "/domain",
                    "concurrency": 1,
                    "rate_limit": None,
                    "burst": None,
                    "budget": None,
                    "budget_period": None,
                    "cost": None,
                },
                "throttled_keys": [],
                "keys": [],
                "keys_truncated": False,
            }
        ],
        "truncated": False,
    }, body
    batch = d.submit(
        "scrape",
        [{"domain": "slow.example", "throttle": 3600}, {"domain": "slow.example"}, {"domain": "b"}],
    )

    def throttled() -> list[dict[str, Any]]:
        status, body, _ = d.api("GET", "/v1/limits")
        assert status == 200, body
        return list(body["handlers"][0]["throttled_keys"])

    wait_for(lambda: throttled() != [], 20, what="slow.example throttled")
    (paused,) = throttled()
    assert paused["limit_key"] == "slow.example", paused
    until = datetime.fromisoformat(paused["throttled_until"].replace("Z", "+00:00"))
    assert until > datetime.now(UTC) + timedelta(seconds=3500), paused
    # The other key runs; both items of the throttled one wait, queued.
    wait_for(lambda: d.batch(batch["id"])["counts"]["succeeded"] == 1, 20, what="b done")
    counts = d.batch(batch["id"])["counts"]
    assert (counts["queued"], counts["running"]) == (2, 0), counts
    cli = d.cli("limits")
    assert cli.returncode == 0, cli.stderr
    assert "scrape" in cli.stdout and "throttled keys: 1" in cli.stdout, cli.stdout
    assert f"'slow.example' until {paused['throttled_until']}" in cli.stdout, cli.stdout
    m = metrics_of(d)
    assert m['batch_supervisor_key_throttles_total{handler="scrape"}'] == 1.0, m
    assert m['batch_supervisor_items_total{handler="scrape",outcome="released"}'] == 1.0, m
    status, _, _ = d.api("POST", f"/v1/batches/{batch['id']}/cancel")
    assert status == 200
    d.wait_status(batch["id"], "cancelled", timeout=30)


def test_the_pause_outlives_the_daemon_that_wrote_it(daemons: Any, tmp_path: pathlib.Path) -> None:
    """Daemon a pauses key x and is SIGKILLed; daemon b, started after, holds x's
    items until the pause written by a ends (it is in the database, not in a)."""
    log = tmp_path / "runs.jsonl"
    handlers = dict(DEFAULT_HANDLERS) | {
        "scrape": {
            "type": "python",
            "target": "tests.handlers:throttle_key",
            "timeout": "30s",
            "key_limit": {"key": "/domain", "concurrency": 1},
        }
    }
    env = {"BSV_TEST_RUNLOG": str(log)}
    a = daemons("a", handlers=handlers, env=env)
    batch = a.submit(
        "scrape",
        [{"key": "x#0", "payload": {"domain": "x", "throttle": 3}}]
        + [{"key": f"x#{i}", "payload": {"domain": "x"}} for i in (1, 2)],
    )

    def paused_until() -> list[str]:
        status, body, _ = a.api("GET", "/v1/limits")
        assert status == 200, body
        return [k["throttled_until"] for k in body["handlers"][0]["throttled_keys"]]

    wait_for(lambda: paused_until() != [], 20, what="x throttled on a")
    (until_text,) = paused_until()
    a.kill()
    b = daemons("b", handlers=handlers, env=env)
    b.wait_status(batch["id"], "completed", timeout=60)
    until = datetime.fromisoformat(until_text.replace("Z", "+00:00")).timestamp()
    starts = [e for e in runlog(log) if e["event"] == "start"]
    assert sorted(e["key"] for e in starts) == ["x#0", "x#1", "x#2"], starts
    assert {e["pid"] for e in starts} == {b.pid}, starts
    assert min(e["t"] for e in starts) >= until - 0.01, [e["t"] - until for e in starts]
