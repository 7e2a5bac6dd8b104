"""Exclusive keys over real HTTP against real daemons: at most one unfinished
batch per (tenant, exclusive_key), held by the database (a unique index), so
the rule survives restarts, holds across daemons and frees itself when the
batch ends; a refusal is a 409 naming the batch that holds the key."""

from __future__ import annotations

import asyncio
import hashlib
import pathlib
import uuid
from datetime import datetime
from typing import Any

import aiohttp

from tests.conftest import DaemonFactory
from tests.daemon import DEFAULT_HANDLERS, Daemon
from tests.test_api import assert_problem, db_rows

KEY = "portfolio:123"
HANDLERS = dict(DEFAULT_HANDLERS) | {
    "until_file": {"type": "python", "target": "tests.handlers:until_file", "timeout": "1h"},
}
Response = tuple[int, Any, dict[str, str]]


def post(d: Daemon, body: Any, headers: dict[str, str] | None = None) -> Response:
    return d.api("POST", "/v1/batches", body, headers)


def held(d: Daemon, key: str = KEY, **fields: Any) -> dict[str, Any]:
    """A batch that holds ``key`` until it is cancelled (its item sleeps an hour)."""
    return d.submit("sleeper", [{"sleep": 3600}], exclusive_key=key, **fields)


def assert_busy(resp: Response, holder: str) -> dict[str, Any]:
    """409 problem+json naming ``holder`` as the batch holding the key."""
    body = assert_problem(resp, 409)
    assert body["active_batch_id"] == holder, body
    assert holder in body["detail"], body
    return body


def keyed_batches(db_url: str, key: str = KEY) -> list[str]:
    rows = db_rows(
        db_url,
        "SELECT id FROM supervisor.batches WHERE exclusive_key = $1 ORDER BY created_at",
        key,
    )
    return [str(r["id"]) for r in rows]


def test_a_second_submission_is_refused_with_409_naming_the_active_batch(
    daemons: DaemonFactory, db_url: str
) -> None:
    d = daemons(handlers=HANDLERS)
    first = held(d)
    assert first["exclusive_key"] == KEY
    assert d.batch(first["id"])["exclusive_key"] == KEY
    body = assert_busy(
        post(d, {"handler": "echo", "items": [1], "exclusive_key": KEY}), first["id"]
    )
    assert body["exclusive_key"] == KEY and KEY in body["detail"], body
    assert keyed_batches(db_url) == [first["id"]]  # the refused one wrote nothing
    assert db_rows(db_url, "SELECT count(*) AS n FROM supervisor.items")[0]["n"] == 1

    # Another key, or none, is not held back.
    other = d.submit("echo", [1], exclusive_key="portfolio:124")
    plain = d.submit("echo", [1])
    assert plain["exclusive_key"] is None

    # A paused batch is unfinished: it keeps the key, and the 409 says it is paused.
    assert d.api("POST", f"/v1/batches/{first['id']}/pause")[0] == 200
    body = assert_busy(
        post(d, {"handler": "echo", "items": [1], "exclusive_key": KEY}), first["id"]
    )
    assert "paused" in body["detail"], body

    def listed(query: str) -> list[str]:
        code, page, _ = d.api("GET", f"/v1/batches?{query}")
        assert code == 200, page
        return [b["id"] for b in page["batches"]]

    assert listed(f"exclusive_key={KEY}") == [first["id"]]
    assert listed("exclusive_key=portfolio:124") == [other["id"]]
    assert listed("exclusive_key=portfolio:999") == []
    assert listed(f"exclusive_key={KEY}&status=completed") == []
    assert len(listed("")) == 3
    assert "api.internal_error" not in d.log()


def test_invalid_exclusive_keys_are_422_naming_the_field_and_write_nothing(
    daemons: DaemonFactory, db_url: str
) -> None:
    d = daemons()
    for bad in ("", "x" * 201, 5, ["a"], "a\nb", "tab\there", "nul\u0000", " lead", "trail "):
        resp = post(d, {"handler": "echo", "items": [1], "exclusive_key": bad})
        assert_problem(resp, 422, "/exclusive_key")
    raw = b'{"handler": "echo", "items": [1], "exclusive_key": "\\ud800"}'
    assert_problem(post(d, raw), 422, "/exclusive_key")
    assert db_rows(db_url, "SELECT count(*) AS n FROM supervisor.batches")[0]["n"] == 0
    assert_problem(d.api("GET", "/v1/batches?exclusive_key=%20x"), 400, "exclusive_key")
    # At the limits it is accepted; null means no key.
    assert d.submit("echo", [1], exclusive_key="k" * 200)["exclusive_key"] == "k" * 200
    assert d.submit("echo", [1], exclusive_key="é:ünïcode ok")["exclusive_key"] == "é:ünïcode ok"
    assert d.submit("echo", [1], exclusive_key=None)["exclusive_key"] is None


