"""Chaos: three daemons share one database while one of them is SIGKILLed and
restarted every 1-2 seconds. Nothing may be lost, every batch must finish exactly
(``completed``, 300 succeeded), and re-executions are bounded by what the kills
can explain: at most the claims the killed daemon held (``concurrency`` running
plus its prefetch window) per kill.

Every execution is recorded by ``tests.handlers:echo`` in a shared run log
(``BSV_TEST_RUNLOG``) with its pid and attempt, so duplicates are counted across
processes, including the ones that died.
"""

from __future__ import annotations

import os
import pathlib
import random
import time
from typing import Any

from tests.chaos.common import ECHO, FAST_WORKER, assert_no_drift, read_runlog, starts_per_attempt
from tests.conftest import DaemonFactory
from tests.daemon import Daemon, check_invariants, wait_for

BATCHES = 5
ITEMS = 300
STORM_S = 15.0
SUBMIT_EVERY_S = 3.0  # spread the batches over the storm so the kills hit live work
CONCURRENCY = FAST_WORKER["concurrency"]
# What one kill can make run again: attempts that started but whose outcome was not
# yet written. A daemon owns at most concurrency + prefetch (= concurrency) claims:
# items sleep >= 0.1 s, too slow for the "auto" prefetch window to grow.
PER_KILL = 2 * CONCURRENCY


def submit_somewhere(ds: list[Daemon], body: dict[str, Any], rng: random.Random) -> str:
    """POST the batch to a live daemon; retry elsewhere (same idempotency key) when
    the chosen one is gone. Returns the batch id."""

    def attempt() -> str | None:
        d = rng.choice(ds)
        if d.proc is None or d.proc.poll() is not None:
            return None
        try:
            status, resp, _ = d.api("POST", "/v1/batches", body)
        except OSError:
            return None  # killed under us: the idempotency key makes a retry safe
        assert status in (200, 201, 503), (status, resp)
        return str(resp["id"]) if status in (200, 201) else None

    return wait_for(attempt, 30, 0.05, f"submission of {body['idempotency_key']}")


def test_sigkill_storm_loses_nothing_and_bounds_duplicates(
    daemons: DaemonFactory, tmp_path: pathlib.Path
) -> None:
    seed = int(os.environ.get("BSV_CHAOS_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    runlog = tmp_path / "runs.jsonl"
    ds = [
        daemons(
            f"storm{i}", handlers=ECHO, worker=FAST_WORKER, env={"BSV_TEST_RUNLOG": str(runlog)}
        )
        for i in range(3)
    ]

    batch_ids: list[str] = []
    kills: list[str] = []
    start = time.monotonic()
    next_submit = start
    next_kill = start + rng.uniform(1.0, 2.0)
    while len(batch_ids) < BATCHES or time.monotonic() - start < STORM_S:
        now = time.monotonic()
        if len(batch_ids) < BATCHES and next_submit <= min(now, next_kill):
            n = len(batch_ids)
            body = {
                "handler": "echo",
                "idempotency_key": f"storm-{seed}-{n}",
                "items": [
                    # ~0.25 s each: 300 of them keep 3 x 8 workers busy for the ~3 s
                    # until the next batch, so every kill lands on live work
                    {"key": f"b{n}-{j}", "payload": {"sleep": round(rng.uniform(0.1, 0.4), 4)}}
                    for j in range(ITEMS)
                ],
            }
            batch_ids.append(submit_somewhere(ds, body, rng))
            next_submit += SUBMIT_EVERY_S
        elif now - start < STORM_S and next_kill <= now:
            victim = rng.choice(ds)
            victim.kill()  # SIGKILL: no drain, no deregistration
            kills.append(victim.name)
            # Same name: reclaims its previous incarnation's items at once. Not waiting
            # for it to be ready means the next kill may catch a daemon starting up.
            victim.start(wait=False)
            next_kill = time.monotonic() + rng.uniform(1.0, 2.0)
        else:
            wake = min(next_submit if len(batch_ids) < BATCHES else start + STORM_S, next_kill)
            time.sleep(max(0.0, min(0.1, wake - time.monotonic())))  # pacing the schedule

    assert len(kills) >= 7, (seed, kills)
    for d in ds:
        d.wait_ready()
    finals = [
        ds[0].wait_status(bid, ("completed", "completed_with_errors", "failed", "cancelled"), 120)
        for bid in batch_ids
    ]
    for b in finals:
        check_invariants(b)
        assert b["status"] == "completed", (seed, b)
        assert b["counts"] == {
            "total": ITEMS,
            "queued": 0,
            "running": 0,
            "succeeded": ITEMS,
            "failed": 0,
            "cancelled": 0,
        }, (seed, b)

    runs = read_runlog(runlog)
    starts = starts_per_attempt(runs)
    done = {(r["id"], r["attempt"]) for r in runs if r["event"] == "done"}
    # Attempt numbers never repeat: no (item, attempt) was started twice.
    assert max(starts.values()) == 1, (seed, starts.most_common(3))
    retried = 0
    for bid in batch_ids:
        items = ds[0].items(bid)
        assert len(items) == ITEMS
        for it in items:
            assert it["status"] == "succeeded", (seed, it)
            # The recorded result is the one of the attempt that holds the item ...
            assert it["result"]["attempt"] == it["attempts"], (seed, it)
            # ... and that attempt really ran to its end.
            assert (it["id"], it["attempts"]) in done, (seed, it)
            retried += it["attempts"] > 1

    duplicates = sum(starts.values()) - BATCHES * ITEMS
    bound = len(kills) * PER_KILL
    assert 0 <= duplicates <= bound, (seed, duplicates, bound, kills)
    # The kills hit live work (otherwise this test proves nothing).
    assert retried > 0, (seed, kills)
    assert_no_drift(ds[0])
