"""Item controls over real HTTP against real daemons: POST /v1/items/{id}/retry
and .../cancel. The item's batch follows in the same transaction (a retry
reopens a finished batch, the cancel of its last open item finalizes it), a
cancelled running attempt is fenced (its late outcome changes nothing) and
stopped by its daemon, every control is in the batch's log, and `doctor` finds
no drift afterwards."""

from __future__ import annotations

import pathlib
import random
import re
import threading
from typing import Any

from tests.conftest import DaemonFactory
from tests.daemon import DEFAULT_HANDLERS, Daemon, check_invariants, wait_for
from tests.test_api import TOKENS as API_TOKENS
from tests.test_api import assert_problem, bearer, sha256hex
from tests.test_controls import read_events
from tests.test_exclusive_keys import assert_busy, held
from tests.test_seeds import doctor_clean

HANDLERS = dict(DEFAULT_HANDLERS) | {
    "until_file": {"type": "python", "target": "tests.handlers:until_file", "timeout": "1h"},
    "shielded": {
        "type": "python",
        "target": "tests.handlers:until_file_shielded",
        "timeout": "1h",
    },
    "gated": {
        "type": "python",
        "target": "tests.handlers:gated",
        "timeout": "5s",
        "max_attempts": 1,
    },
}


def control(d: Daemon, item: Any, verb: str, **kw: Any) -> tuple[int, Any, dict[str, str]]:
    return d.api("POST", f"/v1/items/{item}/{verb}", **kw)


def item(d: Daemon, item_id: Any) -> dict[str, Any]:
    code, body, _ = d.api("GET", f"/v1/items/{item_id}")
    assert code == 200, (code, body)
    return dict(body)


def log_of(d: Daemon, batch_id: str) -> list[dict[str, Any]]:
    code, body, _ = d.api("GET", f"/v1/batches/{batch_id}/log")
    assert code == 200, body
    return list(body["entries"])


def only_item(d: Daemon, batch_id: str) -> dict[str, Any]:
    (it,) = d.items(batch_id)
    return it


def blocked(d: Daemon, path: pathlib.Path, handler: str = "until_file") -> dict[str, Any]:
    """A running batch whose only item runs until ``path`` exists."""
    b = d.submit(handler, [{"file": str(path)}])
    d.wait_status(b["id"], "running")
    wait_for(lambda: only_item(d, b["id"])["status"] == "running", 10, what="item running")
    return b


def waiting_behind(d: Daemon, dep: str, n: int) -> dict[str, Any]:
    """A batch of ``n`` echo items waiting for ``dep``: its items stay queued."""
    b = d.submit("echo", list(range(n)), after=[dep])
    assert b["status"] == "waiting", b
    return b


# -- retry ---------------------------------------------------------------------------


def test_retry_of_the_last_failed_item_reopens_the_batch_which_then_completes(
    daemons: DaemonFactory, tmp_path: pathlib.Path
) -> None:
    gate = tmp_path / "fixed"
    d = daemons(handlers=HANDLERS, env={"BSV_TEST_GATE": str(gate)})
    b = d.submit("gated", [{"ok": True}, {"ok": False}])
    done = d.wait_status(b["id"], "completed_with_errors")
    (failed,) = d.items(b["id"], status="failed")
    gate.touch()
    code, body, _ = control(d, failed["id"], "retry")
    assert code == 200, body
    assert body["id"] == failed["id"] and body["status"] in ("queued", "running", "succeeded")
    assert body["max_attempts"] == failed["max_attempts"] + 1  # the batch's budget again
    assert body["errors"], body  # the history of the earlier attempts stays
    reopened = d.batch(b["id"])
    assert reopened["status"] not in ("completed_with_errors",), reopened
    assert reopened["version"] > done["version"]
    if reopened["status"] == "completed":  # the retried item already ran again
        assert reopened["finished_at"] > done["finished_at"], (done, reopened)
    else:
        assert reopened["finished_at"] is None, reopened
    check_invariants(reopened)
    final = d.wait_status(b["id"], "completed")
    assert final["counts"]["succeeded"] == 2 and final["counts"]["failed"] == 0
    again = item(d, failed["id"])
    assert (again["status"], again["attempts"]) == ("succeeded", 2), again
    entries = log_of(d, b["id"])
    actions = [e["action"] for e in entries]
    assert actions.count("finished") == 2 and "item_retried" in actions, actions
    retried = entries[actions.index("item_retried")]
    assert retried["actor"] and retried["at"], retried
    assert retried["detail"]["item"] == failed["id"] and retried["detail"]["status"] == "failed"
    doctor_clean(d)