def test_the_key_is_free_again_once_the_batch_is_terminal(
    daemons: DaemonFactory, tmp_path: pathlib.Path
) -> None:
    d = daemons(handlers=HANDLERS)
    done = tmp_path / "done"
    # Completed: the item runs until the test lets it finish.
    first = d.submit("until_file", [{"file": str(done)}], exclusive_key=KEY)
    assert_busy(post(d, {"handler": "echo", "items": [1], "exclusive_key": KEY}), first["id"])
    done.touch()
    d.wait_status(first["id"], "completed")
    # Failed.
    second = d.submit("permanent", [1], exclusive_key=KEY)
    d.wait_status(second["id"], "failed")
    # Cancelled (its item was running when the cancel came).
    third = held(d)
    d.wait_status(third["id"], "running")
    assert_busy(post(d, {"handler": "echo", "items": [1], "exclusive_key": KEY}), third["id"])
    assert d.api("POST", f"/v1/batches/{third['id']}/cancel")[0] == 200
    d.wait_status(third["id"], "cancelled")
    fourth = d.submit("echo", [1], exclusive_key=KEY)
    assert len({first["id"], second["id"], third["id"], fourth["id"]}) == 4


TOKENS = {"A": "token-of-tenant-a", "B": "token-of-tenant-b"}


def bearer(who: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[who]}"}


def test_tenants_and_keys_do_not_conflict(daemons: DaemonFactory) -> None:
    tokens = [
        {
            "name": who.lower(),
            "tenant": who,
            "sha256": hashlib.sha256(token.encode()).hexdigest(),
            "scopes": ["read", "write"],
        }
        for who, token in TOKENS.items()
    ]
    d = daemons(extra={"auth": {"tokens": tokens}})
    body = {"handler": "sleeper", "items": [{"sleep": 3600}], "exclusive_key": KEY}
    code, a, _ = post(d, body, bearer("A"))
    assert code == 201, a
    code, b, _ = post(d, body, bearer("B"))  # the same key in another tenant
    assert code == 201 and b["tenant"] == "B", b
    code, a2, _ = post(d, {**body, "exclusive_key": "portfolio:124"}, bearer("A"))
    assert code == 201, a2
    assert_busy(post(d, body, bearer("A")), a["id"])
    assert_busy(post(d, body, bearer("B")), b["id"])


async def _post_all(url: str, bodies: list[dict[str, Any]]) -> list[tuple[int, Any]]:
    """Every body POSTed at once, each on its own connection."""
    async with aiohttp.ClientSession() as session:

        async def one(body: dict[str, Any]) -> tuple[int, Any]:
            async with session.post(f"{url}/v1/batches", json=body) as resp:
                return resp.status, await resp.json(content_type=None)

        return list(await asyncio.gather(*(one(b) for b in bodies)))


def test_concurrent_submissions_with_one_key_make_one_batch(
    daemons: DaemonFactory, db_url: str
) -> None:
    d = daemons()
    # Different bodies (no idempotency key): only the exclusive key relates them.
    bodies = [
        {"handler": "sleeper", "items": [{"sleep": 3600, "n": n}], "exclusive_key": KEY}
        for n in range(10)
    ]
    results = asyncio.run(_post_all(d.url, bodies))
    codes = sorted(code for code, _ in results)
    assert codes == [201] + [409] * 9, results
    winner = next(body["id"] for code, body in results if code == 201)
    assert {body["active_batch_id"] for code, body in results if code == 409} == {winner}
    assert keyed_batches(db_url) == [winner]
    assert db_rows(db_url, "SELECT count(*) AS n FROM supervisor.items")[0]["n"] == 1
    assert "api.internal_error" not in d.log()


