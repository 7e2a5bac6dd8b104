"""Dependencies between batches over real HTTP against real daemons: a batch
submitted with ``after`` waits (status ``waiting``, its items never claimed)
until its dependencies end, and the transaction that ends the last one releases
it, or cancels it (and what waits for it) when ``after_policy`` forbids that end.
The database does it, so it holds across daemons and a daemon killed at the
worst moment."""

from __future__ import annotations

import hashlib
import itertools
import pathlib
import uuid
from datetime import datetime
from typing import Any

from tests.conftest import DaemonFactory
from tests.daemon import DEFAULT_HANDLERS, Daemon, wait_for
from tests.test_api import assert_problem, db_rows

HANDLERS = dict(DEFAULT_HANDLERS) | {
    "until_file": {"type": "python", "target": "tests.handlers:until_file", "timeout": "1h"},
}
TERMINAL = ("completed", "completed_with_errors", "failed", "cancelled")
Response = tuple[int, Any, dict[str, str]]


def gate(d: Daemon, path: pathlib.Path, **payload: Any) -> dict[str, Any]:
    """A one-item batch that runs until ``path`` exists (then fails with then_fail)."""
    return d.submit("until_file", [{"file": str(path), **payload}])


def post(d: Daemon, body: Any, headers: dict[str, str] | None = None) -> Response:
    return d.api("POST", "/v1/batches", body, headers)


def at(text: str | None) -> datetime:
    assert text is not None
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def events(db_url: str, batch_id: str) -> list[Any]:
    return db_rows(
        db_url,
        "SELECT action, detail::text AS detail, xmin::text AS tx FROM supervisor.batch_events"
        " WHERE batch_id = $1 ORDER BY id",
        uuid.UUID(batch_id),
    )


def stop_reason(db_url: str, batch_id: str) -> str | None:
    rows = db_rows(
        db_url, "SELECT stop_reason FROM supervisor.batches WHERE id = $1", uuid.UUID(batch_id)
    )
    return rows[0]["stop_reason"]  # type: ignore[no-any-return]


def test_a_dependent_waits_for_all_its_dependencies_then_runs(
    daemons: DaemonFactory, db_url: str, tmp_path: pathlib.Path
) -> None:
    d = daemons(handlers=HANDLERS)
    fa, fb = tmp_path / "a", tmp_path / "b"
    a, b = gate(d, fa), gate(d, fb)
    dep = d.submit("echo", [1, 2, 3], after=[a["id"], b["id"]])
    assert dep["status"] == "waiting", dep
    assert dep["after"] == [a["id"], b["id"]] and dep["after_policy"] == "completed", dep
    assert sorted(dep["waiting_on"]) == sorted([a["id"], b["id"]]), dep
    code, page, _ = d.api("GET", "/v1/batches?status=waiting")
    assert code == 200 and [x["id"] for x in page["batches"]] == [dep["id"]], page

    fa.touch()
    d.wait_status(a["id"], "completed")
    # One dependency left: still waiting (no claim took its items), and it says on what.
    seen = d.batch(dep["id"])
    assert seen["status"] == "waiting" and seen["waiting_on"] == [b["id"]], seen
    assert all(it["status"] == "queued" for it in d.items(dep["id"])), d.items(dep["id"])

    fb.touch()
    done = d.wait_status(dep["id"], "completed")
    assert done["waiting_on"] is None and done["counts"]["succeeded"] == 3, done
    b_done = d.batch(b["id"])
    first_start = min(at(it["started_at"]) for it in d.items(dep["id"]))
    assert first_start >= at(b_done["finished_at"]), (first_start, b_done)
    assert first_start >= at(d.batch(a["id"])["finished_at"])
    actions = [e["action"] for e in events(db_url, dep["id"])]
    assert actions == ["created", "dependencies_met", "started", "finished"], actions
    assert "api.internal_error" not in d.log()


def test_the_dependent_is_released_in_the_transaction_that_ends_its_dependency(
    daemons: DaemonFactory, db_url: str, tmp_path: pathlib.Path
) -> None:
    """No moment where the dependency has ended and the dependent still waits: the
    dependency's 'finished' and the dependent's release are one transaction, and a
    daemon killed right after the dependency's last item leaves the dependent
    queued, run by the next daemon."""
    d = daemons("k1", handlers=HANDLERS)
    fa = tmp_path / "a"
    a = gate(d, fa)
    dep = d.submit("echo", [1], after=[a["id"]])
    both = (
        "SELECT a.status AS a, d.status AS d FROM supervisor.batches a, supervisor.batches d"
        " WHERE a.id = $1 AND d.id = $2"
    )
    ids = (uuid.UUID(a["id"]), uuid.UUID(dep["id"]))
    fa.touch()
    # One snapshot for both rows: the first one that shows the dependency ended.
    snap = wait_for(
        lambda: next((r for r in db_rows(db_url, both, *ids) if r["a"] in TERMINAL), None),
        20,
        0.001,
        "the dependency to end",
    )
    d.kill()
    assert snap["a"] == "completed" and snap["d"] != "waiting", dict(snap)
    finished = [e["tx"] for e in events(db_url, a["id"]) if e["action"] == "finished"]
    released = [e["tx"] for e in events(db_url, dep["id"]) if e["action"] == "dependencies_met"]
    assert finished and finished == released, (finished, released)

    d2 = daemons("k2", handlers=HANDLERS)
    assert d2.wait_status(dep["id"], "completed")["counts"]["succeeded"] == 1


