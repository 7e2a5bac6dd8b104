"""Property-based test of the transition functions (0001_initial.sql) against the real
database, through ``supervisor.db.Database`` and the named queries; no daemon.

Hypothesis drives random sequences, on a fresh batch of a few items (with or without
a failure budget), of claim / outcome (succeeded, failed, retry, released, cancelled;
with the current or a stale lease and attempt) / reclaim / cancel / pause / resume /
retry_batch / the end of a dependency (the batch may wait, ``after``, for another
one-item batch, which succeeds, fails or is cancelled), and after every step checks
the batch invariants (each count equals the number of items in that state, total =
sum, terminal exactly when queued + running = 0) and agreement with a small model
of the expected item and batch states. A fenced write (stale lease or attempt) and
a no-op control must change nothing, not even the version.

One migrated database serves every example; each example makes its own batch under
its own handler name, so claims never see another example's items.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import uuid
from collections import Counter
from collections.abc import Callable, Coroutine
from typing import Any, ClassVar, TypeVar

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from supervisor import batches, config, states, store
from supervisor import db as dbm

T = TypeVar("T")
TERMINAL = ("completed", "completed_with_errors", "failed", "cancelled")
STATES = ("queued", "running", "succeeded", "failed", "cancelled")
OUTCOMES = ("succeeded", "failed", "retry", "released", "cancelled")


@dataclasses.dataclass
class ModelItem:
    status: str = "queued"
    attempts: int = 0
    max_attempts: int = 1
    lease: str | None = None
    last_error: str | None = None  # type of the newest entry in errors
    history: list[tuple[str, int]] = dataclasses.field(default_factory=list)  # (lease, attempt)


class BatchMachine(RuleBasedStateMachine):
    loop: ClassVar[asyncio.AbstractEventLoop]
    db: ClassVar[dbm.Database]

    def __init__(self) -> None:
        super().__init__()
        self.handler = f"h_{uuid.uuid4().hex[:12]}"
        self.leases = {"w1": str(uuid.uuid4()), "w2": str(uuid.uuid4())}
        self.items: dict[int, ModelItem] = {}
        self.batch_id = ""
        self.status = "queued"
        self.stop_reason: str | None = None
        self.paused = False
        self.waiting = False  # for the dependency (dep_id) to end
        self.dep_id = ""
        self.dep_handler = f"d_{uuid.uuid4().hex[:12]}"
        self.policy: str | None = None
        self.dep_ended = False
        self.started = False
        self.budget = 1
        self.max_failures: int | None = None
        self.version = 0
        self.changed = True  # did the last step change the batch (version must move)?
        self.seen: dict[int, str] = {}  # item status at the previous check

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coro)

    # -- the model of _settle ----------------------------------------------------------

    def counts(self) -> Counter[str]:
        return Counter(it.status for it in self.items.values())

    def settle(self, *, reopen: bool = False) -> None:
        c = self.counts()
        was_terminal = self.status in TERMINAL and not reopen
        if reopen:
            self.stop_reason = None
            if self.status in TERMINAL:
                self.status = "running"
                self.paused = False
        if (
            not was_terminal
            and self.stop_reason is None
            and self.max_failures is not None
            and c["failed"] > self.max_failures
        ):
            # Failure budget exceeded: queued items cancelled, the batch ends failed.
            self.stop_reason = "max_failures"
            for it in self.items.values():
                if it.status == "queued":
                    it.status = "cancelled"
            c = self.counts()
        if was_terminal:
            pass
        elif c["queued"] + c["running"] == 0:
            self.waiting = False  # an ended batch waits for nothing
            if self.stop_reason in ("cancel", "dependency"):
                self.status = "cancelled"
            elif self.stop_reason == "max_failures":
                self.status = "failed"
            elif c["failed"] == 0 and c["cancelled"] == 0:
                self.status = "completed"
            elif c["succeeded"] == 0 and c["failed"] == 0:
                self.status = "cancelled"
            elif c["succeeded"] == 0:
                self.status = "failed"
            else:
                self.status = "completed_with_errors"
        elif self.stop_reason is not None:
            self.status = "cancelling"
        elif self.waiting:
            self.status = "waiting"
        elif self.paused:
            self.status = "paused"
        elif c["running"] + c["succeeded"] + c["failed"] + c["cancelled"] == 0 and not self.started:
            self.status = "queued"
        else:
            self.status = "running"
        self.started = self.started or c["running"] > 0 or c["succeeded"] + c["failed"] > 0
        self.changed = True

    def apply(self, it: ModelItem, outcome: str, error: str | None) -> None:
        """apply_outcomes for one item whose lease and attempt match."""
        if outcome in ("succeeded", "failed", "cancelled"):
            it.status = outcome
        elif self.stop_reason is not None:
            it.status = "cancelled"
        elif outcome == "released":
            it.status = "queued"
        elif it.attempts >= it.max_attempts:
            it.status = "failed"
        else:
            it.status = "queued"
        if outcome == "released":
            it.max_attempts += 1
        it.lease = None
        if error is not None:
            it.last_error = error

    # -- steps --------------------------------------------------------------------------

    @initialize(
        n=st.integers(1, 4),
        budget=st.integers(1, 3),
        max_failures=st.none() | st.integers(0, 2),
        policy=st.sampled_from([None, "completed", "terminal"]),
    )
    def create(self, n: int, budget: int, max_failures: int | None, policy: str | None) -> None:
        self.budget = budget
        self.max_failures = max_failures
        after = None
        if policy is not None:
            dep = self.run(
                batches.submit(
                    self.db,
                    batches.NewBatch(handler=self.dep_handler, items=[(None, "0")]),
                    tenant="t",
                    actor="test",
                    attempt_budget=1,
                    callback_handler=None,
                )
            )
            self.dep_id, self.policy, self.waiting = dep.batch["id"], policy, True
            self.status = "waiting"
            after = (uuid.UUID(self.dep_id),)
        nb = batches.NewBatch(
            handler=self.handler,
            items=[(None, json.dumps(k)) for k in range(n)],
            max_failures=max_failures,
            after=after,
            after_policy=None if policy is None else states.AfterPolicy(policy),
        )
        sub = self.run(
            batches.submit(
                self.db, nb, tenant="t", actor="test", attempt_budget=budget, callback_handler=None
            )
        )
        self.batch_id = sub.batch["id"]
        rows = self.run(self.db.fetch("list_items", uuid.UUID(self.batch_id), None, 0, 100))
        self.items = {int(r["id"]): ModelItem(max_attempts=budget) for r in rows}
        assert len(self.items) == n

    @rule(worker=st.sampled_from(["w1", "w2"]), n=st.integers(1, 4))
    def claim(self, worker: str, n: int) -> None:
        lease = self.leases[worker]
        rows = self.run(
            self.db.fetch("claim_items", self.handler, n, worker, lease, None, None, 1.0)
        )
        c = self.counts()
        claimable = self.status in ("queued", "running") and c["queued"] > 0
        assert len(rows) == (min(n, c["queued"]) if claimable else 0), (len(rows), self.status, c)
        for r in rows:
            it = self.items[int(r["id"])]
            assert it.status == "queued", (r["id"], it)
            assert r["attempts"] == it.attempts + 1, (r["attempts"], it)
            it.status, it.attempts, it.lease = "running", it.attempts + 1, lease
            it.history.append((lease, it.attempts))
        self.changed = False
        if rows:
            self.settle()

    @precondition(lambda self: any(it.history for it in self.items.values()))
    @rule(data=st.data(), outcome=st.sampled_from(OUTCOMES))
    def outcome(self, data: st.DataObject, outcome: str) -> None:
        item_id = data.draw(
            st.sampled_from(sorted(i for i, it in self.items.items() if it.history))
        )
        it = self.items[item_id]
        # Mostly a real (lease, attempt) pair of this item's past; sometimes a mix-up
        # (another lease with this attempt number): fencing needs both to match.
        lease, attempt = data.draw(
            st.sampled_from(it.history)
            | st.tuples(
                # in order of appearance (not by random value), so that replays draw alike
                st.sampled_from(
                    list(dict.fromkeys([*(h[0] for h in it.history), *self.leases.values()]))
                ),
                st.sampled_from(list(dict.fromkeys(h[1] for h in it.history))),
            ),
            label="lease, attempt",
        )
        error = None if outcome == "succeeded" else f"T_{outcome}"
        err_json = (
            json.dumps({"attempt": attempt, "type": error, "message": "x"}) if error else None
        )
        result = json.dumps({"attempt": attempt}) if outcome == "succeeded" else None
        rows = self.run(
            self.db.fetch(
                "apply_outcomes",
                lease,
                [uuid.UUID(self.batch_id)],
                [item_id],
                [attempt],
                [outcome],
                [result],
                [err_json],
                [0.0],
                "test",
            )
        )
        fenced_ok = it.status == "running" and (it.lease, it.attempts) == (lease, attempt)
        kinds = Counter(r["kind"] for r in rows)
        self.changed = False
        if not fenced_ok:
            # A stale write is reported as fenced and changes nothing.
            assert [(r["kind"], int(r["id"])) for r in rows] == [("fenced", item_id)], rows
            return
        assert kinds["fenced"] == 0, (rows, it, lease, attempt)
        self.apply(it, outcome, error)
        self.settle()
        # Only non-success outcomes report the item's new status.
        reported = [r["status"] for r in rows if r["kind"] == "item"]
        assert reported == ([] if outcome == "succeeded" else [it.status]), (rows, it)
        finished = [r["status"] for r in rows if r["kind"] == "batch"]
        assert finished == ([self.status] if self.status in TERMINAL else []), (rows, self.status)

    @rule(worker=st.sampled_from(["w1", "w2"]))
    def reclaim(self, worker: str) -> None:
        """The worker died: its lease is reclaimed and it comes back under a new one."""
        lease = self.leases[worker]
        self.run(self.db.fetch("reclaim_leases", [uuid.UUID(lease)], "reaper"))
        self.leases[worker] = str(uuid.uuid4())
        lost = [it for it in self.items.values() if it.status == "running" and it.lease == lease]
        self.changed = False
        for it in lost:
            self.apply(it, "lost", "WorkerLost")
        if lost:
            self.settle()

    @precondition(lambda self: self.dep_id and not self.dep_ended)
    @rule(how=st.sampled_from(["succeeded", "failed", "cancelled"]))
    def end_dependency(self, how: str) -> None:
        """The dependency ends: the batch is released (queued, or paused if it was
        paused meanwhile) or, when its policy forbids the end, cancelled, in the
        same transaction, unless it has ended already."""
        dep = uuid.UUID(self.dep_id)
        q = store.Queries(self.db)
        if how == "cancelled":
            out = self.run(q.cancel_batch(dep, tenant=None, actor="test"))
            assert out.kind is store.ControlKind.OK, out
        else:
            lease = str(uuid.uuid4())
            rows = self.run(
                self.db.fetch("claim_items", self.dep_handler, 1, "w9", lease, None, None, 1.0)
            )
            assert len(rows) == 1, rows
            self.run(
                self.db.fetch(
                    "apply_outcomes",
                    lease,
                    [dep],
                    [rows[0]["id"]],
                    [1],
                    [how],
                    [None],
                    [None if how == "succeeded" else json.dumps({"type": "T", "message": "x"})],
                    [0.0],
                    "test",
                )
            )
        self.dep_ended = True
        ended = {"succeeded": "completed", "failed": "failed", "cancelled": "cancelled"}[how]
        self.changed = False
        if not self.waiting:
            return  # cancelled meanwhile (or ended and retried): past its dependency
        self.waiting = False
        if self.policy == "completed" and ended != "completed":
            for it in self.items.values():
                if it.status == "queued":
                    it.status = "cancelled"
            self.stop_reason = "dependency"
        self.settle()

    def control(
        self, run: Callable[[store.Queries, uuid.UUID], Coroutine[Any, Any, store.ControlResult]]
    ) -> str:
        """A batch control's answer as the SQL spells it ('ok', 'conflict:…')."""
        out: store.ControlResult = self.run(run(store.Queries(self.db), uuid.UUID(self.batch_id)))
        conflict = out.kind is store.ControlKind.CONFLICT
        return f"conflict:{out.reason}" if conflict else str(out.kind)

    @rule()
    def cancel(self) -> None:
        out = self.control(lambda q, b: q.cancel_batch(b, tenant=None, actor="test"))
        self.changed = False
        if self.status in ("cancelled", "cancelling"):
            assert out == "ok", out
        elif self.status in TERMINAL:
            assert out.startswith("conflict:"), out
        else:
            assert out == "ok", out
            for it in self.items.values():
                if it.status == "queued":
                    it.status = "cancelled"
            self.stop_reason = "cancel"
            self.settle()

    @rule(pause=st.booleans())
    def pause_or_resume(self, pause: bool) -> None:
        out = self.control(lambda q, b: q.pause_batch(b, tenant=None, actor="test", pause=pause))
        self.changed = False
        if self.status in TERMINAL or self.status == "cancelling":
            assert out.startswith("conflict:"), out
        elif pause == self.paused:
            assert out == "ok", out
        else:
            assert out == "ok", out
            self.paused = pause
            if not pause and self.status == "paused":
                self.status = "running"  # resumed: _batch_status says queued or running
            self.settle()

    @rule(include_cancelled=st.booleans())
    def retry_batch(self, include_cancelled: bool) -> None:
        out = self.control(
            lambda q, b: q.retry_batch(
                b, tenant=None, actor="test", include_cancelled=include_cancelled
            )
        )
        self.changed = False
        again = [
            it
            for it in self.items.values()
            if it.status == "failed" or (include_cancelled and it.status == "cancelled")
        ]
        if self.status == "cancelling" or not again:
            assert out.startswith("conflict:"), out
            return
        assert out == "ok", out
        for it in again:
            it.status = "queued"
            it.max_attempts += self.budget
        self.settle(reopen=True)

    def item_control(
        self, run: Callable[[store.Queries], Coroutine[Any, Any, store.ItemControlResult]]
    ) -> str:
        """An item control's answer as the SQL spells it ('ok', 'conflict:…')."""
        out: store.ItemControlResult = self.run(run(store.Queries(self.db)))
        conflict = out.result.kind is store.ControlKind.CONFLICT
        return f"conflict:{out.result.reason}" if conflict else str(out.result.kind)

    @precondition(lambda self: bool(self.items))
    @rule(data=st.data())
    def cancel_item(self, data: st.DataObject) -> None:
        """One item cancelled: queued or running (its lease fenced: a later outcome
        of that attempt is refused), the batch settled with it; a cancelled item
        again changes nothing."""
        item_id = data.draw(st.sampled_from(sorted(self.items)))
        it = self.items[item_id]
        out = self.item_control(lambda q: q.cancel_item(item_id, tenant=None, actor="test"))
        self.changed = False
        if it.status == "cancelled":
            assert out == "ok", out
        elif it.status in ("succeeded", "failed"):
            assert out.startswith("conflict:") and it.status in out, out
        else:
            assert out == "ok", out
            it.status, it.lease = "cancelled", None
            self.settle()

    @precondition(lambda self: bool(self.items))
    @rule(data=st.data())
    def retry_item(self, data: st.DataObject) -> None:
        """One finished item queued again with a fresh budget; a finished batch
        reopens as with retry_batch, unless its failure budget would stop it again."""
        item_id = data.draw(st.sampled_from(sorted(self.items)))
        it = self.items[item_id]
        out = self.item_control(lambda q: q.retry_item(item_id, tenant=None, actor="test"))
        self.changed = False
        failed_after = self.counts()["failed"] - (it.status == "failed")
        if it.status in ("queued", "running"):
            assert out.startswith("conflict:") and it.status in out, out
        elif self.status == "cancelling":
            assert out.startswith("conflict:"), out
        elif self.max_failures is not None and failed_after > self.max_failures:
            assert out.startswith("conflict:") and "failure budget" in out, out
        else:
            assert out == "ok", out
            it.status = "queued"
            it.max_attempts += self.budget
            self.settle(reopen=True)

    # -- after every step ----------------------------------------------------------------

    @invariant()
    def matches_model_and_spec(self) -> None:
        if not self.batch_id:
            return
        bid = uuid.UUID(self.batch_id)
        b = self.run(self.db.fetchrow("get_batch", bid, None))
        rows = self.run(self.db.fetch("list_items", bid, None, 0, 100))
        assert b is not None
        actual = Counter(r["status"] for r in rows)
        # The invariants: each count is the number of its items; total is the sum; terminal
        # exactly when nothing is queued or running.
        for s in STATES:
            assert b[s] == actual[s], (s, dict(b), actual)
        assert b["total"] == len(rows) == sum(b[s] for s in STATES)
        assert (b["status"] in TERMINAL) == (b["queued"] + b["running"] == 0), dict(b)
        assert self.run(self.db.fetch("doctor_drift")) == []
        # The model.
        assert b["status"] == self.status, (b["status"], self.status, dict(b))
        for r in rows:
            # every observed change is one the transition table in states.py allows
            before = self.seen.get(int(r["id"]))
            if before is not None and before != r["status"]:
                assert states.item_transition_allowed(
                    states.ItemStatus(before), states.ItemStatus(r["status"])
                ), (r["id"], before, r["status"])
            self.seen[int(r["id"])] = r["status"]
            it = self.items[int(r["id"])]
            got = (r["status"], r["attempts"], r["max_attempts"])
            assert got == (it.status, it.attempts, it.max_attempts), (r["id"], got, it)
            err = json.loads(r["error"]) if r["error"] is not None else None
            assert (err["type"] if err else None) == it.last_error, (r["id"], err, it)
        # Version: moves with every change, never without one (fenced writes, no-ops).
        if self.changed:
            assert b["version"] > self.version, (b["version"], self.version)
        else:
            assert b["version"] == self.version, (b["version"], self.version)
        self.version = b["version"]
        self.changed = False


def test_transition_functions_keep_invariants_and_fencing(db_url: str) -> None:
    loop = asyncio.new_event_loop()
    db = loop.run_until_complete(dbm.Database.connect(config.from_mapping({}), db_url))
    BatchMachine.loop, BatchMachine.db = loop, db
    try:
        run_state_machine_as_test(
            BatchMachine,
            settings=settings(
                max_examples=150,
                stateful_step_count=40,
                deadline=None,
                suppress_health_check=[HealthCheck.too_slow],
                database=None,
            ),
        )
    finally:
        loop.run_until_complete(db.close())
        loop.close()
