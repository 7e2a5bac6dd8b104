"""GET /v1/batches/{id}/results over real HTTP against real daemons: every item's
outcome as JSON Lines or CSV, checked against what the item listing says; status
filters, format negotiation, strict parameters, resuming after any id (also across
page boundaries), tenancy and scopes, the ``results`` CLI verb and the client's
``results()`` iterator."""

from __future__ import annotations

import asyncio
import csv
import hashlib
import io
import json
import pathlib
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping
from typing import Any

import pytest

from supervisor import client
from supervisor.api import results
from tests.conftest import DaemonFactory
from tests.daemon import DEFAULT_HANDLERS, ROOT, Daemon, wait_for
from tests.test_api import assert_problem

HANDLERS = {
    **DEFAULT_HANDLERS,
    "gated": {"type": "python", "target": "tests.handlers:gated", "timeout": "5s"},
}
TERMINAL = ("completed", "completed_with_errors", "failed", "cancelled")
# Keys a CSV writer must quote, and text beyond ASCII.
KEYS = ["plain", 'comma, "quoted"', "two\nlines", "crlf\r\nend", "ünïcødé ✓", None]


def get(
    d: Daemon, path: str, headers: Mapping[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, raw body): the body is a dataset, not one JSON document."""
    req = urllib.request.Request(d.url + path, headers=dict(headers or {}))
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def problem(
    d: Daemon, path: str, headers: Mapping[str, str] | None = None
) -> tuple[int, Any, dict[str, str]]:
    code, hdrs, body = get(d, path, headers)
    return code, json.loads(body), hdrs


def jsonl(d: Daemon, path: str, headers: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
    code, hdrs, body = get(d, path, headers)
    assert code == 200, (code, body[:500])
    assert hdrs["Content-Type"].startswith("application/x-ndjson"), hdrs
    text = body.decode()
    assert text == "" or text.endswith("\n"), text[-200:]
    return [json.loads(line) for line in text.splitlines()]


def csv_rows(d: Daemon, path: str, headers: Mapping[str, str] | None = None) -> list[list[str]]:
    code, hdrs, body = get(d, path, headers)
    assert code == 200, (code, body[:500])
    assert hdrs["Content-Type"].startswith("text/csv"), hdrs
    rows = list(csv.reader(io.StringIO(body.decode(), newline="")))
    assert rows[0] == list(results.COLUMNS), rows[:1]
    return rows[1:]


def expected(d: Daemon, batch_id: str, headers: Mapping[str, str] | None = None) -> list[Any]:
    """What the export must say, from the item listing (another route, another query)."""
    out, cursor = [], None
    while True:
        q = "?limit=500" + (f"&cursor={cursor}" if cursor else "")
        code, page, _ = d.api("GET", f"/v1/batches/{batch_id}/items{q}", headers=headers)
        assert code == 200, page
        out += [
            {k: it[k] for k in ("id", "key", "status", "attempts", "result", "error")}
            for it in page["items"]
        ]
        cursor = page["next_cursor"]
        if not cursor:
            return out


def as_csv(rec: Mapping[str, Any]) -> list[str]:
    """A record as the CSV export must write it: JSON cells compact, null empty."""

    def cell(v: Any) -> str:
        return "" if v is None else json.dumps(v, separators=(",", ":"), ensure_ascii=False)

    key = rec["key"]
    return [
        rec["id"],
        "" if key is None else key,
        rec["status"],
        str(rec["attempts"]),
        cell(rec["result"]),
        cell(rec["error"]),
    ]


def mixed_batch(d: Daemon) -> str:
    """A finished batch of succeeded and failed items with awkward keys."""
    items: list[Any] = []
    for i, key in enumerate(KEYS):
        payload = {"ok": i % 2 == 0, "n": i, "text": 'x,"y"\n'}
        items.append({"key": key, "payload": payload} if key is not None else {"payload": payload})
    b = d.submit("gated", items)
    assert d.wait_status(b["id"], TERMINAL)["status"] == "completed_with_errors"
    return str(b["id"])


def test_every_item_as_json_lines_and_as_csv(daemons: DaemonFactory) -> None:
    d = daemons(handlers=HANDLERS)
    bid = mixed_batch(d)
    want = expected(d, bid)
    assert len(want) == len(KEYS)
    assert {r["status"] for r in want} == {"succeeded", "failed"}
    assert all(r["error"]["type"] == "PermanentError" for r in want if r["status"] == "failed")

    got = jsonl(d, f"/v1/batches/{bid}/results")
    assert got == want
    assert [r["key"] for r in got] == KEYS  # id order is submission order

    code, hdrs, body = get(d, f"/v1/batches/{bid}/results?format=csv")
    assert code == 200 and hdrs["Content-Type"] == "text/csv; charset=utf-8", hdrs
    assert body.startswith(b"id,key,status,attempts,result,error\r\n"), body[:80]
    assert body.endswith(b"\r\n")
    assert csv_rows(d, f"/v1/batches/{bid}/results?format=csv") == [as_csv(r) for r in want]

    # HEAD answers the headers and reads nothing.
    head = urllib.request.Request(d.url + f"/v1/batches/{bid}/results?format=csv", method="HEAD")
    with urllib.request.urlopen(head, timeout=30) as resp:
        assert resp.status == 200 and resp.read() == b""
        assert resp.headers["Content-Type"] == "text/csv; charset=utf-8"

    # The Accept header chooses when there is no format parameter; the parameter wins.
    by_accept = csv_rows(d, f"/v1/batches/{bid}/results", {"Accept": "text/csv"})
    assert by_accept == [as_csv(r) for r in want]
    preferred = {"Accept": "text/csv;q=0.5, application/x-ndjson"}
    assert jsonl(d, f"/v1/batches/{bid}/results", preferred) == want
    assert jsonl(d, f"/v1/batches/{bid}/results?format=jsonl", {"Accept": "text/csv"}) == want
    assert jsonl(d, f"/v1/batches/{bid}/results", {"Accept": "*/*"}) == want

    # Status filters: one status, several, and one nothing has.
    failed = [r for r in want if r["status"] == "failed"]
    assert 0 < len(failed) < len(want)
    assert jsonl(d, f"/v1/batches/{bid}/results?status=failed") == failed
    assert jsonl(d, f"/v1/batches/{bid}/results?status=failed,succeeded") == want
    assert jsonl(d, f"/v1/batches/{bid}/results?status=queued,running") == []
    assert csv_rows(d, f"/v1/batches/{bid}/results?format=csv&status=failed") == [
        as_csv(r) for r in failed
    ]
    assert csv_rows(d, f"/v1/batches/{bid}/results?format=csv&status=cancelled") == []
    assert "api.internal_error" not in d.log() and "api.results_aborted" not in d.log()


def test_bad_parameters_are_400_naming_them(daemons: DaemonFactory) -> None:
    d = daemons()
    b = d.submit("echo", [1])
    base = f"/v1/batches/{b['id']}/results"
    for query, field in (
        ("format=xml", "format"),
        ("format=", "format"),
        ("format=JSONL", "format"),
        ("status=done", "status"),
        ("status=succeeded,", "status"),
        ("status=failed,bogus", "status"),
        ("status=%00", "status"),
        ("after=abc", "after"),
        ("after=-1", "after"),
        ("after=", "after"),
        ("after=1e3", "after"),
        ("after=9999999999999999999", "after"),
    ):
        body = assert_problem(problem(d, f"{base}?{query}"), 400, field)
        assert body["detail"].startswith(f"{field}: "), body
    for bad in ("not-a-uuid", "00000000-0000-0000-0000-000000000000"):
        assert_problem(problem(d, f"/v1/batches/{bad}/results"), 404)
    assert "api.internal_error" not in d.log()


def test_many_pages_in_order_and_resuming_after_any_id(daemons: DaemonFactory) -> None:
    d = daemons()
    n = 2 * results.PAGE_ROWS + 7  # two full pages and a part: the page seams are covered
    b = d.submit("echo", [{"key": f"k{i}", "payload": i} for i in range(n)])
    d.wait_status(b["id"], "completed", timeout=60)
    base = f"/v1/batches/{b['id']}/results"
    want = expected(d, b["id"])
    assert len(want) == n

    every = jsonl(d, base)
    assert every == want
    ids = [int(r["id"]) for r in every]
    assert ids == sorted(set(ids))  # ascending, each once

    seams = (0, results.PAGE_ROWS - 1, results.PAGE_ROWS, 2 * results.PAGE_ROWS - 1, n - 2, n - 1)
    for k in seams:
        last = every[k]["id"]
        assert jsonl(d, f"{base}?after={last}") == want[k + 1 :], k
    assert csv_rows(d, f"{base}?format=csv&after={every[results.PAGE_ROWS]['id']}") == [
        as_csv(r) for r in want[results.PAGE_ROWS + 1 :]
    ]
    # An id before the batch's first gives all of it; the filter applies to the rest.
    assert jsonl(d, f"{base}?after=0") == want
    assert jsonl(d, f"{base}?after={every[3]['id']}&status=failed") == []


TOKENS = {"A": "results-token-a", "B": "results-token-b", "R": "results-read-a", "O": "ops"}


def bearer(who: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[who]}"}


@pytest.fixture
def tenants(daemons: DaemonFactory) -> Daemon:
    def token(who: str, tenant: str, scopes: list[str]) -> dict[str, Any]:
        digest = hashlib.sha256(TOKENS[who].encode()).hexdigest()
        return {"name": who, "tenant": tenant, "sha256": digest, "scopes": scopes}

    return daemons(
        handlers=HANDLERS,
        extra={
            "auth": {
                "tokens": [
                    token("A", "A", ["read", "write"]),
                    token("B", "B", ["read", "write"]),
                    token("R", "A", ["read"]),
                    token("O", "ops", ["admin"]),
                ]
            }
        },
    )


def test_tenancy_and_scopes_are_those_of_the_item_listing(tenants: Daemon) -> None:
    d = tenants
    items = [{"key": "good", "payload": {"ok": True}}, {"key": "bad", "payload": {"ok": False}}]
    code, b, _ = d.api("POST", "/v1/batches", {"handler": "gated", "items": items}, bearer("A"))
    assert code == 201, b
    path = f"/v1/batches/{b['id']}/results"

    def terminal() -> bool:
        return d.api("GET", f"/v1/batches/{b['id']}", headers=bearer("A"))[1]["status"] in TERMINAL

    wait_for(terminal, 20, what="the batch to finish")
    assert_problem(problem(d, path), 401)
    for fmt in ("jsonl", "csv"):
        assert_problem(problem(d, f"{path}?format={fmt}", bearer("B")), 404)
        assert_problem(problem(d, f"{path}?format=bogus", bearer("B")), 404)
    owner = jsonl(d, path, bearer("A"))
    assert owner == expected(d, b["id"], bearer("A"))
    assert jsonl(d, path, bearer("R")) == owner  # read scope is enough
    # Tracebacks are for admins only, as on every other route.
    assert [r["error"]["traceback"] for r in owner if r["error"]] == [None]
    ops = jsonl(d, path, bearer("O"))
    assert [r["id"] for r in ops] == [r["id"] for r in owner]
    (failed,) = [r for r in ops if r["error"]]
    assert "Traceback" in failed["error"]["traceback"]


def cli_to_file(d: Daemon, out: pathlib.Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    """``batch-supervisor ARGS > out``, as a shell would run it."""
    with open(out, "wb") as f:
        return subprocess.run(
            [sys.executable, "-m", "supervisor", *args],
            cwd=ROOT,
            env={**d.env, "BATCH_SUPERVISOR_URL": d.url},
            stdout=f,
            stderr=subprocess.PIPE,
            text=False,
            timeout=120,
            check=False,
        )


def test_cli_results_writes_the_export_to_stdout(
    daemons: DaemonFactory, tmp_path: pathlib.Path
) -> None:
    d = daemons(handlers=HANDLERS)
    bid = mixed_batch(d)
    big = d.submit("echo", list(range(results.PAGE_ROWS + 3)))
    d.wait_status(big["id"], "completed", timeout=60)

    for batch, args, query in (
        (bid, [], ""),
        (bid, ["--format", "csv"], "?format=csv"),
        (bid, ["--status", "failed"], "?status=failed"),
        (
            bid,
            ["--format", "csv", "--status", "succeeded,failed"],
            "?format=csv&status=succeeded,failed",
        ),
        (big["id"], [], ""),
    ):
        out = tmp_path / "out.data"
        r = cli_to_file(d, out, "results", batch, *args)
        assert r.returncode == 0 and r.stderr == b"", (args, r.stderr)
        code, _, body = get(d, f"/v1/batches/{batch}/results{query}")
        assert code == 200
        assert out.read_bytes() == body, args  # byte for byte what the API sends
        assert body.count(b"\n") >= 2, body

    # --after resumes: the rest, exactly.
    every = jsonl(d, f"/v1/batches/{big['id']}/results")
    out = tmp_path / "rest.jsonl"
    r = cli_to_file(d, out, "results", big["id"], "--after", every[results.PAGE_ROWS - 2]["id"])
    assert r.returncode == 0, r.stderr
    assert [json.loads(x) for x in out.read_text().splitlines()] == every[results.PAGE_ROWS - 1 :]

    # Errors are one line and exit 1, naming what was wrong.
    for args, fragment in (
        (["results", bid, "--status", "done"], "status"),
        (["results", "00000000-0000-0000-0000-000000000000"], "404"),
    ):
        r = cli_to_file(d, tmp_path / "err.out", *args)
        lines = r.stderr.decode().splitlines()
        assert r.returncode == 1 and len(lines) == 1, r.stderr
        assert lines[0].startswith("error: ") and fragment in lines[0], lines


def test_client_results_iterates_records_and_continues_after_an_id(
    daemons: DaemonFactory,
) -> None:
    d = daemons(handlers=HANDLERS)
    bid = mixed_batch(d)
    want = expected(d, bid)

    async def collect(**kw: Any) -> list[dict[str, Any]]:
        async with client.AsyncClient(d.url) as api:
            return [rec async for rec in api.iter_results(bid, **kw)]

    assert asyncio.run(collect()) == want
    assert asyncio.run(collect(after=want[1]["id"])) == want[2:]
    failed = [r for r in want if r["status"] == "failed"]
    assert asyncio.run(collect(status=["failed"])) == failed
    assert asyncio.run(collect(status="failed,succeeded")) == want
