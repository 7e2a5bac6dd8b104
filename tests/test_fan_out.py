"""Fan-out: a running attempt adds items to its own batch (item.add_items),
written with its outcome in one transaction, deduplicated by key and capped by
the batch's max_items, through real daemons."""

from __future__ import annotations

import collections
import json
import pathlib
from typing import Any

from tests.daemon import DEFAULT_HANDLERS, check_invariants, wait_for
from tests.test_seeds import doctor_clean

FAST_RETRY = {"initial": "10ms", "max": "20ms", "multiplier": 2.0, "jitter": 0.0}
HANDLERS = dict(DEFAULT_HANDLERS) | {
    "crawl": {
        "type": "python",
        "target": "tests.handlers:crawls",
        "timeout": "10s",
        "retry_backoff": FAST_RETRY,
    },
    "keyless": {
        "type": "python",
        "target": "tests.handlers:adds_keyless",
        "timeout": "30s",
        "retry_backoff": FAST_RETRY,
    },
    "bad": {"type": "python", "target": "tests.handlers:adds_bad", "max_attempts": 1},
}
# 1 -> 2, 3; 2 -> 3, 4; 3 -> 1; 4 -> 5; 5 -> (none): five pages, eight links.
SITE = {"1": ["2", "3"], "2": ["3", "4"], "3": ["1"], "4": ["5"], "5": []}


