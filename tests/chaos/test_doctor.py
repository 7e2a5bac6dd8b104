"""``batch-supervisor doctor`` against drift made on purpose with direct SQL.

The schema's CHECK constraints forbid counters that do not add up, so the drift
here is the kind that respects them: counters moved between states (sum kept),
and items changed behind their batch's back. ``doctor`` must exit 1 naming
exactly the drifted batches, ``doctor --repair`` must fix them (re-deriving each
status from the repaired counters), and ``doctor`` must then exit 0.
"""

from __future__ import annotations

from tests.chaos.common import assert_no_drift, query
from tests.conftest import DaemonFactory
from tests.daemon import check_invariants

ITEMS = 5


def test_doctor_finds_names_and_repairs_drift(daemons: DaemonFactory, db_url: str) -> None:
    d = daemons("doc", worker={"poll_interval": "100ms"})
    ids = [d.submit("echo", [{"n": n} for n in range(ITEMS)])["id"] for _ in range(4)]
    for bid in ids:
        assert d.wait_status(bid, "completed")["counts"]["succeeded"] == ITEMS
    assert_no_drift(d)
    swapped, item_failed, item_requeued, clean = ids

    # Counters moved between states, the sum (and so every CHECK) kept.
    query(
        db_url,
        "UPDATE supervisor.batches SET succeeded = succeeded - 1, failed = failed + 1"
        " WHERE id = $1::uuid",
        swapped,
    )
    # An item changed behind its batch's back: now failed, the batch still says 5 ok.
    query(
        db_url,
        "UPDATE supervisor.items SET status = 'failed'"
        " WHERE id = (SELECT min(id) FROM supervisor.items WHERE batch_id = $1::uuid)",
        item_failed,
    )
    # An item of a finished batch queued again: the batch is terminal with work left.
    query(
        db_url,
        "UPDATE supervisor.items SET status = 'queued', finished_at = NULL"
        " WHERE id = (SELECT min(id) FROM supervisor.items WHERE batch_id = $1::uuid)",
        item_requeued,
    )

    res = d.cli("doctor", "--config", str(d.config_path))
    assert res.returncode == 1, (res.returncode, res.stdout, res.stderr)
    for bid in (swapped, item_failed, item_requeued):
        assert f"drift: batch {bid}" in res.stdout, res.stdout
    assert clean not in res.stdout, res.stdout

    fix = d.cli("doctor", "--repair", "--config", str(d.config_path))
    assert fix.returncode == 0, (fix.returncode, fix.stdout, fix.stderr)
    for bid in (swapped, item_failed, item_requeued):
        assert f"repaired: batch {bid}" in fix.stdout, fix.stdout

    # The requeued item is runnable again: the daemon finishes its reopened batch.
    reopened = d.wait_status(item_requeued, "completed")
    assert reopened["counts"]["succeeded"] == ITEMS, reopened
    assert_no_drift(d)

    b = d.batch(swapped)
    check_invariants(b)
    assert (b["status"], b["counts"]["succeeded"], b["counts"]["failed"]) == (
        "completed",
        ITEMS,
        0,
    ), b
    b = d.batch(item_failed)
    check_invariants(b)
    # The status follows the repaired counters: one item failed, the rest succeeded.
    assert (b["status"], b["counts"]["succeeded"], b["counts"]["failed"]) == (
        "completed_with_errors",
        ITEMS - 1,
        1,
    ), b
    log = d.api("GET", f"/v1/batches/{item_failed}/log")[1]
    assert any(e["action"] == "repaired" for e in log["entries"]), log


def test_repair_derives_a_status_by_the_same_rule_as_every_change(
    daemons: DaemonFactory, db_url: str
) -> None:
    """A cancelled batch found with an item still running is `cancelling` (what
    _settle would say), not `running`: repair_batch used to carry its own copy of
    the rule, which turned every terminal batch with live items into `running`."""
    d = daemons("doc")
    bid = d.submit("sleeper", [{"sleep": 3600}])["id"]
    d.wait_status(bid, "running")
    d.kill()  # the item stays `running` under the dead daemon's lease
    # Drift the CHECKs allow: the batch says cancelled and drained; its item runs.
    query(
        db_url,
        "UPDATE supervisor.batches SET status = 'cancelled', stop_reason = 'cancel',"
        " running = 0, cancelled = 1, finished_at = now() WHERE id = $1::uuid",
        bid,
    )
    (row,) = query(db_url, "SELECT supervisor.repair_batch($1::uuid, 'test') AS s", bid)
    assert row["s"] == "cancelling", row
