"""Triage of one batch over real HTTP against a real daemon: searching its items
by key (exact or prefix) and by the type of their last error, its failures
grouped by error type (GET /v1/batches/{id}/errors), and the bulk retry of
chosen items or of every failed item of one type (POST
/v1/batches/{id}/items/retry), which goes through the item retry: same attempt
budget, same audit entries. Bad input is a problem naming the field; other
tenants see nothing."""

from __future__ import annotations

import pathlib
import urllib.parse
from typing import Any

from supervisor.api.schemas import BULK_RETRY_MAX
from tests.conftest import DaemonFactory
from tests.daemon import Daemon, check_invariants, wait_for
from tests.test_api import TOKENS, assert_problem, bearer, sha256hex
from tests.test_seeds import doctor_clean

HANDLERS = {
    "triage": {
        "type": "python",
        "target": "tests.handlers:triage",
        "timeout": "5s",
        "max_attempts": 1,
    },
    "sleeper": {"type": "python", "target": "tests.handlers:sleeper", "timeout": "1h"},
}


def ok(resp: tuple[int, Any, dict[str, str]]) -> Any:
    code, body, _ = resp
    assert 200 <= code < 300, resp
    return body


def listing(d: Daemon, bid: str, headers: dict[str, str] | None = None, **q: str) -> list[Any]:
    """Every item the listing gives for these filters, following next_cursor."""
    out: list[Any] = []
    cursor = None
    while True:
        params = dict(q) | ({"cursor": cursor} if cursor else {})
        path = f"/v1/batches/{bid}/items?{urllib.parse.urlencode(params)}"
        body = ok(d.api("GET", path, headers=headers))
        out += body["items"]
        cursor = body["next_cursor"]
        if not cursor:
            return out


def failing_batch(d: Daemon, gate: pathlib.Path) -> dict[str, Any]:
    """12 keyed items: 5 fail with ConnectionError, 3 with ValueError (until
    ``gate`` exists), 4 succeed; wait until it ends completed_with_errors."""
    items = []
    for i in range(12):
        p: dict[str, Any] = {"n": i, "gate": str(gate)}
        if i < 5:
            p |= {"raise": "ConnectionError", "message": f"upstream down for {i}"}
        elif i < 8:
            p |= {"raise": "ValueError", "message": f"bad row {i}"}
        items.append({"key": f"user:{i}" if i % 2 == 0 else f"org:{i}", "payload": p})
    b = d.submit("triage", items)
    return d.wait_status(b["id"], "completed_with_errors")


def by_key(items: list[Any]) -> list[str]:
    return sorted(str(it["key"]) for it in items)


def test_items_are_found_by_exact_key_key_prefix_and_error_type(
    daemons: DaemonFactory, tmp_path: pathlib.Path
) -> None:
    d = daemons("triage-search", handlers=HANDLERS)
    b = failing_batch(d, tmp_path / "gate")
    bid = b["id"]
    assert by_key(listing(d, bid, key="user:1")) == []  # 1 is odd: its key is org:1
    (one,) = listing(d, bid, key="user:10")
    assert one["key"] == "user:10" and one["status"] == "succeeded", one
    assert by_key(listing(d, bid, key_prefix="user:")) == [f"user:{i}" for i in (0, 10, 2, 4, 6, 8)]
    assert by_key(listing(d, bid, key_prefix="user:1")) == ["user:10"]
    assert by_key(listing(d, bid, key_prefix="org:1")) == ["org:1", "org:11"]
    assert listing(d, bid, key_prefix="nobody") == []

    conn = listing(d, bid, error_type="ConnectionError")
    assert by_key(conn) == ["org:1", "org:3", "user:0", "user:2", "user:4"]
    assert {it["error"]["type"] for it in conn} == {"ConnectionError"}
    assert len(listing(d, bid, error_type="ValueError", status="failed")) == 3
    assert listing(d, bid, error_type="ValueError", status="succeeded") == []
    assert listing(d, bid, error_type="NoSuchError") == []
    # Filters combine, and a page under a filter continues from its cursor.
    assert by_key(listing(d, bid, key_prefix="user:", error_type="ConnectionError")) == [
        "user:0",
        "user:2",
        "user:4",
    ]
    paged = listing(d, bid, error_type="ConnectionError", limit="2")
    assert [it["id"] for it in paged] == [it["id"] for it in conn]
    assert [it["id"] for it in listing(d, bid, key_prefix="user:", limit="1")] == sorted(
        (it["id"] for it in listing(d, bid, key_prefix="user:")), key=int
    )


