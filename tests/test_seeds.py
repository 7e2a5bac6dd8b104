"""The five post-mortems (see README), replayed against real daemons.

000 batch stuck in "processing" after every file finished; summary missing.
001 background work failing silently; errors not recorded.
002 the UI never saw the last item finish (status read between item and batch).
003 an "already running" flag nobody cleared; a handler called with the wrong signature.
004 fire-and-forget work killed mid-run; items stuck "processing"; "Unknown error".
"""

from __future__ import annotations

import asyncio
import pathlib
import signal
import subprocess
import sys
import threading
from typing import Any

import asyncpg

from tests.daemon import (
    DEFAULT_HANDLERS,
    ROOT,
    Daemon,
    check_invariants,
    render_toml,
    sse_events,
    wait_for,
)


def sql_value(url: str, query: str) -> Any:
    async def go() -> Any:
        conn = await asyncpg.connect(url)
        try:
            return await conn.fetchval(query)
        finally:
            await conn.close()

    return asyncio.run(go())


def doctor_clean(d: Daemon) -> None:
    out = d.cli("doctor", "--config", str(d.config_path))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "no drift" in out.stdout


# -- seed 000 ------------------------------------------------------------------------


def test_seed000_last_item_finalizes_batch_with_summary(daemons: Any) -> None:
    d = daemons()
    b = d.submit("echo", [{"key": f"file-{i}", "payload": {"n": i}} for i in range(7)])
    done = d.wait_status(b["id"], "completed")
    assert done["counts"] == {
        "total": 7,
        "queued": 0,
        "running": 0,
        "succeeded": 7,
        "failed": 0,
        "cancelled": 0,
    }
    assert done["finished_at"] is not None and done["progress"] == 1.0
    status, summary, _ = d.api("GET", f"/v1/batches/{b['id']}/summary")
    assert status == 200
    assert summary["final"] is True and summary["status"] == "completed"
    assert summary["counts"]["succeeded"] == 7
    assert summary["item_seconds"]["max"] is not None
    items = d.items(b["id"])
    assert {i["key"] for i in items} == {f"file-{i}" for i in range(7)}
    assert all(
        i["status"] == "succeeded" and i["result"]["echo"] == {"n": int(i["key"][5:])}
        for i in items
    )
    doctor_clean(d)


def test_seed000_failing_callback_never_changes_batch_status(daemons: Any) -> None:
    d = daemons()
    b = d.submit("echo", [1, 2, 3, 4, 5, 6, 7], on_complete="cb_raises")
    assert b["callback"] == {"handler": "cb_raises", "state": "none", "attempts": 0, "error": None}
    wait_for(lambda: d.batch(b["id"])["callback"]["state"] == "failed", 20, what="callback failed")
    final = d.batch(b["id"])
    assert final["status"] == "completed"
    assert final["callback"]["attempts"] == 2  # cb_raises has max_attempts = 2
    assert final["callback"]["error"]["type"] == "RuntimeError"
    assert "summary service is down" in final["callback"]["error"]["message"]
    _status, log, _ = d.api("GET", f"/v1/batches/{b['id']}/log")
    actions = [e["action"] for e in log["entries"]]
    assert actions[0] == "created" and "finished" in actions and "callback_failed" in actions
    doctor_clean(d)


def test_seed000_callback_receives_batch_and_summary(daemons: Any) -> None:
    d = daemons()
    b = d.submit("echo", [1, 2], on_complete="cb_records")
    wait_for(
        lambda: d.batch(b["id"])["callback"]["state"] == "succeeded", 20, what="callback succeeded"
    )
    assert d.batch(b["id"])["status"] == "completed"


# -- seed 001 ------------------------------------------------------------------------


def test_seed001_every_failed_attempt_is_recorded_with_type_and_message(daemons: Any) -> None:
    d = daemons()
    b = d.submit("fails", [{"key": "x", "payload": "p"}])
    done = d.wait_status(b["id"], "failed")
    assert done["counts"]["failed"] == 1
    (item,) = d.items(b["id"])
    status, full, _ = d.api("GET", f"/v1/items/{item['id']}")
    assert status == 200
    assert full["attempts"] == 3
    assert [e["attempt"] for e in full["errors"]] == [1, 2, 3]
    for e in full["errors"]:
        assert e["type"] == "ValueError"
        assert e["message"].startswith("bad input 'p' on attempt ")
        assert "Unknown error" not in e["message"]
        assert "always_fails" in e["traceback"]
        assert e["worker"] == "d1" and e["at"]
    assert full["error"] == full["errors"][-1]
    doctor_clean(d)