def test_retry_reruns_a_succeeded_item_and_clears_its_result(daemons: DaemonFactory) -> None:
    d = daemons(handlers=HANDLERS)
    b = d.submit("echo", [{"n": 1}])
    d.wait_status(b["id"], "completed")
    first = only_item(d, b["id"])
    assert first["result"]["attempt"] == 1
    code, body, _ = control(d, first["id"], "retry")
    assert code == 200, body
    d.wait_status(b["id"], "completed")
    wait_for(lambda: item(d, first["id"])["attempts"] == 2, 10, what="the rerun")
    rerun = item(d, first["id"])
    assert rerun["status"] == "succeeded" and rerun["result"]["attempt"] == 2, rerun
    doctor_clean(d)


def test_retry_of_a_queued_or_running_item_is_409_naming_its_status(
    daemons: DaemonFactory, tmp_path: pathlib.Path
) -> None:
    d = daemons(handlers=HANDLERS)
    run = blocked(d, tmp_path / "go")
    running = only_item(d, run["id"])
    body = assert_problem(control(d, running["id"], "retry"), 409)
    assert body["item_status"] == "running" and "running" in body["detail"], body
    wait = waiting_behind(d, run["id"], 1)
    queued = only_item(d, wait["id"])
    body = assert_problem(control(d, queued["id"], "retry"), 409)
    assert body["item_status"] == "queued" and "queued" in body["detail"], body
    assert body["batch_id"] == wait["id"], body
    assert d.batch(wait["id"])["version"] == wait["version"]  # nothing changed
    assert not [e for e in log_of(d, run["id"]) if e["action"].startswith("item_")]


def test_a_retry_its_failure_budget_would_stop_again_is_409(
    daemons: DaemonFactory, tmp_path: pathlib.Path
) -> None:
    """max_failures 0 and both items failed: retrying one leaves one failure, over
    the budget, so the reopened batch would cancel that very item at once."""
    d = daemons(handlers=HANDLERS)
    go = tmp_path / "go"
    b = d.submit("until_file", [{"file": str(go), "then_fail": True}] * 2, max_failures=0)
    wait_for(lambda: d.batch(b["id"])["counts"]["running"] == 2, 10, what="both running")
    go.touch()
    ended = d.wait_status(b["id"], "failed")
    assert ended["counts"]["failed"] == 2, ended
    first = d.items(b["id"])[0]
    body = assert_problem(control(d, first["id"], "retry"), 409)
    assert "failure budget" in body["detail"] and body["item_status"] == "failed", body
    assert d.batch(b["id"])["version"] == ended["version"]
    # the batch retry queues both, within the budget again
    assert d.api("POST", f"/v1/batches/{b['id']}/retry")[0] == 200