def test_concurrent_repeats_of_one_idempotent_submission_are_that_batch(
    daemons: DaemonFactory, db_url: str
) -> None:
    """The same request sent ten times at once: one 201 and nine 200s with its id.
    The exclusive key never turns a repeat into a 409 (or a 500), however the
    inserts interleave."""
    d = daemons()
    body = {
        "handler": "sleeper",
        "items": [{"sleep": 3600}],
        "exclusive_key": KEY,
        "idempotency_key": "nightly-2026-11-23",
    }
    results = asyncio.run(_post_all(d.url, [body] * 10))
    assert sorted(code for code, _ in results) == [200] * 9 + [201], results
    assert len({b["id"] for _, b in results}) == 1
    assert len(keyed_batches(db_url)) == 1
    assert "api.internal_error" not in d.log()


def test_an_idempotent_repeat_returns_the_original_batch_not_409(
    daemons: DaemonFactory, db_url: str, tmp_path: pathlib.Path
) -> None:
    d = daemons(handlers=HANDLERS)
    done = tmp_path / "done"
    body = {
        "handler": "until_file",
        "items": [{"file": str(done)}],
        "exclusive_key": KEY,
        "idempotency_key": "nightly-2026-11-23",
    }
    code, first, _ = post(d, body)
    assert code == 201, first
    # While it holds the key: the repeat is that batch.
    code, again, _ = post(d, body)
    assert (code, again["id"]) == (200, first["id"]), again
    code, again, _ = post(d, body, {"Idempotency-Key": "nightly-2026-11-23"})
    assert (code, again["id"]) == (200, first["id"]), again
    # Same idempotency key, other content: the idempotency conflict, as before.
    resp = post(d, {**body, "priority": 5})
    assert "idempotency key" in assert_problem(resp, 409)["detail"]
    assert "active_batch_id" not in resp[1]
    # The exclusive key itself is content.
    resp = post(d, {**body, "exclusive_key": "portfolio:124"})
    assert "idempotency key" in assert_problem(resp, 409)["detail"]
    # Another idempotency key with the held exclusive key: refused, and the refused
    # request does not use up its idempotency key.
    later = {**body, "idempotency_key": "nightly-2026-11-24"}
    assert_busy(post(d, later), first["id"])

    done.touch()
    d.wait_status(first["id"], "completed")
    # Finished: the repeat is still the original, not a new batch with the free key.
    code, again, _ = post(d, body)
    assert (code, again["id"], again["status"]) == (200, first["id"], "completed"), again
    assert keyed_batches(db_url) == [first["id"]]
    code, nxt, _ = post(d, later)
    assert code == 201 and nxt["id"] != first["id"], nxt
    assert keyed_batches(db_url) == [first["id"], nxt["id"]]


def test_retry_of_a_terminal_batch_is_refused_while_another_holds_its_key(
    daemons: DaemonFactory, tmp_path: pathlib.Path
) -> None:
    d = daemons(handlers=HANDLERS)
    done = tmp_path / "done"
    # Fails at once; retried, it runs until the test lets it finish.
    old = d.submit("until_file", [{"file": str(done), "fail_first": True}], exclusive_key=KEY)
    old = d.wait_status(old["id"], "failed")
    new = held(d)  # the key was free, so the next run started
    resp = d.api("POST", f"/v1/batches/{old['id']}/retry")
    assert_busy(resp, new["id"])
    after = d.batch(old["id"])
    assert (after["status"], after["version"], after["counts"]) == (
        "failed",
        old["version"],
        old["counts"],
    ), after  # the refused retry changed nothing
    assert "api.internal_error" not in d.log()

    assert d.api("POST", f"/v1/batches/{new['id']}/cancel")[0] == 200
    d.wait_status(new["id"], "cancelled")
    code, reopened, _ = d.api("POST", f"/v1/batches/{old['id']}/retry")
    assert code == 200 and reopened["status"] not in ("failed", "cancelled"), reopened
    # Reopened, it holds the key again, until it ends.
    assert_busy(post(d, {"handler": "echo", "items": [1], "exclusive_key": KEY}), old["id"])
    done.touch()
    d.wait_status(old["id"], "completed")
    assert d.submit("echo", [1], exclusive_key=KEY)["exclusive_key"] == KEY