def test_seed001_permanent_error_fails_at_once(daemons: Any) -> None:
    d = daemons()
    b = d.submit("permanent", ["a", "b"])
    done = d.wait_status(b["id"], "failed")
    assert done["counts"]["failed"] == 2
    for it in d.items(b["id"]):
        assert it["attempts"] == 1
        assert it["error"]["type"] == "PermanentError"
        assert it["error"]["message"] == f"cannot process {it['payload']!r}"


def test_seed001_mixed_outcomes_end_completed_with_errors(daemons: Any) -> None:
    handlers = dict(DEFAULT_HANDLERS) | {
        "mixed": {"type": "python", "target": "supervisor.examples:echo", "timeout": "5s"}
    }
    d = daemons(handlers=handlers)
    b = d.submit("mixed", [1, {"fail": "no"}, 3])
    done = d.wait_status(b["id"], "completed_with_errors")
    assert (done["counts"]["succeeded"], done["counts"]["failed"]) == (2, 1)
    _status, summary, _ = d.api("GET", f"/v1/batches/{b['id']}/summary")
    assert summary["errors_by_type"] == {"PermanentError": 1}


# -- seed 002 ------------------------------------------------------------------------


def test_seed002_no_read_ever_shows_items_done_without_terminal_batch(daemons: Any) -> None:
    d = daemons(worker={"concurrency": 4})
    for n in (1, 3, 10):
        b = d.submit("echo", [{"sleep": 0.02 * (i % 3)} for i in range(n)])
        seen = 0
        while True:
            cur = d.batch(b["id"])
            check_invariants(cur)
            c = cur["counts"]
            all_done = c["succeeded"] + c["failed"] + c["cancelled"] == c["total"]
            terminal = cur["status"] in (
                "completed",
                "completed_with_errors",
                "failed",
                "cancelled",
            )
            assert all_done == terminal, cur
            seen += 1
            if terminal:
                break
        assert cur["status"] == "completed" and seen >= 1
    doctor_clean(d)


def test_seed002_event_stream_delivers_terminal_snapshot_then_end(daemons: Any) -> None:
    d = daemons()
    b = d.submit("echo", [{"sleep": 0.3}, {"sleep": 0.3}, {"sleep": 0.6}])
    url = f"{d.url}/v1/batches/{b['id']}/events"
    events = [(event, data) for event, data, _ in sse_events(url, timeout=20)]
    # the server closed the stream after `end`
    kinds = [k for k, _ in events]
    assert kinds[0] == "snapshot" and kinds[-1] == "end"
    last_snapshot = [v for k, v in events if k == "snapshot"][-1]
    assert last_snapshot["status"] == "completed"
    assert last_snapshot["counts"]["succeeded"] == 3
    assert kinds.count("item") == 3


# -- seed 003 ------------------------------------------------------------------------


def test_seed003_batches_one_after_another_all_complete(daemons: Any) -> None:
    d = daemons()
    ids = [d.submit("echo", [{"run": r, "i": i} for i in range(3)])["id"] for r in range(3)]
    for bid in ids:
        assert d.wait_status(bid, "completed")["counts"]["succeeded"] == 3
    again = d.submit("echo", [1])  # nothing "already running" blocks a new batch
    d.wait_status(again["id"], "completed")
    doctor_clean(d)


def _broken_config(tmp_path: pathlib.Path, target: str) -> pathlib.Path:
    cfg = tmp_path / "broken.toml"
    cfg.write_text(
        render_toml(
            {
                "server": {"host": "127.0.0.1", "port": 1},
                "handlers": {"portfolio": {"type": "python", "target": target}},
            }
        )
    )
    return cfg