def test_item_retry_reopens_a_keyed_batch_only_while_its_key_is_free(
    daemons: DaemonFactory, tmp_path: pathlib.Path
) -> None:
    d = daemons(handlers=HANDLERS)
    key = "item-controls:1"
    done = tmp_path / "done"
    old = d.submit("until_file", [{"file": str(done), "fail_first": True}], exclusive_key=key)
    old = d.wait_status(old["id"], "failed")
    failed = only_item(d, old["id"])
    holder = held(d, key)
    assert_busy(control(d, failed["id"], "retry"), holder["id"])
    after = d.batch(old["id"])
    assert (after["status"], after["version"]) == ("failed", old["version"]), after
    assert item(d, failed["id"])["status"] == "failed"
    assert d.api("POST", f"/v1/batches/{holder['id']}/cancel")[0] == 200
    d.wait_status(holder["id"], "cancelled")
    code, body, _ = control(d, failed["id"], "retry")
    assert code == 200, body
    assert d.batch(old["id"])["status"] == "running"
    # reopened, it holds the key again
    assert_busy(
        d.api("POST", "/v1/batches", {"handler": "echo", "items": [1], "exclusive_key": key}),
        old["id"],
    )
    done.touch()
    d.wait_status(old["id"], "completed")
    doctor_clean(d)


def test_item_retry_in_a_paused_batch_queues_it_until_resume(
    daemons: DaemonFactory, tmp_path: pathlib.Path
) -> None:
    d = daemons(handlers=HANDLERS)
    go = tmp_path / "go"
    b = d.submit("until_file", [{"file": str(go), "fail_first": True}, {"file": str(go)}])
    wait_for(
        lambda: (c := d.batch(b["id"])["counts"])["failed"] == 1 and c["running"] == 1,
        10,
        what="one failed, one running",
    )
    assert d.api("POST", f"/v1/batches/{b['id']}/pause")[0] == 200
    (failed,) = d.items(b["id"], status="failed")
    code, body, _ = control(d, failed["id"], "retry")
    assert code == 200 and body["status"] == "queued", body
    go.touch()  # the running item finishes; the retried one is not claimed while paused
    paused = wait_for(
        lambda: (x := d.batch(b["id"]))["counts"]["succeeded"] == 1 and x,
        10,
        what="the running item done",
    )
    assert paused["status"] == "paused" and paused["counts"]["queued"] == 1, paused
    assert item(d, failed["id"])["status"] == "queued"
    assert d.api("POST", f"/v1/batches/{b['id']}/resume")[0] == 200
    d.wait_status(b["id"], "completed")
    doctor_clean(d)


# -- cancel --------------------------------------------------------------------------


def test_cancel_of_the_last_open_items_finalizes_a_waiting_batch_and_its_dependents(
    daemons: DaemonFactory, tmp_path: pathlib.Path
) -> None:
    d = daemons(handlers=HANDLERS)
    go = tmp_path / "go"
    dep = blocked(d, go)
    wait = waiting_behind(d, dep["id"], 2)
    after = d.submit("echo", [1], after=[wait["id"]])  # after_policy completed
    one, two = d.items(wait["id"])
    code, body, _ = control(d, one["id"], "cancel")
    assert code == 200 and body["status"] == "cancelled" and body["finished_at"], body
    b = d.batch(wait["id"])
    assert b["status"] == "waiting" and b["counts"]["cancelled"] == 1, b
    check_invariants(b)
    assert control(d, two["id"], "cancel")[0] == 200
    # no wait: the batch ended in the transaction of its last item's cancel, and
    # so did the batch waiting for it (its policy forbids a cancelled dependency)
    b = d.batch(wait["id"])
    assert b["status"] == "cancelled" and b["counts"]["cancelled"] == 2, b
    assert b["finished_at"] is not None
    assert d.batch(after["id"])["status"] == "cancelled"
    entries = log_of(d, wait["id"])
    cancels = [e for e in entries if e["action"] == "item_cancelled"]
    assert [e["detail"]["item"] for e in cancels] == [one["id"], two["id"]], entries
    assert all(e["actor"] and e["at"] and e["detail"]["status"] == "queued" for e in cancels)
    assert entries[-1]["action"] == "finished", entries
    # SSE streams report the cancelled items like any other that ended
    events = read_events(
        f"{d.url}/v1/batches/{wait['id']}/events", {"Last-Event-ID": str(wait["version"])}
    )
    assert [(e[1]["id"], e[1]["status"]) for e in events if e[0] == "item"] == [
        (one["id"], "cancelled"),
        (two["id"], "cancelled"),
    ], events
    assert events[-1][0] == "end"
    go.touch()
    d.wait_status(dep["id"], "completed")
    doctor_clean(d)


