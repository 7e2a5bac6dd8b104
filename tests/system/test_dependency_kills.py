"""A chain of dependent batches across two daemons while one of them is
SIGKILLed and restarted every half second: every batch is released exactly once, in
the transaction that ends its dependency (so no kill, at whatever moment, makes
a dependent start twice or never), and starts only after its dependency ended."""

from __future__ import annotations

import collections
import itertools
import threading

from tests.conftest import DaemonFactory
from tests.daemon import check_invariants, wait_for
from tests.test_dependencies import at, events
from tests.test_seeds import doctor_clean

KILL_EVERY_S = 0.5


def test_a_chain_survives_sigkills_at_any_moment_and_each_dependent_starts_once(
    daemons: DaemonFactory, db_url: str
) -> None:
    fast = {"heartbeat_interval": "200ms", "dead_after": "1s"}
    steady = daemons("steady", worker=fast)
    victim = daemons("victim", worker=fast)
    # A kill spends the attempt of every item the victim holds, and on a loaded
    # machine the victim may be killed within its first claim each time: a budget
    # that no run of kills exhausts, so the chain's outcome is about releases only.
    budget = {"max_attempts": 25}
    chain = [steady.submit("echo", [{"sleep": 0.4, "n": i} for i in range(4)], **budget)]
    for i in range(11):
        via = steady if i % 2 else victim
        items = [{"sleep": 0.4, "n": i} for _ in range(4)]
        chain.append(via.submit("echo", items, after=[chain[-1]["id"]], **budget))

    stop = threading.Event()
    kills = 0

    def killer() -> None:
        nonlocal kills
        while not stop.wait(KILL_EVERY_S):
            victim.kill()
            kills += 1
            victim.start(wait=False)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    try:
        last = chain[-1]["id"]

        def chain_done() -> bool:
            status: str = steady.batch(last)["status"]
            # A chain that ended any other way is a finding: say where it broke.
            assert status not in ("completed_with_errors", "failed", "cancelled"), [
                (b["id"], steady.batch(b["id"])["status"], steady.batch(b["id"])["counts"])
                for b in chain
            ]
            return status == "completed"

        try:
            wait_for(chain_done, 120, 0.1, "the last batch of the chain to complete")
        except AssertionError as exc:
            states = [(b["id"], steady.batch(b["id"])["status"]) for b in chain]
            raise AssertionError(f"{exc}; the chain: {states}") from None
    finally:
        stop.set()
        t.join(10)
    victim.wait_ready()
    assert kills >= 3, kills

    for prev, nxt in itertools.pairwise(chain):
        b = steady.batch(nxt["id"])
        check_invariants(b)
        assert b["status"] == "completed", b
        actions = collections.Counter(e["action"] for e in events(db_url, nxt["id"]))
        assert actions["dependencies_met"] == 1, actions  # released once
        assert actions["started"] == 1 and actions["finished"] == 1, actions
        first_start = min(at(it["started_at"]) for it in steady.items(nxt["id"]))
        assert first_start >= at(steady.batch(prev["id"])["finished_at"]), (prev, nxt)
    doctor_clean(steady)
