"""A drain leaves nothing of this daemon's running behind, even mid-claim.

The soft stop cancels the claim loop. A claim cancelled while its statement
was committing used to leave its items `running` under a lease whose worker
row the drain then deleted: no one ran them, and they later spent an attempt
as WorkerLost. Submissions keep arriving here while SIGTERM lands, ten times.
"""

from __future__ import annotations

import functools
import signal
import threading

from tests.chaos.common import query
from tests.conftest import DaemonFactory
from tests.daemon import Daemon, request, wait_for

ROUNDS = 10

ABANDONED = """
SELECT (SELECT count(*) FROM supervisor.items i WHERE i.status = 'running'
           AND NOT EXISTS (SELECT 1 FROM supervisor.workers w WHERE w.id = i.lease)) AS items,
       (SELECT count(*) FROM supervisor.batches b WHERE b.callback_state = 'running'
           AND NOT EXISTS (SELECT 1 FROM supervisor.workers w WHERE w.id = b.callback_lease))
         AS callbacks
"""


def _at_least(accepted: list[int], n: int) -> bool:
    return len(accepted) >= n


def _submit_until(d: Daemon, stop: threading.Event, accepted: list[int]) -> None:
    while not stop.is_set():
        try:
            status, _, _ = request(
                "POST",
                d.url + "/v1/batches",
                {"handler": "echo", "items": list(range(20))},
                timeout=5,
            )
        except OSError:
            return  # the daemon is gone
        if status == 201:
            accepted.append(1)


def test_sigterm_under_continuous_submissions_leaves_no_claim_behind(
    daemons: DaemonFactory, db_url: str
) -> None:
    for n in range(ROUNDS):
        d = daemons(f"r{n}", worker={"name": "drainer"})
        stop, accepted = threading.Event(), list[int]()
        submitters = [
            threading.Thread(target=_submit_until, args=(d, stop, accepted)) for _ in range(3)
        ]
        for t in submitters:
            t.start()
        try:
            wait_for(functools.partial(_at_least, accepted, 10), 20, 0.01, "submissions under way")
            d.signal(signal.SIGTERM)
            assert d.wait_exit(30) == 0, d.log()
        finally:
            stop.set()
            for t in submitters:
                t.join()
        assert query(db_url, ABANDONED) == [{"items": 0, "callbacks": 0}], (n, d.log())
