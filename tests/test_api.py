"""HTTP API behaviour over real HTTP against real daemons: validation
and limits (nothing written on rejection), idempotency (also under concurrent
submissions), paging and filters, ETag / If-None-Match, bearer auth and tenancy."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import threading
from collections.abc import Mapping
from typing import Any

import asyncpg
import pytest

from tests.conftest import DaemonFactory
from tests.daemon import Daemon, wait_for

TERMINAL = ("completed", "completed_with_errors", "failed", "cancelled")


def assert_problem(
    resp: tuple[int, Any, dict[str, str]], status: int, path: str | None = None
) -> dict[str, Any]:
    """An RFC 9457 problem with this status; with ``path``, a validation error naming it."""
    code, body, headers = resp
    assert code == status, resp
    assert headers["Content-Type"].startswith("application/problem+json"), headers
    assert isinstance(body, dict) and body["status"] == status, body
    assert {"type", "title", "detail"} <= set(body), body
    assert all(isinstance(body[k], str) and body[k] for k in ("type", "title", "detail")), body
    if path is not None:
        assert path in [e["path"] for e in body["errors"]], body
    return body


async def _db_rows(db_url: str, sql: str, *args: Any) -> list[Any]:
    conn = await asyncpg.connect(db_url)
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


def db_rows(db_url: str, sql: str, *args: Any) -> list[Any]:
    return asyncio.run(_db_rows(db_url, sql, *args))


def partial_batches(db_url: str) -> list[Any]:
    """Batches whose item count differs from their total (a non-atomic submission)."""
    return db_rows(
        db_url,
        "SELECT b.id FROM supervisor.batches b LEFT JOIN supervisor.items i ON i.batch_id = b.id"
        " GROUP BY b.id, b.total HAVING count(i.id) <> b.total",
    )


def batch_count(db_url: str) -> int:
    return int(db_rows(db_url, "SELECT count(*) AS n FROM supervisor.batches")[0]["n"])


# -- validation and limits ------------------------------------------------------------


def test_invalid_submissions_are_rejected_and_write_nothing(
    daemons: DaemonFactory, db_url: str
) -> None:
    d = daemons(extra={"server": {"max_body_bytes": 2000, "max_items_per_batch": 5}})

    def post(body: Any) -> tuple[int, Any, dict[str, str]]:
        return d.api("POST", "/v1/batches", body)

    assert_problem(post(b'{"handler": "echo", "items": [1,'), 400)
    assert_problem(post(b"not json at all"), 400)
    assert_problem(post(b'{"handler": "echo", "items": [NaN]}'), 400)
    assert_problem(post(b'{"handler": "echo", "items": [1e400]}'), 400)
    assert_problem(post(b'{"handler": "echo", "items": [' + b"[" * 600 + b"]" * 600 + b"]}"), 400)
    assert_problem(post(b"[" * 1900), 400)
    assert_problem(post({"handler": "nope", "items": [1]}), 422, "/handler")
    assert_problem(post({"items": [1]}), 422, "/handler")
    assert_problem(post({"handler": "echo", "items": []}), 422, "/items")
    assert_problem(post({"handler": "echo"}), 422, "/items")
    assert_problem(post({"handler": "echo", "items": 5}), 422, "/items")
    body = assert_problem(
        post(
            {
                "handler": "echo",
                "items": [
                    {"key": "a", "payload": 1},
                    {"key": "b", "payload": 2},
                    {"key": "a", "payload": 3},
                ],
            }
        ),
        422,
        "/items/2/key",
    )
    assert "/items/0/key" in body["errors"][0]["message"]
    assert_problem(
        post({"handler": "echo", "items": [{"key": "", "payload": 1}]}), 422, "/items/0/key"
    )
    assert_problem(
        post({"handler": "echo", "items": [{"key": 7, "payload": 1}]}), 422, "/items/0/key"
    )
    # Strings PostgreSQL cannot store: 422 naming the path, never a 500.
    assert_problem(
        post({"handler": "echo", "items": [1, {"payload": {"s": ["ok", "x\u0000y"]}}]}),
        422,
        "/items/1/payload/s/1",
    )
    assert_problem(post({"handler": "echo", "items": ["a\u0000"]}), 422, "/items/0")
    assert_problem(post({"handler": "echo", "items": [{"k\u0000": 1}]}), 422, "/items/0/k\u0000")
    assert_problem(
        post({"handler": "echo", "items": [{"key": "a\u0000", "payload": 1}]}), 422, "/items/0/key"
    )
    assert_problem(
        post(b'{"handler": "echo", "items": [{"key": "\\ud800", "payload": 1}]}'),
        422,
        "/items/0/key",
    )
    assert_problem(post(b'{"handler": "echo", "items": ["\\udc00"]}'), 422, "/items/0")
    assert_problem(
        post({"handler": "echo", "items": [1], "metadata": {"m": "\u0000"}}), 422, "/metadata/m"
    )
    assert_problem(
        post({"handler": "echo", "items": [1], "idempotency_key": "\u0000"}),
        422,
        "/idempotency_key",
    )
    # Other fields, every bad one named at once.
    body = assert_problem(
        post(
            {
                "handler": "echo",
                "items": [1],
                "priority": 5000,
                "max_concurrency": 0,
                "max_attempts": "3",
                "max_failures": "150%",
                "metadata": [],
                "bogus": 1,
                "on_complete": "nope",
            }
        ),
        422,
    )
    named = {e["path"] for e in body["errors"]}
    assert named == {
        "/priority",
        "/max_concurrency",
        "/max_attempts",
        "/max_failures",
        "/metadata",
        "/bogus",
        "/on_complete",
    }, body
    assert_problem(post([1, 2]), 422, "")
    # Limits: 413, never a crash.
    assert_problem(post({"handler": "echo", "items": ["x" * 3000]}), 413)
    assert_problem(post({"handler": "echo", "items": list(range(6))}), 413)
    assert_problem(d.api("POST", "/v1/batches", None), 400)  # empty body

    assert batch_count(db_url) == 0
    # The limits are limits, not bans: at the limit it is accepted, atomically.
    status, batch, _ = post({"handler": "echo", "items": list(range(5))})
    assert status == 201, batch
    assert batch["counts"]["total"] == 5
    assert batch_count(db_url) == 1
    assert partial_batches(db_url) == []
    assert "api.internal_error" not in d.log()


def test_bad_query_parameters_and_unknown_ids(daemons: DaemonFactory) -> None:
    d = daemons()
    for q in ("limit=0", "limit=501", "limit=x", "limit="):
        assert_problem(d.api("GET", f"/v1/batches?{q}"), 400, "limit")
    assert d.api("GET", "/v1/batches?limit=500")[0] == 200
    bad_cursors = [
        "zzz",
        base64.urlsafe_b64encode(b'{"t": 1, "id": 2}').decode(),
        base64.urlsafe_b64encode(b"[" * 3000).decode(),
    ]
    for c in bad_cursors:
        assert_problem(d.api("GET", f"/v1/batches?cursor={c}"), 400, "cursor")
    assert_problem(d.api("GET", "/v1/batches?status=%00"), 400, "status")
    b = d.submit("echo", [1])
    assert_problem(d.api("GET", f"/v1/batches/{b['id']}/items?cursor=zzz"), 400, "cursor")
    huge = base64.urlsafe_b64encode(json.dumps({"after": 2**70}).encode()).decode()
    assert_problem(d.api("GET", f"/v1/batches/{b['id']}/items?cursor={huge}"), 400, "cursor")
    for path in (
        "/v1/batches/not-a-uuid",
        "/v1/batches/00000000-0000-0000-0000-000000000000",
        "/v1/items/abc",
        "/v1/items/%C2%B2",
        "/v1/items/99999999999999999999",
        "/v1/batches/not-a-uuid/items",
        "/v1/batches/not-a-uuid/summary",
    ):
        assert_problem(d.api("GET", path), 404)
    assert_problem(d.api("GET", "/v1/nothing-here"), 404)
    resp = d.api("PUT", "/v1/batches", {})
    assert_problem(resp, 405)
    assert {"GET", "POST"} <= {m.strip() for m in resp[2]["Allow"].split(",")}, resp
    assert "api.internal_error" not in d.log()


# -- idempotency -----------------------------------------------------------------------


def test_idempotency_key_in_body_and_header(daemons: DaemonFactory, db_url: str) -> None:
    d = daemons()
    body = {"handler": "echo", "items": [1, 2], "idempotency_key": "k1"}
    s1, b1, h1 = d.api("POST", "/v1/batches", body)
    s2, b2, h2 = d.api("POST", "/v1/batches", body)
    assert (s1, s2) == (201, 200), (b1, b2)
    assert b1["id"] == b2["id"] and b1["idempotency_key"] == "k1"
    assert h1["Location"] == h2["Location"] == f"/v1/batches/{b1['id']}"
    assert_problem(d.api("POST", "/v1/batches", {**body, "items": [1, 2, 3]}), 409)
    assert_problem(d.api("POST", "/v1/batches", {**body, "priority": 5}), 409)

    hdr = {"Idempotency-Key": "k2"}
    plain = {"handler": "echo", "items": [{"key": "a", "payload": 1}]}
    s1, b1, _ = d.api("POST", "/v1/batches", plain, hdr)
    s2, b2, _ = d.api("POST", "/v1/batches", plain, hdr)
    s3, b3, _ = d.api("POST", "/v1/batches", {**plain, "idempotency_key": "k2"})
    assert (s1, s2, s3) == (201, 200, 200), (b1, b2, b3)
    assert b1["id"] == b2["id"] == b3["id"] and b1["idempotency_key"] == "k2"
    assert_problem(d.api("POST", "/v1/batches", {**plain, "items": [2]}, hdr), 409)
    assert_problem(
        d.api("POST", "/v1/batches", {**plain, "idempotency_key": "other"}, hdr),
        422,
        "/idempotency_key",
    )
    # Without a key, the same body twice makes two batches.
    assert d.api("POST", "/v1/batches", plain)[0] == 201
    assert d.api("POST", "/v1/batches", plain)[0] == 201
    assert batch_count(db_url) == 4
    assert partial_batches(db_url) == []


def test_concurrent_identical_submissions_make_one_batch(
    daemons: DaemonFactory, db_url: str
) -> None:
    d = daemons()
    body = {"handler": "echo", "items": list(range(50)), "idempotency_key": "race"}
    results: list[tuple[int, Any, dict[str, str]]] = []
    lock = threading.Lock()
    go = threading.Barrier(20)

    def submit() -> None:
        go.wait()
        r = d.api("POST", "/v1/batches", body)
        with lock:
            results.append(r)

    threads = [threading.Thread(target=submit) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 20
    statuses = sorted(r[0] for r in results)
    assert statuses == [200] * 19 + [201], [r[:2] for r in results]
    assert len({r[1]["id"] for r in results}) == 1
    assert batch_count(db_url) == 1
    assert db_rows(db_url, "SELECT count(*) AS n FROM supervisor.items")[0]["n"] == 50
    assert partial_batches(db_url) == []


# -- listing, paging, filters, ETag ------------------------------------------------------


def test_paging_and_filters(daemons: DaemonFactory) -> None:
    d = daemons()
    created = [d.submit("echo", [i])["id"] for i in range(5)]
    created += [d.submit("permanent", [i])["id"] for i in range(2)]
    for bid in created:
        d.wait_status(bid, TERMINAL)

    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        q = "?limit=3" + (f"&cursor={cursor}" if cursor else "")
        code, page, _ = d.api("GET", f"/v1/batches{q}")
        assert code == 200, page
        assert len(page["batches"]) <= 3
        seen += [b["id"] for b in page["batches"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert pages == 3
    assert seen == list(reversed(created))  # newest first, no duplicates, no gaps

    def listed(q: str) -> list[str]:
        code, page, _ = d.api("GET", f"/v1/batches?{q}")
        assert code == 200, page
        return [b["id"] for b in page["batches"]]

    assert listed("status=failed") == list(reversed(created[5:]))
    assert listed("status=completed") == list(reversed(created[:5]))
    assert listed("handler=permanent") == list(reversed(created[5:]))
    assert listed("handler=echo&status=completed&limit=2") == list(reversed(created[3:5]))
    assert listed("handler=permanent&status=completed") == []
    assert listed("status=running") == []

    big = d.submit("echo", [{"key": f"k{i}", "payload": i} for i in range(7)])
    d.wait_status(big["id"], TERMINAL)
    keys: list[str] = []
    cursor = None
    while True:
        q = "?limit=3" + (f"&cursor={cursor}" if cursor else "")
        code, page, _ = d.api("GET", f"/v1/batches/{big['id']}/items{q}")
        assert code == 200, page
        keys += [it["key"] for it in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert keys == [f"k{i}" for i in range(7)]
    assert d.items(big["id"], status="succeeded")[0]["key"] == "k0"
    assert d.items(big["id"], status="failed") == []


def test_etag_and_if_none_match(daemons: DaemonFactory) -> None:
    d = daemons()
    b = d.submit("sleeper", [{"sleep": 3600}])
    # Settled: its one item runs (and stays running), so the version holds still.
    wait_for(lambda: d.batch(b["id"])["counts"]["running"] == 1, 20, what="item running")
    code, body, headers = d.api("GET", f"/v1/batches/{b['id']}")
    assert code == 200
    etag = headers["ETag"]
    assert etag == f'"{body["version"]}"'
    code, body304, h304 = d.api("GET", f"/v1/batches/{b['id']}", headers={"If-None-Match": etag})
    assert code == 304 and not body304 and h304["ETag"] == etag
    code, _, _ = d.api(
        "GET", f"/v1/batches/{b['id']}", headers={"If-None-Match": f'"999999", {etag}'}
    )
    assert code == 304
    assert d.api("GET", f"/v1/batches/{b['id']}", headers={"If-None-Match": '"0"'})[0] == 200

    code, paused, ph = d.api("POST", f"/v1/batches/{b['id']}/pause")
    assert code == 200 and ph["ETag"] == f'"{paused["version"]}"' != etag
    code, fresh, fh = d.api("GET", f"/v1/batches/{b['id']}", headers={"If-None-Match": etag})
    assert code == 200 and fresh["status"] == "paused" and fh["ETag"] != etag
    assert d.api("POST", f"/v1/batches/{b['id']}/cancel")[0] == 200
    d.wait_status(b["id"], "cancelled")


# -- authentication and tenancy ------------------------------------------------------------

TOKENS = {"A": "token-of-tenant-a", "B": "token-of-tenant-b", "R": "read-only-of-a"}


def sha256hex(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def bearer(who: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[who]}"}


@pytest.fixture
def tenants(daemons: DaemonFactory) -> Daemon:
    return daemons(
        extra={
            "auth": {
                "tokens": [
                    {
                        "name": "a",
                        "tenant": "A",
                        "sha256": sha256hex(TOKENS["A"]),
                        "scopes": ["read", "write"],
                    },
                    {
                        "name": "b",
                        "tenant": "B",
                        "sha256": sha256hex(TOKENS["B"]),
                        "scopes": ["read", "write"],
                    },
                    {
                        "name": "r",
                        "tenant": "A",
                        "sha256": sha256hex(TOKENS["R"]),
                        "scopes": ["read"],
                    },
                ]
            }
        }
    )


def test_missing_or_wrong_token_is_401_and_probes_are_public(tenants: Daemon) -> None:
    d = tenants
    for headers in (
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": "Basic abc"},
        {"Authorization": "Bearer"},
        {"Authorization": f"Bearer {TOKENS['A']}x"},
    ):
        for method, path in (
            ("GET", "/v1/batches"),
            ("POST", "/v1/batches"),
            ("GET", "/v1/workers"),
            ("GET", "/v1/items/1"),
        ):
            resp = d.api(
                method,
                path,
                {"handler": "echo", "items": [1]} if method == "POST" else None,
                headers,
            )
            assert_problem(resp, 401)
            assert resp[2]["WWW-Authenticate"].startswith("Bearer"), resp
    for path in ("/healthz", "/readyz", "/metrics", "/v1/openapi.json"):
        assert d.api("GET", path)[0] == 200, path
    doc = d.api("GET", "/v1/openapi.json")[1]
    assert doc["openapi"].startswith("3.1")


def test_scopes(tenants: Daemon, db_url: str) -> None:
    d = tenants
    assert_problem(
        d.api("POST", "/v1/batches", {"handler": "echo", "items": [1]}, bearer("R")), 403
    )
    assert batch_count(db_url) == 0
    code, b, _ = d.api("POST", "/v1/batches", {"handler": "echo", "items": [1]}, bearer("A"))
    assert code == 201 and b["tenant"] == "A"
    code, page, _ = d.api("GET", "/v1/batches", headers=bearer("R"))
    assert code == 200 and [x["id"] for x in page["batches"]] == [b["id"]]
    for method, suffix in (
        ("POST", "/cancel"),
        ("POST", "/pause"),
        ("POST", "/resume"),
        ("POST", "/retry"),
        ("DELETE", ""),
        ("PATCH", ""),
    ):
        body = {"priority": 1} if method == "PATCH" else None
        assert_problem(d.api(method, f"/v1/batches/{b['id']}{suffix}", body, bearer("R")), 403)


def test_other_tenants_get_404_for_everything(tenants: Daemon) -> None:
    d = tenants
    code, b, _ = d.api(
        "POST",
        "/v1/batches",
        {
            "handler": "sleeper",
            "items": [{"key": "x", "payload": {"sleep": 3600}}, {"payload": {"sleep": 3600}}],
            "idempotency_key": "shared",
        },
        bearer("A"),
    )
    assert code == 201, b
    bid = b["id"]
    code, items, _ = d.api("GET", f"/v1/batches/{bid}/items", headers=bearer("A"))
    assert code == 200
    item_id = items["items"][0]["id"]
    assert d.api("GET", f"/v1/items/{item_id}", headers=bearer("A"))[0] == 200
    # Settled (both items run for an hour), so its version only moves if something acts.
    before = wait_for(
        lambda: (
            (x := d.api("GET", f"/v1/batches/{bid}", headers=bearer("A"))[1])["counts"]["running"]
            == 2
            and x
        ),
        20,
        what="both items running",
    )

    reads = ["", "/items", "/summary", "/log", "/events"]
    for suffix in reads:
        assert_problem(d.api("GET", f"/v1/batches/{bid}{suffix}", headers=bearer("B")), 404)
    assert_problem(d.api("GET", f"/v1/items/{item_id}", headers=bearer("B")), 404)
    controls: list[tuple[str, str, Mapping[str, Any] | None]] = [
        ("POST", "/cancel", None),
        ("POST", "/pause", None),
        ("POST", "/resume", None),
        ("POST", "/retry", None),
        ("POST", "/retry", {"include_cancelled": True}),
        ("PATCH", "", {"priority": 9}),
        ("DELETE", "", None),
    ]
    for method, suffix, body in controls:
        assert_problem(d.api(method, f"/v1/batches/{bid}{suffix}", body, bearer("B")), 404)
    code, page, _ = d.api("GET", "/v1/batches", headers=bearer("B"))
    assert code == 200 and page == {"batches": [], "next_cursor": None}
    # Idempotency keys are per tenant: B's "shared" is a batch of its own.
    code, bb, _ = d.api(
        "POST",
        "/v1/batches",
        {"handler": "echo", "items": [1], "idempotency_key": "shared"},
        bearer("B"),
    )
    assert code == 201 and bb["id"] != bid and bb["tenant"] == "B"
    code, page, _ = d.api("GET", "/v1/batches", headers=bearer("B"))
    assert [x["id"] for x in page["batches"]] == [bb["id"]]

    # None of B's controls touched A's batch.
    after = d.api("GET", f"/v1/batches/{bid}", headers=bearer("A"))[1]
    assert after["version"] == before["version"] and after["priority"] == 0
    assert after["status"] not in TERMINAL
    code, page, _ = d.api("GET", "/v1/batches", headers=bearer("A"))
    assert [x["id"] for x in page["batches"]] == [bid]
    assert d.api("POST", f"/v1/batches/{bid}/cancel", None, bearer("A"))[0] == 200
    wait_for(
        lambda: d.api("GET", f"/v1/batches/{bid}", headers=bearer("A"))[1]["status"] == "cancelled",
        20,
        what="A's batch cancelled",
    )
