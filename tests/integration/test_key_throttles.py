"""Backpressure per key: a throttled (handler, limit key) gets no room in any
keyed claim until its throttled_until, while the other keys proceed; the pause is
written with the outcome that asked for it, and that attempt is given back."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import anyio
import asyncpg
import pytest

from supervisor import db as dbm
from supervisor import outbox as outbox_mod
from supervisor import states, store
from tests.integration import support
from tests.integration.support import HANDLER, new_lease
from tests.integration.test_key_limits import claim, domains, submit

pytestmark = pytest.mark.anyio


async def test_a_throttled_key_is_skipped_until_its_time_and_the_others_proceed(
    db: dbm.Database, conn: asyncpg.Connection
) -> None:
    await submit(db, ["a.example"] * 3 + ["b.example"] * 3 + ["c.example"] * 3)
    q = store.Queries(db)
    await q.throttle_keys(handlers=[HANDLER], keys=["a.example"], seconds=[3600.0])
    (paused,) = await q.key_throttles(limit=10)
    assert (paused.handler, paused.limit_key) == (HANDLER, "a.example")
    assert paused.throttled_until > datetime.now(UTC) + timedelta(seconds=3500)

    # Claims of any lease skip the throttled key, and the others get its share.
    got = await claim(db, new_lease(), 4, key_cap=2)
    assert domains(got) == {"b.example": 2, "c.example": 2}
    assert await claim(db, new_lease(), 4, key_cap=2) == []  # b and c full, a paused
    # A pause of the same key for less time does not shorten it.
    await q.throttle_keys(handlers=[HANDLER], keys=["a.example"], seconds=[1.0])
    assert await claim(db, new_lease(), 4, key_cap=2) == []

    # Its time has come (moved into the past rather than waited for): a proceeds.
    await conn.execute(
        f"UPDATE {db.schema}.key_throttles SET throttled_until = now() - interval '1 second'"
    )
    assert await q.key_throttles(limit=10) == []
    assert domains(await claim(db, new_lease(), 4, key_cap=2)) == {"a.example": 2}
    # The next pause of the handler deletes the expired row on the way.
    await q.throttle_keys(handlers=[HANDLER], keys=["b.example"], seconds=[60.0])
    rows = await conn.fetch(f"SELECT limit_key FROM {db.schema}.key_throttles")
    assert [r["limit_key"] for r in rows] == ["b.example"]


async def test_a_pause_of_one_handler_leaves_another_handlers_same_key_alone(
    db: dbm.Database,
) -> None:
    await submit(db, ["a.example"] * 2)
    q = store.Queries(db)
    await q.throttle_keys(handlers=["other"], keys=["a.example"], seconds=[3600.0])
    assert domains(await claim(db, new_lease(), 2, key_cap=2)) == {"a.example": 2}


@pytest.fixture
async def tg() -> AsyncIterator[anyio.abc.TaskGroup]:
    async with anyio.create_task_group() as group:
        yield group
        group.cancel_scope.cancel()


async def test_a_throttling_outcome_pauses_the_key_and_gives_its_attempt_back(
    db: dbm.Database, conn: asyncpg.Connection, tg: anyio.abc.TaskGroup
) -> None:
    await submit(db, ["a.example"] * 3 + ["b.example"])
    lease = new_lease()
    first = await claim(db, lease, 1, key_cap=1)
    (item,) = first
    assert json.loads(item.payload)["domain"] == "a.example"
    ob = outbox_mod.Outbox(db, "it-worker", lambda chunk, applied: None, default_max_items=100)
    await tg.start(ob.run)
    rec = dataclasses.replace(
        support.outcome(item, lease, states.Outcome.RELEASED, delay_s=3600.0),
        error_json=json.dumps({"type": "Throttled"}),
        throttle_key="a.example",
    )
    ob.put(rec)
    with anyio.fail_after(support.WAIT_S):
        await ob.wait_empty()

    row = await conn.fetchrow(
        f"SELECT status, attempts, max_attempts, run_after > now() + interval '3500 s' AS later,"
        f" errors FROM {db.schema}.items WHERE id = $1",
        item.id,
    )
    assert row is not None
    # Queued again for the pause's end; its attempt counted and given back.
    assert (row["status"], row["attempts"], row["max_attempts"], row["later"]) == (
        "queued",
        1,
        item.max_attempts + 1,
        True,
    )
    assert [e["type"] for e in json.loads(row["errors"])] == ["Throttled"]
    (paused,) = await store.Queries(db).key_throttles(limit=10)
    assert paused.limit_key == "a.example"
    # The key's other items wait too; the other key does not.
    assert domains(await claim(db, new_lease(), 4, key_cap=1)) == {"b.example": 1}


async def test_one_write_pauses_several_keys_and_a_repeated_key_for_its_longest(
    db: dbm.Database,
) -> None:
    q = store.Queries(db)
    await q.throttle_keys(
        handlers=[HANDLER, HANDLER, HANDLER, "other"],
        keys=["b", "a", "a", "a"],
        seconds=[10.0, 5.0, 100.0, 1.0],
    )
    paused = {(t.handler, t.limit_key): t.throttled_until for t in await q.key_throttles(limit=10)}
    assert set(paused) == {(HANDLER, "a"), (HANDLER, "b"), ("other", "a")}
    assert paused[(HANDLER, "a")] - paused[(HANDLER, "b")] > timedelta(seconds=85)
    # The listing is soonest end first within a handler, and bounded.
    listed = await q.key_throttles(limit=2)
    assert [(t.handler, t.limit_key) for t in listed] == [("other", "a"), (HANDLER, "b")]