def runs(path: pathlib.Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_a_crawler_adds_each_page_once_and_the_batch_ends_when_all_are_done(
    daemons: Any,
) -> None:
    d = daemons(handlers=HANDLERS)
    b = d.submit("crawl", [{"key": "1", "payload": {"site": SITE, "page": "1"}}])
    done = d.wait_status(b["id"], "completed")
    check_invariants(done)
    items = d.items(b["id"])
    assert sorted(it["key"] for it in items) == ["1", "2", "3", "4", "5"]
    assert done["counts"]["total"] == 5 and done["counts"]["succeeded"] == 5
    assert {it["key"]: it["result"]["links"] for it in items} == {
        k: len(v) for k, v in SITE.items()
    }
    code, log, _ = d.api("GET", f"/v1/batches/{b['id']}/log")
    assert code == 200, log
    added = [e["detail"]["items"] for e in log["entries"] if e["action"] == "items_added"]
    assert sum(added) == 4  # pages 2..5; the other four links named a page already there
    doctor_clean(d)


def test_additions_of_a_failed_attempt_are_not_written_and_its_retry_adds_them(
    daemons: Any,
) -> None:
    d = daemons(handlers=HANDLERS)
    b = d.submit("keyless", [{"root": True, "n": 3, "fail_first": True}])
    done = d.wait_status(b["id"], "completed")
    # attempt 1 added three and failed: none of those; attempt 2's three only
    assert done["counts"]["total"] == 4 and done["counts"]["succeeded"] == 4
    (root,) = [it for it in d.items(b["id"]) if it["payload"].get("root")]
    assert root["attempts"] == 2
    check_invariants(done)


def test_max_items_refuses_an_attempt_that_would_pass_it(daemons: Any) -> None:
    d = daemons(handlers=HANDLERS)
    b = d.submit("crawl", [{"key": "1", "payload": {"site": SITE, "page": "1"}}], max_items=3)
    done = d.wait_status(b["id"], ("completed_with_errors", "failed"))
    check_invariants(done)
    assert done["max_items"] == 3 and done["counts"]["total"] <= 3
    failed = [it for it in d.items(b["id"]) if it["status"] == "failed"]
    assert failed, d.items(b["id"])
    code, full, _ = d.api("GET", f"/v1/items/{failed[0]['id']}")
    assert code == 200, full
    err = full["errors"][-1]
    assert err["type"] == "MaxItemsExceeded" and "max_items (3)" in err["message"], err
    assert full["attempts"] == 1  # permanent: another attempt would add the same


def test_max_items_is_validated_naming_the_field(daemons: Any) -> None:
    d = daemons(handlers=HANDLERS)
    for value, message in [
        (1, "must be at least the number of items submitted (2)"),
        (0, "must be null or an integer from 1 to"),
        ("10", "must be null or an integer from 1 to"),
    ]:
        code, body, _ = d.api(
            "POST", "/v1/batches", {"handler": "echo", "items": [1, 2], "max_items": value}
        )
        assert code == 422, body
        (e,) = body["errors"]
        assert e["path"] == "/max_items" and e["message"].startswith(message), e


def test_a_bad_entry_fails_the_attempt_naming_it(daemons: Any) -> None:
    d = daemons(handlers=HANDLERS)
    b = d.submit("bad", [1])
    d.wait_status(b["id"], "failed")
    (it,) = d.items(b["id"])
    code, full, _ = d.api("GET", f"/v1/items/{it['id']}")
    assert code == 200, full
    err = full["errors"][-1]
    assert err["type"] == "ValueError"
    assert err["message"].startswith("add_items: item /0/key: must be null or a non-empty string")
    assert d.batch(b["id"])["counts"]["total"] == 1


def test_sigkill_before_the_outcome_adds_nothing_and_the_rerun_adds_once(
    daemons: Any, tmp_path: pathlib.Path
) -> None:
    runlog = tmp_path / "runs.jsonl"
    gate = tmp_path / "go"
    env = {"BSV_TEST_RUNLOG": str(runlog)}
    a = daemons("a", handlers=HANDLERS, env=env)
    b = a.submit("keyless", [{"root": True, "n": 5, "hold": str(gate)}])
    wait_for(lambda: len(runs(runlog)) == 1, 20, what="the root attempt to start on a")
    a.kill()  # SIGKILL while the root holds its five unwritten additions
    gate.touch()
    c = daemons("c", handlers=HANDLERS, env=env)  # reclaims a's lease once a is dead
    done = c.wait_status(b["id"], "completed", timeout=40)
    check_invariants(done)
    assert done["counts"]["total"] == 6  # the root and five children, not ten
    starts = collections.Counter(r["attempt"] for r in runs(runlog) if r["event"] == "start")
    assert starts[1] >= 1 and starts[2] >= 1  # the root ran twice: once per daemon
    doctor_clean(c)


EXEC_FANOUT = """
import json, sys
payload = json.loads(sys.stdin.read())
if payload.get("root"):
    print('::bsv-add-items [{"key": "x", "payload": {}}, {"key": "y", "payload": {}}]')
    print('::bsv-add-items [{"key": "x", "payload": {}}]')  # already added: skipped
print(json.dumps({"root": bool(payload.get("root"))}))
"""


def test_an_exec_command_adds_items_with_control_lines(
    daemons: Any, tmp_path: pathlib.Path
) -> None:
    from tests.test_handlers_exec import exec_handler, script

    d = daemons(handlers={"run": exec_handler(script(tmp_path, "fanout", EXEC_FANOUT))})
    b = d.submit("run", [{"root": True}])
    done = d.wait_status(b["id"], "completed")
    assert done["counts"]["total"] == 3
    assert sorted(str(it["key"]) for it in d.items(b["id"])) == ["None", "x", "y"]
    assert all(it["result"] == {"root": bool(it["payload"])} for it in d.items(b["id"]))


def test_items_added_under_a_key_limit_get_their_limit_key(daemons: Any) -> None:
    # The keyed claim takes only items with a limit key: one added without it
    # would never run.
    keyed = HANDLERS["crawl"] | {"key_limit": {"key": "/page", "concurrency": 1}}
    d = daemons(handlers=HANDLERS | {"keyed_crawl": keyed})
    b = d.submit("keyed_crawl", [{"key": "1", "payload": {"site": SITE, "page": "1"}}])
    done = d.wait_status(b["id"], "completed")
    assert done["counts"]["total"] == 5
    assert {it["key"]: it["limit_key"] for it in d.items(b["id"])} == {p: p for p in SITE}