def test_cancel_is_idempotent_and_409_for_a_succeeded_or_failed_item(
    daemons: DaemonFactory, tmp_path: pathlib.Path
) -> None:
    gate = tmp_path / "never"
    d = daemons(handlers=HANDLERS, env={"BSV_TEST_GATE": str(gate)})
    b = d.submit("gated", [{"ok": True}, {"ok": False}, {"ok": True}])
    d.wait_status(b["id"], "completed_with_errors")
    for it in d.items(b["id"])[:2]:
        body = assert_problem(control(d, it["id"], "cancel"), 409)
        assert body["item_status"] == it["status"] and it["status"] in body["detail"], body
    dep = blocked(d, tmp_path / "go")
    wait = waiting_behind(d, dep["id"], 2)
    first = d.items(wait["id"])[0]
    assert control(d, first["id"], "cancel")[0] == 200
    version = d.batch(wait["id"])["version"]
    code, body, _ = control(d, first["id"], "cancel")  # again: nothing changes
    assert code == 200 and body["status"] == "cancelled", body
    assert d.batch(wait["id"])["version"] == version
    assert [e["action"] for e in log_of(d, wait["id"])].count("item_cancelled") == 1


def test_cancel_of_a_running_item_is_stopped_by_its_daemon_and_fenced(
    daemons: DaemonFactory, tmp_path: pathlib.Path
) -> None:
    d = daemons(handlers=HANDLERS)
    go = tmp_path / "go"
    b = blocked(d, go)
    it = only_item(d, b["id"])
    code, body, _ = control(d, it["id"], "cancel")
    assert code == 200 and body["status"] == "cancelled", body
    ended = d.batch(b["id"])  # its only item: finalized in the same transaction
    assert ended["status"] == "cancelled" and ended["counts"]["cancelled"] == 1, ended
    # the daemon stopped the attempt (the handler is still blocked on its file)
    # and the attempt's own outcome was refused by the fence
    wait_for(lambda: f"outcome.fenced item={it['id']} " in d.log(), 10, what="fenced write")
    assert f"dispatcher.cancel_item item={it['id']} attempt=1" in d.log()
    assert not go.exists()
    go.touch()
    assert d.batch(b["id"]) == ended
    assert item(d, it["id"])["status"] == "cancelled"
    doctor_clean(d)


def test_a_late_outcome_of_a_cancelled_item_across_processes_changes_nothing(
    daemons: DaemonFactory, tmp_path: pathlib.Path
) -> None:
    """The handler ignores the daemon's stop: released after the cancel, it
    returns, and its daemon writes the attempt's outcome. The fence refuses it."""
    d = daemons(handlers=HANDLERS)
    go = tmp_path / "go"
    other = tmp_path / "other"
    b = d.submit("shielded", [{"file": str(go)}, {"file": str(other)}])
    wait_for(lambda: d.batch(b["id"])["counts"]["running"] == 2, 10, what="both running")
    first, second = d.items(b["id"])
    code, body, _ = control(d, first["id"], "cancel")
    assert code == 200 and body["status"] == "cancelled", body
    cancelled = d.batch(b["id"])
    assert cancelled["status"] == "running", cancelled
    assert cancelled["counts"] == {
        "total": 2,
        "queued": 0,
        "running": 1,
        "succeeded": 0,
        "failed": 0,
        "cancelled": 1,
    }
    wait_for(lambda: f"dispatcher.cancel_item item={first['id']}" in d.log(), 10, what="stop")
    go.touch()  # release the handler: it returns a result now
    wait_for(lambda: f"outcome.fenced item={first['id']} " in d.log(), 10, what="late write")
    late = item(d, first["id"])
    assert (late["status"], late["result"], late["attempts"]) == ("cancelled", None, 1), late
    after = d.batch(b["id"])
    assert (after["version"], after["counts"]) == (cancelled["version"], cancelled["counts"])
    other.touch()
    final = d.wait_status(b["id"], "completed_with_errors")
    assert final["counts"]["succeeded"] == 1 and final["counts"]["cancelled"] == 1, final
    check_invariants(final)
    assert item(d, second["id"])["status"] == "succeeded"
    assert item(d, first["id"])["status"] == "cancelled"
    doctor_clean(d)


