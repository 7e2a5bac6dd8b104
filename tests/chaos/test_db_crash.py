"""Chaos: the suite's PostgreSQL is stopped with ``-m immediate`` (what a power cut
looks like to clients) while daemons work, then started again (crash recovery).

(a) during a stream of submissions: a submission answered 201 (or 200, an
idempotent repeat) is complete and finishes; one answered with an error left
nothing behind, unless its commit landed before the connection died (the
ambiguous-commit window): then it is complete too, and a client repeating the same
idempotency key gets 200 for it. Either way, never half a batch.
(b) during finalization (many small batches finishing): nothing lost, no batch stuck,
counts exact.

After each, ``batch-supervisor doctor`` finds no drift. The server is always restored
(``finally``) so that the rest of the suite is unaffected.
"""

from __future__ import annotations

import collections
import json
import random
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from supervisor.api import results
from tests.chaos.common import ECHO, FAST_WORKER, TERMINAL, assert_no_drift, query
from tests.conftest import DaemonFactory
from tests.daemon import ROOT, Daemon, check_invariants, request, wait_for
from tests.pgharness import TestServer

SCHEMA = "supervisor"


@pytest.fixture
def restore_server(pg_server: TestServer, db_url: str) -> Iterator[TestServer]:
    """The server, started again after the test whatever happened (start adopts a
    running server, so this is harmless when the test restored it already).

    The suite's server runs with ``synchronous_commit = off`` (speed), which lets an
    immediate stop lose commits already acknowledged; that is not the durability a
    production server gives, so this test's database asks for it back. (``fsync``
    may stay off: the operating system survives a server crash.)
    """
    name = db_url.rsplit("/", 1)[1]
    assert name.isidentifier(), name
    query(pg_server.admin_dsn, f"ALTER DATABASE {name} SET synchronous_commit = on")
    try:
        yield pg_server
    finally:
        pg_server.start()


def crash_and_recover(server: TestServer, down_s: float) -> None:
    server.crash()
    time.sleep(down_s)  # the outage itself: clients must see the server gone for a while
    server.start()


class Submitter(threading.Thread):
    """POSTs small batches with idempotency keys, one after the other, until stopped,
    recording what each got: a status code or the connection error."""

    ITEMS = 10

    def __init__(self, d: Daemon, seed: int) -> None:
        super().__init__(daemon=True)
        self.d = d
        self.rng = random.Random(seed)
        self.prefix = f"sub-{seed}"
        self.outcomes: dict[str, int | str] = {}
        self.stop_event = threading.Event()
        self.error: BaseException | None = None

    def body(self, key: str) -> dict[str, Any]:
        return {
            "handler": "echo",
            "idempotency_key": key,
            "items": [{"key": str(j), "payload": {"sleep": 0.005}} for j in range(self.ITEMS)],
        }

    def run(self) -> None:
        try:
            n = 0
            while not self.stop_event.is_set():
                key = f"{self.prefix}-{n}"
                n += 1
                try:
                    status, _, _ = request(
                        "POST", self.d.url + "/v1/batches", self.body(key), timeout=10
                    )
                    self.outcomes[key] = status
                except OSError as exc:
                    self.outcomes[key] = type(exc).__name__
                time.sleep(self.rng.uniform(0.0, 0.03))  # submission pacing
        except BaseException as exc:  # reported by the test thread
            self.error = exc

    def count(self) -> collections.Counter[int | str]:
        return collections.Counter(self.outcomes.values())