def test_seed003_wrong_signature_or_missing_module_stops_check_and_run(
    tmp_path: pathlib.Path,
) -> None:
    env = {
        "PYTHONPATH": str(ROOT),
        "BATCH_SUPERVISOR_DATABASE_URL": "postgresql://unused@127.0.0.1:1/x",
    }
    import os

    cases = {
        "tests.handlers:two_args": "cannot be called with one positional `item` argument",
        "tests.no_such_module:run": "cannot import module 'tests.no_such_module'",
        "tests.handlers:missing": "has no attribute 'missing'",
        "tests.handlers:not_callable": "is not callable",
    }
    for target, reason in cases.items():
        cfg = _broken_config(tmp_path, target)
        for verb in ("check", "run"):
            out = subprocess.run(
                [sys.executable, "-m", "supervisor", verb, "--config", str(cfg)],
                cwd=ROOT,
                env={**os.environ, **env},
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert out.returncode == 78, (verb, target, out.stdout, out.stderr)
            assert "'portfolio'" in out.stderr and reason in out.stderr, (verb, out.stderr)


# -- seed 004 ------------------------------------------------------------------------


def test_seed004_killed_daemon_restarted_with_same_name_completes_items(
    daemons: Any, db_url: str
) -> None:
    d = daemons("worker-a")
    b = d.submit("slow_first", [{"n": i} for i in range(6)])
    wait_for(lambda: d.batch(b["id"])["counts"]["running"] == 6, 10, what="6 items running")
    d.kill()  # SIGKILL: no drain, no deregistration; the items stay `running` in the database
    assert sql_value(db_url, "SELECT count(*) FROM supervisor.items WHERE status = 'running'") == 6
    d2 = daemons("worker-a")  # same [worker] name: reclaims at once, without dead_after
    done = d2.wait_status(b["id"], "completed", timeout=15)
    assert done["counts"]["succeeded"] == 6
    for it in d2.items(b["id"]):
        assert it["attempts"] == 2
        assert it["result"] == {"attempt": 2}
        _status, full, _ = d2.api("GET", f"/v1/items/{it['id']}")
        assert [e["type"] for e in full["errors"]] == ["WorkerLost"]
        assert full["errors"][0]["attempt"] == 1
    doctor_clean(d2)


def test_seed004_cancel_stops_queued_and_running_items(daemons: Any) -> None:
    d = daemons(worker={"concurrency": 2})
    b = d.submit("sleeper", [{"sleep": 3600} for _ in range(6)])
    wait_for(lambda: d.batch(b["id"])["counts"]["running"] >= 2, 10, what="2 running")
    status, body, _ = d.api("POST", f"/v1/batches/{b['id']}/cancel")
    assert status == 200 and body["status"] in ("cancelling", "cancelled")
    done = d.wait_status(b["id"], "cancelled", timeout=10)
    assert done["counts"]["cancelled"] == 6 and done["finished_at"]
    assert all(i["status"] == "cancelled" for i in d.items(b["id"]))
    status, again, _ = d.api("POST", f"/v1/batches/{b['id']}/cancel")
    assert status == 200 and again["status"] == "cancelled"  # idempotent
    status, log, _ = d.api("GET", f"/v1/batches/{b['id']}/log")
    actions = [e["action"] for e in log["entries"]]
    assert "cancel_requested" in actions and actions[-1] == "finished", actions
    done_b = d.submit("echo", [1])
    d.wait_status(done_b["id"], "completed")
    status, _, _ = d.api("POST", f"/v1/batches/{done_b['id']}/cancel")
    assert status == 409  # terminal and not cancelled
    doctor_clean(d)


def test_sigterm_exits_zero_and_leaves_nothing_running(daemons: Any) -> None:
    d = daemons()
    b = d.submit("echo", [{"sleep": 0.2} for _ in range(4)])
    d.wait_status(b["id"], "completed")
    d.signal(signal.SIGTERM)
    assert d.wait_exit(20) == 0
    assert "app.stopped" in d.log()


def test_concurrent_readers_never_see_torn_batches(daemons: Any) -> None:
    d = daemons(worker={"concurrency": 8})
    b = d.submit("echo", [{"sleep": 0.01} for _ in range(60)])
    errors: list[BaseException] = []

    def reader() -> None:
        try:
            while True:
                cur = d.batch(b["id"])
                check_invariants(cur)
                if cur["status"] == "completed":
                    return
        except BaseException as exc:  # collected and re-raised in the test thread
            errors.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors[0]