def test_a_forbidden_end_cancels_the_dependents_transitively_and_terminal_runs(
    daemons: DaemonFactory, db_url: str, tmp_path: pathlib.Path
) -> None:
    d = daemons(handlers=HANDLERS)
    fa = tmp_path / "a"
    a = gate(d, fa, then_fail=True)
    # policy completed (the default)
    child = d.submit("echo", [1, 2], after=[a["id"]], idempotency_key="child")
    grandchild = d.submit("echo", [1], after=[child["id"]])
    anyway = d.submit("echo", [1], after=[a["id"]], after_policy="terminal")
    after_anyway = d.submit("echo", [1], after=[anyway["id"]])
    for b in (child, grandchild, anyway, after_anyway):
        assert b["status"] == "waiting", b

    fa.touch()
    d.wait_status(a["id"], "failed")
    for b in (child, grandchild):
        got = d.wait_status(b["id"], "cancelled")
        assert got["counts"]["cancelled"] == got["counts"]["total"], got
        assert all(it["started_at"] is None for it in d.items(b["id"])), d.items(b["id"])
        assert stop_reason(db_url, b["id"]) == "dependency"
    why = [e for e in events(db_url, child["id"]) if e["action"] == "dependency_failed"]
    assert len(why) == 1 and a["id"] in why[0]["detail"] and "failed" in why[0]["detail"], why
    why = [e for e in events(db_url, grandchild["id"]) if e["action"] == "dependency_failed"]
    assert len(why) == 1 and child["id"] in why[0]["detail"], why
    # A repeat of the request answers with its batch, not with the failed dependency.
    code, again, _ = post(
        d, {"handler": "echo", "items": [1, 2], "after": [a["id"]], "idempotency_key": "child"}
    )
    assert code == 200 and again["id"] == child["id"], again
    # "terminal" runs after a failure, and what waits for it runs after it.
    assert d.wait_status(anyway["id"], "completed")["counts"]["succeeded"] == 1
    assert d.wait_status(after_anyway["id"], "completed")["counts"]["succeeded"] == 1

    # A batch cancelled for its dependency can be retried: it then runs.
    code, body, _ = d.api("POST", f"/v1/batches/{child['id']}/retry", {"include_cancelled": True})
    assert code == 200, body
    assert d.wait_status(child["id"], "completed")["counts"]["succeeded"] == 2


def test_dependencies_already_ended_at_submission_count_at_once(
    daemons: DaemonFactory, db_url: str
) -> None:
    d = daemons()
    ok = d.submit("echo", [1])
    bad = d.submit("permanent", [1])
    d.wait_status(ok["id"], "completed")
    d.wait_status(bad["id"], "failed")
    started = d.submit("echo", [1], after=[ok["id"]])
    assert started["status"] in ("queued", "running", "completed"), started
    d.wait_status(started["id"], "completed")
    anyway = d.submit("echo", [1], after=[ok["id"], bad["id"]], after_policy="terminal")
    d.wait_status(anyway["id"], "completed")
    # Forbidden already: refused, naming the dependency, and nothing written.
    before = db_rows(db_url, "SELECT count(*) AS n FROM supervisor.batches")[0]["n"]
    body = assert_problem(post(d, {"handler": "echo", "items": [1], "after": [bad["id"]]}), 409)
    assert body["dependency_batch_id"] == bad["id"] and body["dependency_status"] == "failed"
    assert bad["id"] in body["detail"], body
    assert db_rows(db_url, "SELECT count(*) AS n FROM supervisor.batches")[0]["n"] == before


TOKENS = {"A": "token-of-tenant-a", "B": "token-of-tenant-b"}


def bearer(who: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[who]}"}