def test_crash_during_submissions_keeps_every_batch_whole(
    daemons: DaemonFactory, db_url: str, restore_server: TestServer
) -> None:
    seed = random.randrange(1 << 30)
    d = daemons("sub", handlers=ECHO, worker=FAST_WORKER)
    sub = Submitter(d, seed)
    sub.start()
    try:
        wait_for(lambda: sub.count()[201] >= 20, 20, what="submissions before the crash")
        crash_and_recover(restore_server, 1.0)
        before = sub.count()[201]
        wait_for(lambda: sub.count()[201] >= before + 20, 30, what="submissions after recovery")
    finally:
        sub.stop_event.set()
        sub.join(30)
    assert sub.error is None, sub.error
    counts = sub.count()
    unexpected = {
        k: v for k, v in sub.outcomes.items() if v not in (200, 201, 503) and not isinstance(v, str)
    }
    assert not unexpected, (seed, unexpected)
    errored = [k for k, v in sub.outcomes.items() if v not in (200, 201)]
    assert errored, f"the crash hit no submission: {dict(counts)}"

    stored = {
        r["idempotency_key"]: r
        for r in query(
            db_url,
            "SELECT b.idempotency_key, b.id, b.total,"
            " (SELECT count(*) FROM supervisor.items i WHERE i.batch_id = b.id) AS n"
            " FROM supervisor.batches b",
        )
    }
    # Nothing but what was submitted, and every batch whole.
    assert set(stored) <= set(sub.outcomes), set(stored) - set(sub.outcomes)
    for key, r in stored.items():
        assert r["total"] == r["n"] == Submitter.ITEMS, (key, r)
    accepted = [k for k, v in sub.outcomes.items() if v in (200, 201)]
    missing = [k for k in accepted if k not in stored]
    assert not missing, (seed, dict(counts), missing)
    # An errored submission left nothing, except when its commit landed before the
    # connection died; repeating its key tells the client which (201 vs 200).
    ambiguous = [k for k in errored if k in stored]
    assert len(ambiguous) <= 2, ambiguous  # the window is the last instant of a commit
    for key in errored:
        status, resp, _ = d.api("POST", "/v1/batches", sub.body(key))
        assert status == (200 if key in ambiguous else 201), (key, status, resp)

    ids = [str(r["id"]) for r in query(db_url, "SELECT id FROM supervisor.batches")]
    assert len(ids) == len(sub.outcomes)
    for bid in ids:
        b = d.wait_status(bid, TERMINAL, 60)
        check_invariants(b)
        assert b["status"] == "completed", b
        assert b["counts"]["succeeded"] == Submitter.ITEMS, b
    assert d.proc is not None and d.proc.poll() is None, d.log()  # the outage killed nothing
    assert_no_drift(d)


def test_crash_during_finalization_leaves_no_batch_stuck(
    daemons: DaemonFactory, db_url: str, restore_server: TestServer
) -> None:
    rng = random.Random()
    ds = [daemons(f"fin{i}", handlers=ECHO, worker=FAST_WORKER) for i in range(2)]
    sizes = [rng.randint(2, 6) for _ in range(60)]
    ids = [
        ds[n % 2].submit("echo", [{"sleep": round(rng.uniform(0.1, 0.4), 3)} for _ in range(k)])[
            "id"
        ]
        for n, k in enumerate(sizes)
    ]

    def finishing() -> bool:
        rows = query(db_url, "SELECT status, running FROM supervisor.batches")
        done = sum(r["status"] in TERMINAL for r in rows)
        return done >= 5 and len(rows) - done >= 20

    wait_for(finishing, 30, 0.01, "batches finishing while others still run")
    crash_and_recover(restore_server, 0.5)

    for bid, k in zip(ids, sizes, strict=True):
        b = ds[0].wait_status(bid, TERMINAL, 60)
        check_invariants(b)
        assert b["status"] == "completed", b
        assert b["counts"] == {
            "total": k,
            "queued": 0,
            "running": 0,
            "succeeded": k,
            "failed": 0,
            "cancelled": 0,
        }, b
        items = ds[0].items(bid)
        assert [i["status"] for i in items] == ["succeeded"] * k, items
    for d in ds:
        assert d.proc is not None and d.proc.poll() is None, d.log()
    assert_no_drift(ds[0])