def test_the_key_holds_across_daemons_and_restarts(daemons: DaemonFactory) -> None:
    """The rule is in the database, not in a daemon: another daemon on the same
    database refuses too, and so does the first one restarted after a crash."""
    d1 = daemons("x1")
    d2 = daemons("x2")
    first = held(d1)
    d1.wait_status(first["id"], "running")
    body = {"handler": "echo", "items": [1], "exclusive_key": KEY}
    assert_busy(post(d2, body), first["id"])
    d1.kill()  # no clean exit: its item stays running under a lease nobody renews
    assert_busy(post(d2, body), first["id"])
    d1.start()
    assert_busy(post(d1, body), first["id"])
    assert_busy(post(d2, body), first["id"])
    assert d1.api("POST", f"/v1/batches/{first['id']}/cancel")[0] == 200
    d1.wait_status(first["id"], "cancelled")
    created = d2.submit("echo", [1], exclusive_key=KEY)
    uuid.UUID(created["id"])


def test_on_conflict_queue_waits_behind_the_holder_and_runs_the_key_as_a_chain(
    daemons: DaemonFactory, db_url: str, tmp_path: pathlib.Path
) -> None:
    d = daemons(handlers=HANDLERS)
    f1, f2 = tmp_path / "one", tmp_path / "two"
    holder = d.submit("until_file", [{"file": str(f1), "then_fail": True}], exclusive_key=KEY)
    q1 = d.submit("until_file", [{"file": str(f2)}], exclusive_key=KEY, on_conflict="queue")
    q2 = d.submit("echo", [1, 2], exclusive_key=KEY, on_conflict="queue")
    assert q1["status"] == "waiting" and q1["waiting_on"] == [holder["id"]], q1
    assert q2["status"] == "waiting" and q2["waiting_on"] == [q1["id"]], q2
    # The default is still a refusal, naming the batch that runs.
    assert_busy(post(d, {"handler": "echo", "items": [1], "exclusive_key": KEY}), holder["id"])
    assert_problem(
        post(d, {"handler": "echo", "items": [1], "on_conflict": "queue"}), 422, "/on_conflict"
    )
    assert_problem(
        post(d, {"handler": "echo", "items": [1], "exclusive_key": KEY, "on_conflict": "x"}),
        422,
        "/on_conflict",
    )

    f1.touch()  # the holder fails: a queue waits for the end, whatever it is
    d.wait_status(holder["id"], "failed")
    d.wait_status(q1["id"], "running")
    assert d.batch(q2["id"])["status"] == "waiting"  # one at a time
    f2.touch()
    q1_done = d.wait_status(q1["id"], "completed")
    d.wait_status(q2["id"], "completed")
    started = min(datetime.fromisoformat(it["started_at"]) for it in d.items(q2["id"]))
    assert started >= datetime.fromisoformat(q1_done["finished_at"]), (started, q1_done)
    assert keyed_batches(db_url) == [holder["id"], q1["id"], q2["id"]]


def test_a_waiting_keyed_batch_released_while_its_key_is_held_waits_behind_the_holder(
    daemons: DaemonFactory, db_url: str, tmp_path: pathlib.Path
) -> None:
    d = daemons(handlers=HANDLERS)
    fa, fb = tmp_path / "a", tmp_path / "b"
    a = d.submit("until_file", [{"file": str(fa)}])
    b = d.submit("until_file", [{"file": str(fb), "fail_first": True}], exclusive_key=KEY)
    d.wait_status(b["id"], "failed")
    w = d.submit("echo", [1], exclusive_key=KEY, after=[a["id"]])
    assert w["status"] == "waiting", w
    # A waiting batch does not hold the key in the index: b can be reopened.
    code, body, _ = d.api("POST", f"/v1/batches/{b['id']}/retry")
    assert code == 200, body
    d.wait_status(b["id"], "running")
    fa.touch()
    d.wait_status(a["id"], "completed")
    # Its dependency ended, but its key is held: it waits behind the holder.
    got = d.batch(w["id"])
    assert got["status"] == "waiting" and got["waiting_on"] == [b["id"]], got
    queued = db_rows(
        db_url,
        "SELECT detail->>'behind' AS behind FROM supervisor.batch_events"
        " WHERE batch_id = $1 AND action = 'exclusive_key_queued'",
        uuid.UUID(w["id"]),
    )
    assert [r["behind"] for r in queued] == [b["id"]], queued
    fb.touch()
    b_done = d.wait_status(b["id"], "completed")
    d.wait_status(w["id"], "completed")
    started = min(datetime.fromisoformat(it["started_at"]) for it in d.items(w["id"]))
    assert started >= datetime.fromisoformat(b_done["finished_at"])