def test_a_cancelled_then_retried_item_runs_a_new_attempt_and_the_old_one_stays_fenced(
    daemons: DaemonFactory, tmp_path: pathlib.Path
) -> None:
    """Retried while its cancelled attempt still runs (deaf to the stop), the item
    is claimed again by the same daemon, under the same lease: only the attempt
    number tells the two apart, and the late outcome of attempt 1 is refused."""
    d = daemons(handlers=HANDLERS)
    go = tmp_path / "go"
    b = blocked(d, go, handler="shielded")
    it = only_item(d, b["id"])
    assert control(d, it["id"], "cancel")[0] == 200
    d.wait_status(b["id"], "cancelled")
    code, body, _ = control(d, it["id"], "retry")
    assert code == 200, body
    wait_for(lambda: item(d, it["id"])["attempts"] == 2, 10, what="attempt 2 claimed")
    go.touch()  # both attempts return now; only attempt 2's outcome counts
    final = d.wait_status(b["id"], "completed")
    assert item(d, it["id"])["status"] == "succeeded"
    wait_for(lambda: f"outcome.fenced item={it['id']} attempt=1" in d.log(), 10, what="fence")
    assert final["counts"]["succeeded"] == 1 and final["counts"]["total"] == 1, final
    doctor_clean(d)


# -- ids, tenants, scopes, bodies ----------------------------------------------------


def test_unknown_ids_wrong_tenants_scopes_and_bodies(daemons: DaemonFactory) -> None:
    rw = ["read", "write"]
    tokens = [
        {"name": "a", "tenant": "A", "sha256": sha256hex(API_TOKENS["A"]), "scopes": rw},
        {"name": "b", "tenant": "B", "sha256": sha256hex(API_TOKENS["B"]), "scopes": rw},
        {"name": "r", "tenant": "A", "sha256": sha256hex(API_TOKENS["R"]), "scopes": ["read"]},
    ]
    d = daemons(handlers=HANDLERS, extra={"auth": {"tokens": tokens}})
    a = bearer("A")
    code, b, _ = d.api("POST", "/v1/batches", {"handler": "echo", "items": [1]}, a)
    assert code == 201, b
    wait_for(
        lambda: d.api("GET", f"/v1/batches/{b['id']}", headers=a)[1]["status"] == "completed",
        10,
        what="completed",
    )
    code, page, _ = d.api("GET", f"/v1/batches/{b['id']}/items", headers=a)
    item_id = page["items"][0]["id"]
    for verb in ("retry", "cancel"):
        for bad in ("999999999", "abc", "1" * 19, "-1"):
            assert_problem(control(d, bad, verb, headers=a), 404)
        assert_problem(control(d, item_id, verb, headers=bearer("B")), 404)
        assert_problem(control(d, item_id, verb, headers=bearer("R")), 403)
        assert_problem(control(d, item_id, verb), 401)
        assert_problem(control(d, item_id, verb, body={"force": True}, headers=a), 422, path="")
        assert_problem(control(d, item_id, verb, body=[1], headers=a), 422, path="")
    # tenant B learned nothing and changed nothing
    assert d.api("GET", f"/v1/items/{item_id}", headers=a)[1]["attempts"] == 1
    code, body, _ = control(d, item_id, "retry", body={}, headers=a)
    assert code == 200, body
    code, log, _ = d.api("GET", f"/v1/batches/{b['id']}/log", headers=a)
    (entry,) = [e for e in log["entries"] if e["action"] == "item_retried"]
    assert entry["actor"] == "a", entry