def test_claim_whose_reply_was_lost_is_handed_back(
    daemons: DaemonFactory, db_url: str, restore_server: TestServer
) -> None:
    """A claim that commits while its reply is lost leaves items `running` under a
    live lease that nobody runs and no reaper reclaims (the lease is alive). After
    a failed claim the daemon reconciles: what runs under its lease but not in it
    is released (queued again, the attempt not counted)."""
    d = daemons("victim", handlers=ECHO, worker=FAST_WORKER)
    (lease,) = [r["id"] for r in query(db_url, "SELECT id FROM supervisor.workers")]
    # A batch of a handler this daemon does not run, so only our forged claim takes it.
    bid = query(
        db_url,
        "INSERT INTO supervisor.batches (id, tenant, handler, status, attempt_budget, total, "
        "queued) VALUES (gen_random_uuid(), 'default', 'ghost', 'queued', 3, 3, 3) RETURNING id",
    )[0]["id"]
    query(
        db_url,
        "INSERT INTO supervisor.items (batch_id, seq, handler, payload, max_attempts) "
        "SELECT $1, g, 'ghost', '{}', 3 FROM generate_series(1, 3) g",
        bid,
    )
    # The committed claim whose reply the daemon never saw.
    claimed = query(
        db_url,
        "SELECT * FROM supervisor.claim_items('ghost', 3, 'victim', $1, NULL, NULL, 1)",
        lease,
    )
    assert len(claimed) == 3
    crash_and_recover(restore_server, 0.5)  # the daemon's next claims fail, then work again

    def handed_back() -> bool:
        rows = query(
            db_url,
            "SELECT status, attempts, max_attempts FROM supervisor.items WHERE batch_id = $1",
            bid,
        )
        return all(
            (r["status"], r["attempts"], r["max_attempts"]) == ("queued", 1, 4) for r in rows
        )

    wait_for(handed_back, 20, 0.1, "orphaned claims released")
    assert "dispatcher.orphans_released items=3" in d.log()
    assert_no_drift(d)


def test_crash_during_a_results_export_is_resumed_never_cut_short(
    daemons: DaemonFactory, restore_server: TestServer
) -> None:
    """A results export whose database goes away part-way is cut before its final
    chunk, never ended as if it were complete, and ``batch-supervisor results``
    resumes after the last id it wrote: its output holds every item exactly once."""
    d = daemons("export", handlers=ECHO, worker=FAST_WORKER)
    n = 6 * results.PAGE_ROWS
    # About 30 MB of results: more than the sockets and the pipe buffer, so the
    # daemon is still streaming (blocked on its writes) when the server goes.
    pad = "x" * 10_000
    b = d.submit("echo", [{"n": i, "pad": pad} for i in range(n)])
    d.wait_status(b["id"], "completed", 120)
    want = [it["id"] for it in d.items(b["id"])]
    assert len(want) == n

    cli = subprocess.Popen(
        [sys.executable, "-m", "supervisor", "results", b["id"]],
        cwd=ROOT,
        env={**d.env, "BATCH_SUPERVISOR_URL": d.url},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = cli.stdout, cli.stderr
    assert out is not None and err is not None
    try:
        lines = [out.readline()]
        restore_server.crash()
        rest: list[bytes] = []
        reader = threading.Thread(target=lambda: rest.append(out.read()), daemon=True)
        reader.start()  # the daemon fetches its next page, fails and cuts the stream
        wait_for(lambda: "api.results_aborted" in d.log(), 30, 0.05, "the export cut")
        restore_server.start()
        reader.join(120)
        assert cli.wait(60) == 0, err.read()
        stderr = err.read().decode()
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait(10)
    lines += rest[0].splitlines(keepends=True)
    assert all(line.endswith(b"\n") for line in lines)
    got = [json.loads(line)["id"] for line in lines]
    assert got == want  # every item once, in order: resumed exactly after the cut
    assert "resuming after item" in stderr, stderr
    assert d.proc is not None and d.proc.poll() is None, d.log()
