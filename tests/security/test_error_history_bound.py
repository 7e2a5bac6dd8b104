"""An item's error history is bounded: the last 20 entries and a count of the rest.
Before, every failed attempt appended an entry (about 6 KB with a traceback) and
`max_attempts` may be 1000, so one item's row grew without limit and was rewritten
on every attempt; this test found 45 entries."""

from __future__ import annotations

from typing import Any

from tests.chaos.common import query
from tests.daemon import DEFAULT_HANDLERS

KEPT = 20


def test_errors_keep_the_last_entries_and_count_the_rest(daemons: Any, db_url: str) -> None:
    fails = DEFAULT_HANDLERS["fails"] | {
        "max_attempts": 45,
        "retry_backoff": {"initial": "1ms", "max": "1ms", "jitter": 0.0},
    }
    d = daemons(handlers=DEFAULT_HANDLERS | {"fails": fails})
    batch = d.submit("fails", [{"n": 1}])
    d.wait_status(batch["id"], ("failed", "completed_with_errors"), 60)
    (item,) = d.items(batch["id"])
    code, detail, _ = d.api("GET", f"/v1/items/{item['id']}")
    assert code == 200, detail
    assert detail["attempts"] == 45
    assert len(detail["errors"]) == KEPT, len(detail["errors"])
    assert detail["errors_dropped"] == 45 - KEPT
    # the newest are the ones kept, in order, and `error` is the last of them
    assert [e["attempt"] for e in detail["errors"]] == list(range(45 - KEPT + 1, 46))
    assert detail["error"] == detail["errors"][-1]
    (row,) = query(db_url, "SELECT jsonb_array_length(errors) AS n FROM supervisor.items")
    assert row["n"] == KEPT
