"""The CLI's client verbs against a real daemon: submit (file, stdin,
--key-field, --wait), status, watch, list and the control verbs; every API or
input error is one ``error:`` line and a non-zero exit, never a traceback."""

from __future__ import annotations

import json
import pathlib
import subprocess
import uuid

from tests.conftest import DaemonFactory
from tests.daemon import check_invariants
from tests.pgharness import free_port


def _ok(r: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    return r


def _one_error(r: subprocess.CompletedProcess[str], *fragments: str) -> str:
    """Exactly one line on stderr, starting with ``error:``; non-zero exit; no traceback."""
    assert r.returncode != 0, (r.stdout, r.stderr)
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error: "), r.stderr
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


def test_submit_wait_status_and_list(daemons: DaemonFactory, tmp_path: pathlib.Path) -> None:
    d = daemons("cli1")
    src = tmp_path / "items.jsonl"
    src.write_text('{"n": 1}\n\n{"n": 2, "sleep": 0.05}\n{"n": 3}\n')
    r = _ok(d.cli("submit", "echo", str(src), "--wait", "--priority", "3"))
    out = r.stdout.splitlines()
    bid = out[0]
    uuid.UUID(bid)
    assert out[-1] == f"batch {bid} completed: 3 succeeded", r.stdout
    b = d.batch(bid)
    assert b["status"] == "completed" and b["priority"] == 3, b
    check_invariants(b)
    assert sorted(it["payload"]["n"] for it in d.items(bid)) == [1, 2, 3]

    st = json.loads(_ok(d.cli("status", bid, "--json")).stdout)
    assert st["id"] == bid and st["status"] == "completed"
    assert st["counts"] == b["counts"] and st["version"] == b["version"]

    human = _ok(d.cli("status", bid)).stdout
    assert bid in human and "completed" in human and "succeeded=3" in human

    listed = _ok(d.cli("list")).stdout
    assert bid in listed and "completed" in listed
    assert json.loads(_ok(d.cli("list", "--json")).stdout)["batches"][0]["id"] == bid

    # A JSON array works as well as JSON Lines; --json prints the created batch.
    arr = tmp_path / "items.json"
    arr.write_text(json.dumps([{"n": 10}, {"n": 11}]))
    created = json.loads(_ok(d.cli("submit", "echo", str(arr), "--json")).stdout)
    assert created["counts"]["total"] == 2 and created["handler"] == "echo"


def test_key_field_and_stdin(daemons: DaemonFactory) -> None:
    d = daemons("cli2")
    lines = "\n".join(json.dumps({"name": f"k{i}", "v": i}) for i in range(3))
    r = _ok(d.cli("submit", "echo", "-", "--key-field", "name", "--wait", input=lines))
    bid = r.stdout.splitlines()[0]
    items = d.items(bid)
    assert {it["key"]: it["payload"]["v"] for it in items} == {"k0": 0, "k1": 1, "k2": 2}
    assert d.batch(bid)["status"] == "completed"

    # A JSON array on stdin, without keys.
    r = _ok(d.cli("submit", "echo", "-", input=json.dumps([1, 2])))
    assert [it["key"] for it in d.items(r.stdout.strip())] == [None, None]

    # A payload without the key field is refused before anything is sent.
    bad = '{"name": "a"}\n{"other": 1}\n'
    _one_error(d.cli("submit", "echo", "-", "--key-field", "name", input=bad), "'name'", "item 2")
    _, page, _ = d.api("GET", "/v1/batches")
    assert len(page["batches"]) == 2


def test_submit_with_an_exclusive_key_is_refused_while_one_holds_it(daemons: DaemonFactory) -> None:
    d = daemons("cli6")
    held = d.submit("sleeper", [{"sleep": 3600}], exclusive_key="portfolio:123")
    _one_error(
        d.cli("submit", "echo", "-", "--exclusive-key", "portfolio:123", input="1\n"),
        "409",
        held["id"],
    )
    r = _ok(d.cli("submit", "echo", "-", "--exclusive-key", "portfolio:124", "--json", input="1"))
    assert json.loads(r.stdout)["exclusive_key"] == "portfolio:124"
    _, page, _ = d.api("GET", "/v1/batches")
    assert len(page["batches"]) == 2


def test_watch_reports_failures_and_exits_non_zero(daemons: DaemonFactory) -> None:
    d = daemons("cli3")
    # Watched live: three attempts with a short backoff, then failed.
    live = d.submit("fails", [{"key": "alpha", "payload": 1}, {"key": "beta", "payload": 2}])
    r = d.cli("watch", live["id"])
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    assert f"batch {live['id']} ended failed: 0 succeeded, 2 failed, 0 cancelled" in r.stdout
    for it in d.items(live["id"]):
        line = next(ln for ln in r.stdout.splitlines() if f"failed item {it['id']} " in ln)
        assert f"key={it['key']}" in line and "after 3 attempt(s)" in line, line
        assert f"ValueError: bad input {it['payload']!r} on attempt 3" in line, line

    # A permanent failure: one attempt, its type and message.
    mixed = d.submit("permanent", [{"key": "only", "payload": "p"}])
    d.wait_status(mixed["id"], "failed")
    r = d.cli("watch", mixed["id"])
    assert r.returncode == 1
    assert "key=only" in r.stdout and "PermanentError: cannot process 'p'" in r.stdout, r.stdout

    # A cancelled batch is not clean; a completed one is.
    cancelled = d.submit("sleeper", [{"sleep": 3600}])
    _ok(d.cli("cancel", cancelled["id"]))
    d.wait_status(cancelled["id"], "cancelled")
    r = d.cli("watch", cancelled["id"])
    assert r.returncode == 1 and "ended cancelled" in r.stdout, r.stdout
    done = d.submit("echo", [1])
    d.wait_status(done["id"], "completed")
    assert _ok(d.cli("watch", done["id"])).stdout.strip().endswith("completed: 1 succeeded")


def test_errors_are_one_line(daemons: DaemonFactory, tmp_path: pathlib.Path) -> None:
    d = daemons("cli4")
    src = tmp_path / "items.jsonl"
    src.write_text('{"n": 1}\n')

    _one_error(d.cli("submit", "no_such_handler", str(src)), "422", "handler")
    missing = str(uuid.uuid4())
    _one_error(d.cli("status", missing), "404", missing)
    _one_error(d.cli("watch", missing), "404")
    _one_error(d.cli("cancel", "not-a-uuid"), "404")
    _one_error(d.cli("submit", "echo", str(tmp_path / "absent.jsonl")), "cannot read")
    (tmp_path / "broken.jsonl").write_text('{"n": 1}\n{"n": \n')
    _one_error(d.cli("submit", "echo", str(tmp_path / "broken.jsonl")), "line 2")
    (tmp_path / "empty.jsonl").write_text("\n")
    _one_error(d.cli("submit", "echo", str(tmp_path / "empty.jsonl")), "no items")

    # 409: nothing to retry in a completed batch.
    b = d.submit("echo", [1])
    d.wait_status(b["id"], "completed")
    _one_error(d.cli("retry", b["id"]), "409")

    # Nobody listening: a clear line, not aiohttp's traceback.
    nowhere = f"http://127.0.0.1:{free_port()}"
    _one_error(d.cli("status", b["id"], "--url", nowhere), "cannot reach")
    _one_error(d.cli("submit", "echo", str(src), "--url", nowhere), "cannot reach")
    # Nothing was submitted by the failed calls.
    _, page, _ = d.api("GET", "/v1/batches")
    assert [x["id"] for x in page["batches"]] == [b["id"]]


def test_control_verbs(daemons: DaemonFactory) -> None:
    d = daemons("cli5")
    b = d.submit("sleeper", [{"sleep": 3600}, {"sleep": 3600}], max_concurrency=1)
    bid = b["id"]
    d.wait_status(bid, "running")
    assert _ok(d.cli("pause", bid)).stdout.strip() == f"batch {bid}: paused"
    assert _ok(d.cli("resume", bid)).stdout.strip() == f"batch {bid}: running"
    _ok(d.cli("cancel", bid))
    assert d.wait_status(bid, "cancelled")["counts"]["cancelled"] == 2
    # Retrying cancelled items needs the flag: without it there is nothing to retry.
    _one_error(d.cli("retry", bid), "409")
    assert _ok(d.cli("retry", bid, "--include-cancelled")).stdout.strip() == f"batch {bid}: running"
    b = d.batch(bid)
    assert b["counts"]["cancelled"] == 0 and b["counts"]["queued"] + b["counts"]["running"] == 2
    _ok(d.cli("cancel", bid))
    check_invariants(d.wait_status(bid, "cancelled"))


def test_submit_not_before_schedules_the_batch(daemons: DaemonFactory) -> None:
    d = daemons("cli7")
    r = _ok(d.cli("submit", "echo", "-", "--not-before", "+1h", "--json", input="1\n"))
    b = json.loads(r.stdout)
    assert b["status"] == "scheduled" and b["not_before"] is not None, b
    status = _ok(d.cli("status", b["id"]))
    assert "scheduled" in status.stdout and b["not_before"] in status.stdout, status.stdout
    r = _ok(d.cli("submit", "echo", "-", "--not-before", "2000-01-01T00:00:00Z", input="1\n"))
    d.wait_status(r.stdout.strip(), "completed")
    _one_error(d.cli("submit", "echo", "-", "--not-before", "tomorrow", input="1\n"), "/not_before")
    bad = d.cli("submit", "echo", "-", "--not-before", "+soon", input="1\n")
    assert bad.returncode == 2 and "--not-before" in bad.stderr, bad.stderr