def test_bad_after_lists_are_422_naming_after_and_write_nothing(
    daemons: DaemonFactory, db_url: str
) -> None:
    tokens = [
        {
            "name": who.lower(),
            "tenant": who,
            "sha256": hashlib.sha256(token.encode()).hexdigest(),
            "scopes": ["read", "write"],
        }
        for who, token in TOKENS.items()
    ]
    d = daemons(extra={"auth": {"tokens": tokens}})
    code, mine, _ = post(d, {"handler": "sleeper", "items": [{"sleep": 3600}]}, bearer("A"))
    assert code == 201, mine
    code, theirs, _ = post(d, {"handler": "sleeper", "items": [{"sleep": 3600}]}, bearer("B"))
    assert code == 201, theirs
    unknown = str(uuid.uuid4())

    def refused(after: Any, path: str, **more: Any) -> dict[str, Any]:
        body = {"handler": "echo", "items": [1], "after": after, **more}
        return assert_problem(post(d, body, bearer("A")), 422, path)

    assert unknown in refused([unknown], "/after")["errors"][0]["message"]
    # Another tenant's batch is as unknown as one that does not exist.
    assert theirs["id"] in refused([mine["id"], theirs["id"]], "/after")["errors"][0]["message"]
    refused([mine["id"], mine["id"]], "/after/1")
    refused([mine["id"], mine["id"].upper()], "/after/1")
    refused("not-a-list", "/after")
    refused([str(uuid.uuid4()) for _ in range(101)], "/after")
    refused(["nope"], "/after/0")
    refused([5], "/after/0")
    refused([mine["id"]], "/after_policy", after_policy="sometimes")
    n = db_rows(db_url, "SELECT count(*) AS n FROM supervisor.batches")[0]["n"]
    assert n == 2, n
    # The tenant's own batch is fine; no list, or an empty one, means no dependencies.
    code, ok, _ = post(d, {"handler": "echo", "items": [1], "after": [mine["id"]]}, bearer("A"))
    assert code == 201 and ok["status"] == "waiting", ok
    code, free, _ = post(d, {"handler": "echo", "items": [1], "after": []}, bearer("A"))
    assert code == 201 and free["after"] == [] and free["after_policy"] is None, free


def test_cancel_pause_and_resume_of_a_waiting_batch(
    daemons: DaemonFactory, db_url: str, tmp_path: pathlib.Path
) -> None:
    d = daemons(handlers=HANDLERS)
    fa = tmp_path / "a"
    a = gate(d, fa)
    cancelled = d.submit("echo", [1, 2], after=[a["id"]])
    behind = d.submit("echo", [1], after=[cancelled["id"]])
    paused = d.submit("echo", [1], after=[a["id"]])

    code, body, _ = d.api("POST", f"/v1/batches/{cancelled['id']}/cancel")
    assert code == 200 and body["status"] == "cancelled", body
    assert body["counts"]["cancelled"] == 2, body
    # Cancelling it ended it, so what waited for it is cancelled too.
    assert d.batch(behind["id"])["status"] == "cancelled"
    assert stop_reason(db_url, behind["id"]) == "dependency"
    assert d.batch(a["id"])["status"] == "running"  # a dependency is not touched

    # A paused waiting batch still waits; released, it is paused, not run.
    code, body, _ = d.api("POST", f"/v1/batches/{paused['id']}/pause")
    assert code == 200 and body["status"] == "waiting", body
    fa.touch()
    d.wait_status(a["id"], "completed")
    got = d.batch(paused["id"])
    assert got["status"] == "paused" and got["counts"]["queued"] == 1, got
    code, body, _ = d.api("POST", f"/v1/batches/{paused['id']}/resume")
    assert code == 200, body
    d.wait_status(paused["id"], "completed")


def test_two_daemons_run_a_chain_and_a_release_wakes_the_claimers(
    daemons: DaemonFactory, db_url: str, tmp_path: pathlib.Path
) -> None:
    """Polling every 30 s: a released batch that starts within seconds was woken
    by the release's NOTIFY, on whichever daemon."""
    slow_poll = {"poll_interval": "30s"}
    d1 = daemons("w1", handlers=HANDLERS, worker=slow_poll)
    d2 = daemons("w2", handlers=HANDLERS, worker=slow_poll)
    f = tmp_path / "go"
    first = gate(d1, f)
    chain = [first]
    for i in range(4):
        via = d1 if i % 2 else d2
        chain.append(via.submit("echo", list(range(5)), after=[chain[-1]["id"]]))
    wide = d2.submit("echo", [1], after=[b["id"] for b in chain])
    f.touch()
    for b in (*chain, wide):
        d1.wait_status(b["id"], "completed", timeout=15)
    for prev, nxt in itertools.pairwise(chain):
        started = min(at(it["started_at"]) for it in d2.items(nxt["id"]))
        assert started >= at(d2.batch(prev["id"])["finished_at"]), (prev, nxt)
    workers = db_rows(
        db_url,
        "SELECT DISTINCT worker FROM supervisor.items WHERE batch_id = ANY ($1::uuid[])",
        [uuid.UUID(b["id"]) for b in chain[1:]],
    )
    assert {w["worker"] for w in workers} <= {"w1", "w2"}, workers