def test_the_item_verbs_of_the_command_line(daemons: DaemonFactory, tmp_path: pathlib.Path) -> None:
    d = daemons(handlers=HANDLERS)
    b = blocked(d, tmp_path / "go")
    it = only_item(d, b["id"])
    out = d.cli("item", "cancel", it["id"])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"item {it['id']}: cancelled; batch {b['id']}: cancelled"
    out = d.cli("item", "cancel", it["id"])  # idempotent
    assert out.returncode == 0, out.stderr
    out = d.cli("item", "retry", "999999999")
    assert out.returncode == 1 and "404" in out.stderr and "Traceback" not in out.stderr
    out = d.cli("item", "retry", "../batches")
    assert out.returncode == 1 and "must be a number" in out.stderr, out.stderr
    (tmp_path / "go").touch()
    out = d.cli("item", "retry", it["id"])
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"item {it['id']}: "), out.stdout
    d.wait_status(b["id"], "completed")
    out = d.cli("item", "retry", it["id"])
    assert out.returncode == 0, out.stderr  # a rerun
    d.wait_status(b["id"], "completed")
    out = d.cli("item", "cancel", it["id"])
    assert out.returncode == 1 and "already succeeded" in out.stderr, out.stderr


# -- across daemons ------------------------------------------------------------------


def test_a_cancel_through_one_daemon_stops_the_attempt_on_another(
    daemons: DaemonFactory, tmp_path: pathlib.Path
) -> None:
    runner = daemons("runner", handlers=HANDLERS)
    b = blocked(runner, tmp_path / "go")  # started before the other daemon exists
    it = only_item(runner, b["id"])
    other = daemons("other", handlers=HANDLERS)
    code, body, _ = control(other, it["id"], "cancel")
    assert code == 200 and body["status"] == "cancelled", body
    assert other.batch(b["id"])["status"] == "cancelled"
    wait_for(
        lambda: f"dispatcher.cancel_item item={it['id']} attempt=1" in runner.log(),
        10,
        what="the runner stops the attempt",
    )
    wait_for(lambda: f"outcome.fenced item={it['id']} " in runner.log(), 10, what="fenced")
    assert runner.batch(b["id"])["status"] == "cancelled"
    doctor_clean(other)


def test_a_missed_notify_is_caught_by_the_control_backstop(
    daemons: DaemonFactory, tmp_path: pathlib.Path
) -> None:
    """LISTEN is down (its address refuses connections): the daemon polls, and the
    2 s control check finds the attempt the database no longer runs."""
    d = daemons(
        handlers=HANDLERS, extra={"database": {"listen_url": "postgresql://127.0.0.1:9/none"}}
    )
    b = blocked(d, tmp_path / "go")
    it = only_item(d, b["id"])
    assert "events.listening" not in d.log()
    assert control(d, it["id"], "cancel")[0] == 200
    wait_for(
        lambda: f"dispatcher.cancel_item item={it['id']} attempt=1" in d.log(),
        10,
        what="the backstop stops the attempt",
    )
    wait_for(lambda: f"outcome.fenced item={it['id']} " in d.log(), 10, what="fenced")
    assert d.batch(b["id"])["status"] == "cancelled"