def test_a_key_prefix_is_exact_for_any_text(daemons: DaemonFactory) -> None:
    """Prefixes compare code points, not a collation's idea of order: accents,
    case, and a prefix ending in the last code point there is."""
    d = daemons("triage-unicode", handlers=HANDLERS)
    keys = ["é", "éa", "e", "E", "ea", "f", "\U0010ffff", "\U0010ffffx", "a\ud7ffb", "a\ue000"]
    b = d.submit("triage", [{"key": k, "payload": {}} for k in keys])
    bid = d.wait_status(b["id"], "completed")["id"]
    assert by_key(listing(d, bid, key_prefix="é")) == ["é", "éa"]
    assert by_key(listing(d, bid, key_prefix="e")) == ["e", "ea"]
    assert by_key(listing(d, bid, key_prefix="\U0010ffff")) == ["\U0010ffff", "\U0010ffffx"]
    assert by_key(listing(d, bid, key_prefix="a\ud7ff")) == ["a\ud7ffb"]
    assert by_key(listing(d, bid, key="E")) == ["E"]


def test_failures_are_grouped_by_error_type_with_counts_and_a_sample(
    daemons: DaemonFactory, tmp_path: pathlib.Path
) -> None:
    d = daemons("triage-groups", handlers=HANDLERS)
    bid = failing_batch(d, tmp_path / "gate")["id"]
    body = ok(d.api("GET", f"/v1/batches/{bid}/errors"))
    assert body["batch_id"] == bid and body["failed"] == 8 and body["truncated"] is False
    groups = body["errors"]
    assert [(g["error_type"], g["count"]) for g in groups] == [
        ("ConnectionError", 5),
        ("ValueError", 3),
    ]
    conn, value = groups
    assert conn["sample_message"] == "upstream down for 4", conn  # the newest of the group
    assert conn["sample_key"] == "user:4" and conn["last_failed_at"], conn
    sample = ok(d.api("GET", f"/v1/items/{conn['sample_item_id']}"))
    assert sample["error"]["type"] == "ConnectionError" and sample["status"] == "failed"
    assert value["sample_message"] == "bad row 7"
    # A batch without failures has no groups; an unknown batch is a 404.
    clean = d.submit("triage", [{"payload": {}}])
    d.wait_status(clean["id"], "completed")
    assert ok(d.api("GET", f"/v1/batches/{clean['id']}/errors"))["errors"] == []
    assert_problem(d.api("GET", "/v1/batches/00000000-0000-0000-0000-000000000000/errors"), 404)


def test_bulk_retry_of_one_error_type_requeues_only_it_through_the_item_retry(
    daemons: DaemonFactory, tmp_path: pathlib.Path
) -> None:
    d = daemons("triage-retry-type", handlers=HANDLERS)
    gate = tmp_path / "gate"
    bid = failing_batch(d, gate)["id"]
    conn_ids = [it["id"] for it in listing(d, bid, error_type="ConnectionError")]
    value_ids = [it["id"] for it in listing(d, bid, error_type="ValueError")]
    gate.touch()  # from now on every attempt succeeds

    body = ok(d.api("POST", f"/v1/batches/{bid}/items/retry", {"error_type": "ConnectionError"}))
    assert body["retried"] == conn_ids and body["skipped"] == [] and body["more"] is False
    assert body["batch"]["status"] in ("running", "completed_with_errors"), body["batch"]
    b = d.wait_status(bid, "completed_with_errors")
    check_invariants(b)
    assert b["counts"] | {"total": 0} == {
        "total": 0,
        "queued": 0,
        "running": 0,
        "succeeded": 9,
        "failed": 3,
        "cancelled": 0,
    }, b
    for iid in conn_ids:
        it = ok(d.api("GET", f"/v1/items/{iid}"))
        # The item retry's fresh budget: attempt 2 of 1 + 1, the first error kept.
        assert it["status"] == "succeeded" and it["attempts"] == 2, it
        assert it["max_attempts"] == 2 and [e["type"] for e in it["errors"]] == ["ConnectionError"]
    for iid in value_ids:
        assert ok(d.api("GET", f"/v1/items/{iid}"))["status"] == "failed"
    # Each retried item has the audit entry an item retry writes, nothing else moved.
    log = ok(d.api("GET", f"/v1/batches/{bid}/log"))["entries"]
    retried = [e for e in log if e["action"] == "item_retried"]
    assert sorted(e["detail"]["item"] for e in retried) == sorted(conn_ids), retried
    assert {e["detail"]["status"] for e in retried} == {"failed"}
    assert [g["error_type"] for g in ok(d.api("GET", f"/v1/batches/{bid}/errors"))["errors"]] == [
        "ValueError"
    ]
    # Nothing of that type is left to retry: 409, and the batch is as it was.
    resp = d.api("POST", f"/v1/batches/{bid}/items/retry", {"error_type": "ConnectionError"})
    assert_problem(resp, 409)
    assert d.batch(bid)["version"] == b["version"]
    doctor_clean(d)


