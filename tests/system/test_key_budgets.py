"""Budgets per key across daemons: two daemons share one handler whose key_limit
has a cost budget per period; what ran (each attempt's start, recorded by the
handler with the cost it reported) never spends more than the budget of a key
in one period, and reported costs below the estimates let more items start."""

from __future__ import annotations

import pathlib
import time
from datetime import datetime
from typing import Any

from tests.daemon import DEFAULT_HANDLERS, wait_for
from tests.test_scheduling import runlog

BUDGET = 100
ESTIMATE = 30  # each item's payload cost: three fit in a budget
ACTUAL = 10  # what each attempt reports it cost
PERIOD_S = 3600


def parse(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def test_a_cost_budget_holds_per_key_in_one_period_across_two_daemons(
    daemons: Any, tmp_path: pathlib.Path
) -> None:
    # The test needs one period: not near the end of an hour.
    wait_for(lambda: time.time() % PERIOD_S < PERIOD_S - 60, 65, what="an hour with time left")
    log = tmp_path / "runs.jsonl"
    handlers = dict(DEFAULT_HANDLERS) | {
        "llm": {
            "type": "python",
            "target": "tests.handlers:costly",
            "timeout": "30s",
            "concurrency": 1,  # per daemon: the two daemons share each key's items
            "key_limit": {
                "key": "/api_key",
                "concurrency": 1,
                "budget": BUDGET,
                "budget_period": "1h",
                "cost": "/estimated_tokens",
            },
        }
    }
    env = {"BSV_TEST_RUNLOG": str(log)}
    a = daemons("a", handlers=handlers, env=env)
    b = daemons("b", handlers=handlers, env=env)
    batch = a.submit(
        "llm",
        [
            {
                "key": f"{k}#{i}",
                "payload": {"api_key": k, "estimated_tokens": ESTIMATE, "actual": ACTUAL},
            }
            for i in range(12)
            for k in ("team-a", "team-b")
        ],
    )

    def usage() -> dict[str, Any]:
        status, body, _ = b.api("GET", "/v1/limits")
        assert status == 200, body
        (h,) = body["handlers"]
        return {k["limit_key"]: k for k in h["keys"]}

    # Each key, one at a time: 30 charged at the start, corrected to 10 after it.
    # Once 70 is used, one more fits (70 + 30 = 100), then nothing this period:
    # eight starts per key. Without corrections it would be three; without the
    # budget, all twelve.
    def settled() -> bool:
        u = usage()
        return all(
            k in u and u[k]["running"] == 0 and u[k]["budget"]["used"] == 8 * ACTUAL
            for k in ("team-a", "team-b")
        )

    wait_for(settled, 60, what="both keys' budgets spent down to 80")
    u = usage()
    for k in ("team-a", "team-b"):
        budget = u[k]["budget"]
        assert budget["budget"] == BUDGET, u
        start, end = parse(budget["period_start"]), parse(budget["period_end"])
        assert end - start == PERIOD_S, budget
        starts = [e for e in runlog(log) if e["event"] == "start" and e["key"].startswith(k)]
        # Measured from what ran: every start in this period, and what it cost.
        assert all(start <= e["t"] < end for e in starts), (starts, budget)
        assert len(starts) == 8, starts
        assert sum(e["actual"] for e in starts) <= BUDGET
    pids = {e["pid"] for e in runlog(log)}
    assert len(pids) == 2, "both daemons should have run some items"
    counts = a.batch(batch["id"])["counts"]
    assert (counts["succeeded"], counts["queued"]) == (16, 8), counts
    cli = a.cli("limits")
    assert cli.returncode == 0, cli.stderr
    assert "'team-a': running 0/1, budget 80/100" in cli.stdout, cli.stdout
    status, _, _ = a.api("POST", f"/v1/batches/{batch['id']}/cancel")
    assert status == 200
    a.wait_status(batch["id"], "cancelled", timeout=30)


def test_a_cost_that_is_not_a_number_is_refused_naming_it(daemons: Any) -> None:
    handlers = dict(DEFAULT_HANDLERS) | {
        "llm": {
            "type": "python",
            "target": "tests.handlers:costly",
            "timeout": "30s",
            "key_limit": {"key": "/api_key", "budget": 10, "cost": "/estimated_tokens"},
        }
    }
    d = daemons("a", handlers=handlers)
    status, body, _ = d.api(
        "POST",
        "/v1/batches",
        {
            "handler": "llm",
            "items": [
                {"api_key": "k", "estimated_tokens": 3},
                {"payload": {"api_key": "k", "estimated_tokens": -1}},
                {"api_key": "k", "estimated_tokens": "3"},
            ],
        },
    )
    assert status == 422, body
    assert [e["path"] for e in body["errors"]] == [
        "/items/1/payload/estimated_tokens",
        "/items/2/estimated_tokens",
    ], body
    status, listing, _ = d.api("GET", "/v1/batches")
    assert status == 200 and listing["batches"] == [], listing