def test_cancel_of_an_item_whose_daemon_was_killed(
    daemons: DaemonFactory, tmp_path: pathlib.Path
) -> None:
    """The item stays cancelled: neither the reaper nor the daemon restarted under
    its name reclaims it (it is not running any more), and no WorkerLost is written."""
    d1 = daemons("k1", handlers=HANDLERS)
    b = blocked(d1, tmp_path / "go")
    it = only_item(d1, b["id"])
    d2 = daemons("k2", handlers=HANDLERS)
    d1.kill()
    code, body, _ = control(d2, it["id"], "cancel")
    assert code == 200 and body["status"] == "cancelled", body
    ended = d2.batch(b["id"])
    assert ended["status"] == "cancelled", ended
    d1.start()  # reclaims its predecessor's running items at once: there are none
    reclaimed = re.compile(
        r"(heartbeat\.reclaimed_previous name=k1 leases=1|reaper\.reclaimed dead_leases=1)"
        r" items=0"
    )
    wait_for(lambda: reclaimed.search(d1.log() + d2.log()), 10, what="the lease reclaimed")
    (tmp_path / "go").touch()
    after = item(d2, it["id"])
    assert (after["status"], after["errors"], after["attempts"]) == ("cancelled", [], 1), after
    assert d2.batch(b["id"]) == ended
    doctor_clean(d2)


def test_an_item_retry_reopens_a_dependency_as_a_batch_retry_does(
    daemons: DaemonFactory, tmp_path: pathlib.Path
) -> None:
    """The dependents judged when the batch first ended stay as they were (one
    cancelled by its policy, one released and run); one submitted after the
    retry waits for the batch's new end."""
    d = daemons(handlers=HANDLERS)
    go = tmp_path / "go"
    dep = d.submit("until_file", [{"file": str(go), "fail_first": True}])
    strict = d.submit("echo", [1], after=[dep["id"]])  # after_policy completed
    lenient = d.submit("echo", [1], after=[dep["id"]], after_policy="terminal")
    d.wait_status(dep["id"], "failed")
    assert d.batch(strict["id"])["status"] == "cancelled"
    d.wait_status(lenient["id"], "completed")
    code, body, _ = control(d, only_item(d, dep["id"])["id"], "retry")
    assert code == 200, body
    assert d.batch(dep["id"])["status"] == "running"
    later = d.submit("echo", [1], after=[dep["id"]])
    assert later["status"] == "waiting", later
    go.touch()
    d.wait_status(dep["id"], "completed")
    d.wait_status(later["id"], "completed")
    assert d.batch(strict["id"])["status"] == "cancelled"
    assert d.batch(lenient["id"])["counts"]["succeeded"] == 1
    doctor_clean(d)


def test_item_controls_racing_two_daemons_keep_every_invariant(daemons: DaemonFactory) -> None:
    """Cancels and retries of random items, from four threads through both
    daemons, while both claim and write outcomes of the batch: no 5xx, no
    deadlock, and the batch ends with its counts matching its items."""
    d1 = daemons("r1", handlers=HANDLERS, worker={"concurrency": 4})
    d2 = daemons("r2", handlers=HANDLERS, worker={"concurrency": 4})
    b = d1.submit("echo", [{"sleep": 0.05, "i": i} for i in range(120)])
    ids = [it["id"] for it in d1.items(b["id"])]
    codes: list[int] = []

    def hammer(seed: int) -> None:
        rnd = random.Random(seed)
        for _ in range(40):
            d = rnd.choice((d1, d2))
            codes.append(control(d, rnd.choice(ids), rnd.choice(("retry", "cancel")))[0])

    threads = [threading.Thread(target=hammer, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert set(codes) <= {200, 409}, sorted(set(codes))
    final = d1.wait_status(
        b["id"], ("completed", "completed_with_errors", "cancelled", "failed"), timeout=60
    )
    check_invariants(final)
    counted = {s: len(d1.items(b["id"], status=s)) for s in ("succeeded", "cancelled")}
    assert counted == {s: final["counts"][s] for s in counted}, (counted, final)
    for d in (d1, d2):
        assert "deadlock" not in d.log() and "api.internal_error" not in d.log()
    doctor_clean(d1)