def test_bulk_retry_of_chosen_ids_skips_what_the_item_retry_refuses(
    daemons: DaemonFactory, tmp_path: pathlib.Path
) -> None:
    d = daemons("triage-retry-ids", handlers=HANDLERS)
    gate = tmp_path / "gate"
    bid = failing_batch(d, gate)["id"]
    failed = [it["id"] for it in listing(d, bid, status="failed")]
    other = d.submit("sleeper", [{"sleep": 3600}])
    (running,) = d.items(other["id"])
    gate.touch()

    chosen = [failed[0], failed[5], "999999999", running["id"]]
    body = ok(d.api("POST", f"/v1/batches/{bid}/items/retry", {"ids": chosen}))
    assert body["retried"] == [failed[0], failed[5]], body
    # An item of another batch is not in this one, whatever its state.
    assert {s["id"]: s["reason"] for s in body["skipped"]} == {
        "999999999": "no such item in this batch",
        running["id"]: "no such item in this batch",
    }
    b = d.wait_status(bid, "completed_with_errors")
    assert b["counts"]["failed"] == 6 and b["counts"]["succeeded"] == 6, b
    # Ids and a type together: the named items of that type only.
    conn_left = [it["id"] for it in listing(d, bid, error_type="ConnectionError", status="failed")]
    value_left = [it["id"] for it in listing(d, bid, error_type="ValueError", status="failed")]
    both = {"ids": [conn_left[0], value_left[0]], "error_type": "ValueError"}
    assert ok(d.api("POST", f"/v1/batches/{bid}/items/retry", both))["retried"] == [value_left[0]]
    b = d.wait_status(bid, "completed_with_errors")
    # A queued or running item is refused by the item retry: skipped, with why.
    live = d.submit("sleeper", [{"sleep": 3600}, {"sleep": 3600}])
    lid = [it["id"] for it in d.items(live["id"])]
    resp = d.api("POST", f"/v1/batches/{live['id']}/items/retry", {"ids": lid})
    problem = assert_problem(resp, 409)
    assert [s["id"] for s in problem["skipped"]] == lid, problem
    assert all("nothing to retry" in s["reason"] for s in problem["skipped"]), problem
    ok(d.api("POST", f"/v1/batches/{live['id']}/cancel"))
    ok(d.api("POST", f"/v1/batches/{other['id']}/cancel"))
    doctor_clean(d)


def test_bad_search_and_retry_input_is_a_problem_naming_the_field(
    daemons: DaemonFactory, tmp_path: pathlib.Path
) -> None:
    d = daemons("triage-bad", handlers=HANDLERS)
    bid = failing_batch(d, tmp_path / "gate")["id"]
    items = f"/v1/batches/{bid}/items?"
    for query, field in (
        ({"key": "a\x00b"}, "key"),
        ({"key_prefix": "x" * 1001}, "key_prefix"),
        ({"key": "a", "key_prefix": "a"}, "key_prefix"),
        ({"error_type": "E\x00"}, "error_type"),
        ({"error_type": "E" * 1001}, "error_type"),
    ):
        assert_problem(d.api("GET", items + urllib.parse.urlencode(query)), 400, field)
    retry = f"/v1/batches/{bid}/items/retry"
    for body, field in (
        ({}, ""),
        ([1, 2], ""),
        ({"ids": "1"}, "/ids"),
        ({"ids": []}, "/ids"),
        ({"ids": ["1", "x", -3, True]}, "/ids/1"),
        ({"ids": ["1", "x", -3, True]}, "/ids/2"),
        ({"ids": ["1", "x", -3, True]}, "/ids/3"),
        ({"ids": [str(i) for i in range(1001)]}, "/ids"),
        ({"error_type": 5}, "/error_type"),
        ({"error_type": ""}, "/error_type"),
        ({"error_type": "a\x00"}, "/error_type"),
        ({"error_type": "E", "include_cancelled": True}, "/include_cancelled"),
    ):
        assert_problem(d.api("POST", retry, body), 422, field)
    assert_problem(d.api("POST", retry, b"{not json"), 400)
    assert_problem(d.api("POST", "/v1/batches/not-a-batch/items/retry", {"ids": ["1"]}), 404)
    assert d.batch(bid)["counts"]["failed"] == 8  # nothing moved


