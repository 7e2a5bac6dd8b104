"""What the limits per key are using now (the key_usage query behind GET
/v1/limits): running items, rate bucket tokens and pauses per key, over every
lease, busiest first and cut at the limit asked for."""

from __future__ import annotations

import pytest

from supervisor import db as dbm
from supervisor import store
from tests.integration.support import HANDLER, new_lease
from tests.integration.test_key_limits import claim, submit

pytestmark = pytest.mark.anyio


async def usage(
    db: dbm.Database, limit: int = 100, rate: float | None = None
) -> list[store.KeyUsage]:
    return await store.Queries(db).key_usage(
        handler=HANDLER, key_rate=rate, key_burst=1.0, limit=limit
    )


async def test_running_items_of_every_lease_count_per_key_busiest_first(db: dbm.Database) -> None:
    await submit(db, ["a"] * 3 + ["b"] * 3 + ["c"])
    assert await usage(db) == []  # queued items use nothing
    await claim(db, new_lease(), 1, key_cap=2)  # one of a key: a (key order)
    await claim(db, new_lease(), 10, key_cap=2)  # the rest up to 2 per key
    got = await usage(db)
    assert [(u.limit_key, u.running) for u in got] == [("a", 2), ("b", 2), ("c", 1)]
    assert all(u.tokens is None and u.throttled_until is None for u in got)
    # Cut at the limit, the busiest kept.
    assert [u.limit_key for u in await usage(db, limit=2)] == ["a", "b"]


async def test_a_keys_spent_tokens_and_its_pause_show_without_running_items(
    db: dbm.Database,
) -> None:
    await submit(db, ["a", "a", "b"])
    # 0.001/s: a bucket emptied by a start stays nearly empty for the test.
    claimed = await claim(db, new_lease(), 10, key_rate=0.001)
    assert sorted(c.limit_key for c in claimed) == ["a", "b"]
    q = store.Queries(db)
    await q.throttle_keys(handlers=[HANDLER], keys=["zz"], seconds=[60.0])
    got = {u.limit_key: u for u in await usage(db, rate=0.001)}
    assert set(got) == {"a", "b", "zz"}, got
    for k in ("a", "b"):
        tokens = got[k].tokens
        assert got[k].running == 1 and tokens is not None and tokens < 0.01, got[k]
    assert got["zz"].running == 0 and got["zz"].tokens is None
    assert got["zz"].throttled_until is not None
    # Without a rate limit, buckets are not read at all.
    assert {u.limit_key: u.tokens for u in await usage(db)} == {"a": None, "b": None, "zz": None}
