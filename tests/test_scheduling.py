"""Scheduling: fairness across batches, priority, per-batch
max_concurrency, per-daemon handler concurrency, and the global limits
(global_concurrency, rate_limit) enforced in the claim across daemons.

Handlers log each start and finish with pid and time (tests/handlers.py), so
the limits are checked from what actually ran, not from what the daemon says.
"""

from __future__ import annotations

import json
import pathlib
import time
from collections import defaultdict
from typing import Any

from tests.daemon import DEFAULT_HANDLERS, wait_for
from tests.system.test_operations import metrics_of


def runlog(path: pathlib.Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def max_overlap(events: list[dict[str, Any]]) -> int:
    """Most attempts in flight at once, from start/done events."""
    level = peak = 0
    for e in sorted(events, key=lambda e: (e["t"], e["event"] == "start")):
        level += 1 if e["event"] == "start" else -1
        peak = max(peak, level)
    return peak


def echo_handler(**extra: Any) -> dict[str, Any]:
    return {"type": "python", "target": "tests.handlers:echo", "timeout": "30s", **extra}


def test_small_batch_is_not_starved_by_a_huge_one(daemons: Any) -> None:
    d = daemons(worker={"concurrency": 8})
    big = d.submit("echo", [{"sleep": 0.02} for _ in range(50_000)])
    small = d.submit("echo", [{"sleep": 0.02, "i": i} for i in range(10)])
    d.wait_status(small["id"], "completed", timeout=30)
    b = d.batch(big["id"])
    assert b["counts"]["queued"] > 45_000, b["counts"]  # the big one is mostly still waiting
    d.api("POST", f"/v1/batches/{big['id']}/cancel")
    d.wait_status(big["id"], "cancelled", timeout=30)


def test_higher_priority_batch_overtakes(daemons: Any) -> None:
    d = daemons(worker={"concurrency": 4})
    low = d.submit("echo", [{"sleep": 0.05} for _ in range(400)], priority=0)
    wait_for(lambda: d.batch(low["id"])["counts"]["running"] > 0, 10, what="low running")
    high = d.submit("echo", [{"sleep": 0.05} for _ in range(20)], priority=10)
    d.wait_status(high["id"], "completed", timeout=30)
    assert d.batch(low["id"])["counts"]["queued"] > 300
    d.api("POST", f"/v1/batches/{low['id']}/cancel")


def test_batch_max_concurrency_is_never_exceeded(daemons: Any, tmp_path: pathlib.Path) -> None:
    log = tmp_path / "runs.jsonl"
    d = daemons(worker={"concurrency": 16}, env={"BSV_TEST_RUNLOG": str(log)})
    b = d.submit("echo", [{"sleep": 0.05} for _ in range(30)], max_concurrency=3)
    d.wait_status(b["id"], "completed", timeout=30)
    assert max_overlap(runlog(log)) == 3


def test_handler_and_global_limits_hold_across_two_daemons(
    daemons: Any, tmp_path: pathlib.Path
) -> None:
    log = tmp_path / "runs.jsonl"
    handlers = dict(DEFAULT_HANDLERS) | {
        "capped": echo_handler(concurrency=2),
        "global": echo_handler(global_concurrency=3),
    }
    env = {"BSV_TEST_RUNLOG": str(log)}
    a = daemons("a", handlers=handlers, env=env, worker={"concurrency": 16})
    daemons("b", handlers=handlers, env=env, worker={"concurrency": 16})
    capped = a.submit("capped", [{"sleep": 0.1, "c": i} for i in range(24)])
    a.wait_status(capped["id"], "completed", timeout=30)
    by_pid: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for e in runlog(log):
        by_pid[e["pid"]].append(e)
    assert len(by_pid) == 2, "both daemons should have run some items"
    assert max(max_overlap(ev) for ev in by_pid.values()) == 2
    log.unlink()
    glob = a.submit("global", [{"sleep": 0.1, "g": i} for i in range(24)])
    a.wait_status(glob["id"], "completed", timeout=30)
    assert max_overlap(runlog(log)) == 3


def test_rate_limit_holds_across_two_daemons(daemons: Any, tmp_path: pathlib.Path) -> None:
    log = tmp_path / "runs.jsonl"
    handlers = dict(DEFAULT_HANDLERS) | {"polite": echo_handler(rate_limit="20/s")}
    env = {"BSV_TEST_RUNLOG": str(log)}
    a = daemons("a", handlers=handlers, env=env)
    daemons("b", handlers=handlers, env=env)
    b = a.submit("polite", [{"r": i} for i in range(60)])
    a.wait_status(b["id"], "completed", timeout=30)
    starts = sorted(e["t"] for e in runlog(log) if e["event"] == "start")
    assert len(starts) == 60
    worst = max(sum(1 for t in starts if s <= t < s + 1.0) for s in starts)
    assert worst <= 23, worst  # 20/s plus the small burst the bucket allows
    assert starts[-1] - starts[0] >= 2.5  # 60 starts at 20/s cannot take less than ~3 s


def test_a_handler_concurrency_caps_what_each_daemon_claims(daemons: Any) -> None:
    """Two daemons, concurrency 2: four items are running, not eight (claims beyond
    the cap were counted as running while they waited for a worker)."""
    capped = {**DEFAULT_HANDLERS["sleeper"], "concurrency": 2}
    handlers = DEFAULT_HANDLERS | {"sleeper": capped}
    a = daemons("a", handlers=handlers)
    b = daemons("b", handlers=handlers)
    batch = a.submit("sleeper", [{"sleep": 3600, "n": i} for i in range(12)])
    key = 'batch_supervisor_items_in_flight{handler="sleeper"}'
    wait_for(lambda: metrics_of(a)[key] == 2 and metrics_of(b)[key] == 2, 20, 0.05)
    counts = a.batch(batch["id"])["counts"]
    assert counts["running"] == 4 and counts["queued"] == 8, counts


def test_running_means_a_handler_runs_it(daemons: Any) -> None:
    """Uncapped slow handler, default ("auto") prefetch: what a batch counts as
    running is what the workers run. The auto window used to hold another
    ``concurrency`` claimed items that waited, counted as running, for a worker
    (8 running on a daemon whose 4 workers were all busy)."""
    d = daemons("a", worker={"concurrency": 4})
    batch = d.submit("sleeper", [{"sleep": 3600, "n": i} for i in range(12)])
    key = 'batch_supervisor_items_in_flight{handler="sleeper"}'
    wait_for(lambda: metrics_of(d)[key] == 4, 20, 0.05)
    for _ in range(10):  # and it stays so while the claim loop polls
        counts = d.batch(batch["id"])["counts"]
        assert counts["running"] == 4 and counts["queued"] == 8, counts
        assert metrics_of(d)['batch_supervisor_items_claimed_waiting{handler="sleeper"}'] == 0
        time.sleep(0.1)


def test_batches_of_a_globally_capped_handler_take_turns(
    daemons: Any, tmp_path: pathlib.Path
) -> None:
    """One free slot at a time (global_concurrency = 1): each claim goes to the
    batch claimed least recently, so six equal batches take strict turns. The
    claim used to go to the first batch after a random id, most often the one
    whose id follows the widest gap, and a batch could wait for the others to end."""
    log = tmp_path / "runs.jsonl"
    gate = tmp_path / "gate"
    one = {"type": "python", "target": "tests.handlers:until_file", "timeout": "30s"}
    handlers = {"one": one | {"global_concurrency": 1}}
    d = daemons(handlers=handlers, env={"BSV_TEST_RUNLOG": str(log)})
    # The first item claimed waits for the gate: every batch exists before the turns.
    ids = [
        d.submit("one", [{"file": str(gate), "b": b, "i": i} for i in range(3)])["id"]
        for b in range(6)
    ]
    wait_for(lambda: runlog(log), 10, what="the first start")
    gate.touch()
    for bid in ids:
        d.wait_status(bid, "completed", timeout=30)
    order = [
        e["batch"] for e in sorted(runlog(log), key=lambda e: e["mono"]) if e["event"] == "start"
    ]
    assert len(order) == 18, order
    # Each run of six consecutive starts serves every batch once.
    turns = [order[k : k + 6] for k in range(0, 18, 6)]
    assert all(sorted(t) == sorted(ids) for t in turns), turns