def test_other_tenants_see_and_retry_nothing(
    daemons: DaemonFactory, tmp_path: pathlib.Path
) -> None:
    tokens = [
        {"name": n, "tenant": t, "sha256": sha256hex(TOKENS[w]), "scopes": s}
        for n, t, w, s in (
            ("a", "A", "A", ["read", "write"]),
            ("b", "B", "B", ["read", "write"]),
            ("r", "A", "R", ["read"]),
        )
    ]
    d = daemons("triage-tenants", handlers=HANDLERS, extra={"auth": {"tokens": tokens}})
    a, b_, r = bearer("A"), bearer("B"), bearer("R")
    spec = {"handler": "triage", "items": [{"key": "k", "payload": {"raise": "ValueError"}}]}
    bid = ok(d.api("POST", "/v1/batches", spec, a))["id"]
    (item,) = ok(d.api("GET", f"/v1/batches/{bid}/items", headers=a))["items"]
    mine = ok(d.api("POST", "/v1/batches", spec, b_))["id"]

    def status() -> str:
        return str(ok(d.api("GET", f"/v1/items/{item['id']}", headers=a))["status"])

    wait_for(lambda: status() == "failed", timeout=20, what="A's item failed")
    for path in (f"/v1/batches/{bid}/errors", f"/v1/batches/{bid}/items?key=k"):
        assert_problem(d.api("GET", path, headers=b_), 404)
    by_type = {"error_type": "ValueError"}
    assert_problem(d.api("POST", f"/v1/batches/{bid}/items/retry", by_type, b_), 404)
    # B names A's item on its own batch: not in that batch, and left alone.
    resp = d.api("POST", f"/v1/batches/{mine}/items/retry", {"ids": [item["id"]]}, b_)
    assert assert_problem(resp, 409)["skipped"][0]["reason"] == "no such item in this batch"
    # Reading is not enough to retry.
    assert_problem(d.api("POST", f"/v1/batches/{bid}/items/retry", by_type, r), 403)
    assert status() == "failed"
    assert ok(d.api("GET", f"/v1/batches/{bid}/errors", headers=r))["errors"][0]["count"] == 1
    assert ok(d.api("POST", f"/v1/batches/{bid}/items/retry", by_type, a))["retried"] == [
        item["id"]
    ]
    log = ok(d.api("GET", f"/v1/batches/{bid}/log", headers=a))["entries"]
    assert [e["actor"] for e in log if e["action"] == "item_retried"] == ["a"]


def test_a_bulk_retry_of_a_type_stops_at_its_limit_and_says_more_are_left(
    daemons: DaemonFactory, tmp_path: pathlib.Path
) -> None:
    d = daemons("triage-more", handlers=HANDLERS)
    gate = tmp_path / "gate"
    n = BULK_RETRY_MAX + 1
    b = d.submit("triage", [{"raise": "ValueError", "gate": str(gate)} for _ in range(n)])
    d.wait_status(b["id"], "failed", timeout=60)
    gate.touch()  # retried items succeed: only the one left is failed for the second call
    retry = f"/v1/batches/{b['id']}/items/retry"
    first = ok(d.api("POST", retry, {"error_type": "ValueError"}))
    assert len(first["retried"]) == BULK_RETRY_MAX and first["more"] is True
    second = ok(d.api("POST", retry, {"error_type": "ValueError"}))
    assert len(second["retried"]) == 1 and second["more"] is False, second
    assert not set(first["retried"]) & set(second["retried"])
    assert d.wait_status(b["id"], "completed", timeout=60)["counts"]["succeeded"] == n
    # Exactly the limit: all of them retried, and nothing is left to say "more" about.
    exact = d.submit("triage", [{"raise": "ValueError"} for _ in range(BULK_RETRY_MAX)])
    d.wait_status(exact["id"], "failed", timeout=60)
    body = ok(d.api("POST", f"/v1/batches/{exact['id']}/items/retry", {"error_type": "ValueError"}))
    assert len(body["retried"]) == BULK_RETRY_MAX and body["more"] is False, body["more"]
