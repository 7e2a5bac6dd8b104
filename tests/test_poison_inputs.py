"""A poison input costs one attempt, never the daemon.

Each test failed before the fix: a handler's ``SystemExit`` ended the daemon
process; an error text with a lone surrogate, or a result holding one, made the
outcome write fail with a non-transient error that killed the daemon; and
``RetryAfter(1e300)`` could not be stored as a ``run_after`` timestamp.
"""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg

from tests.daemon import DEFAULT_HANDLERS, wait_for

FAST_RETRY = {"initial": "10ms", "max": "20ms", "multiplier": 2.0, "jitter": 0.0}
HANDLERS = dict(DEFAULT_HANDLERS) | {
    "exits": {
        "type": "python",
        "target": "tests.handlers:exits",
        "max_attempts": 2,
        "retry_backoff": FAST_RETRY,
    },
    "exits_thread": {
        "type": "python",
        "target": "tests.handlers:exits_in_thread",
        "max_attempts": 1,
    },
    "unstorable": {
        "type": "python",
        "target": "tests.handlers:unstorable_error",
        "max_attempts": 2,
        "retry_backoff": FAST_RETRY,
    },
    "absurd": {"type": "python", "target": "tests.handlers:absurd_retry", "max_attempts": 2},
}


def full_item(d: Any, batch_id: str) -> dict[str, Any]:
    (item,) = d.items(batch_id)
    code, full, _ = d.api("GET", f"/v1/items/{item['id']}")
    assert code == 200, full
    return dict(full)


def assert_alive(d: Any) -> None:
    """The daemon still serves and still runs work."""
    assert d.proc is not None and d.proc.poll() is None, "the daemon exited"
    b = d.submit("echo", [{"n": 1}])
    d.wait_status(b["id"], "completed", timeout=20)


def test_handler_system_exit_costs_one_attempt_and_is_recorded(daemons: Any) -> None:
    d = daemons(handlers=HANDLERS)
    b = d.submit("exits", ["x"])
    d.wait_status(b["id"], "failed", timeout=20)
    it = full_item(d, b["id"])
    assert it["attempts"] == 2
    assert [e["type"] for e in it["errors"]] == ["SystemExit", "SystemExit"]
    assert "handler gave up on x" in it["errors"][0]["message"]
    assert_alive(d)


def test_system_exit_in_a_plain_def_thread_is_recorded(daemons: Any) -> None:
    d = daemons(handlers=HANDLERS)
    b = d.submit("exits_thread", ["x"])
    d.wait_status(b["id"], "failed", timeout=20)
    it = full_item(d, b["id"])
    assert [(e["type"], e["message"]) for e in it["errors"]] == [("SystemExit", "3")]
    assert_alive(d)


def test_unstorable_error_text_and_result_are_sanitised(daemons: Any) -> None:
    d = daemons(handlers=HANDLERS)
    b = d.submit("unstorable", ["x"])
    d.wait_status(b["id"], "completed", timeout=20)
    it = full_item(d, b["id"])
    (err,) = it["errors"]
    assert err["type"] == "OSError"
    assert err["message"] == "cannot open report-\\udcff.pdf"
    assert it["result"] == {"name": "report-\\udcff.pdf"}
    assert_alive(d)


def test_absurd_retry_delay_is_clamped_and_the_item_stays_readable(daemons: Any) -> None:
    d = daemons(handlers=HANDLERS)
    b = d.submit("absurd", ["x"])
    wait_for(lambda: full_item(d, b["id"])["errors"], timeout=20, what="the first error")
    it = full_item(d, b["id"])
    assert it["status"] == "queued" and it["errors"][0]["type"] == "RetryAfter"
    assert it["run_after"] is not None
    code, listing, _ = d.api("GET", f"/v1/batches/{b['id']}/items")
    assert code == 200, listing
    assert_alive(d)


def test_rejected_outcome_costs_its_item_one_attempt_and_no_other_outcome(
    daemons: Any, db_url: str
) -> None:
    """PostgreSQL rejects the outcome of one item (a CHECK constraint added here
    stands for any rejection the sanitising does not foresee): that item gets
    failed attempts saying so; the other outcomes of the same write land."""

    async def poison_constraint() -> None:
        conn = await asyncpg.connect(db_url)
        try:
            await conn.execute(
                "ALTER TABLE supervisor.items ADD CONSTRAINT test_poison"
                " CHECK (result IS NULL OR result::text NOT LIKE '%poison%')"
            )
        finally:
            await conn.close()

    asyncio.run(poison_constraint())
    d = daemons(handlers=HANDLERS)
    b = d.submit("echo", [{"n": i} for i in range(20)] + [{"poison": 1}])
    d.wait_status(b["id"], "completed_with_errors", timeout=30)
    items = d.items(b["id"])
    assert sorted(i["status"] for i in items) == ["failed"] + ["succeeded"] * 20
    assert all(i["attempts"] == 1 for i in items if i["status"] == "succeeded")
    (bad,) = [i for i in items if i["status"] == "failed"]
    code, full, _ = d.api("GET", f"/v1/items/{bad['id']}")
    assert code == 200
    assert {e["type"] for e in full["errors"]} == {"OutcomeRejected"}
    assert "not stored" in full["errors"][0]["message"]
    assert_alive(d)
