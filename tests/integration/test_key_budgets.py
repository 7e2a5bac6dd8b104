"""Budgets per key in the claim (claim_keyed_items_v2): at most a budget of cost
units started per key per period, each item's cost read from its payload, the
first item that does not fit holding back the key's later ones, an item dearer
than the whole budget starting alone in a fresh period, and reported costs
correcting a key's charge."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from typing import Any

import pytest

from supervisor import batches, key_limits, store
from supervisor import db as dbm
from tests.integration.support import HANDLER, eventually, new_lease

pytestmark = pytest.mark.anyio

# About 31 years from 2001: no test runs across one of these periods' ends.
LONG_S = 1e9


async def submit(db: dbm.Database, entries: Sequence[tuple[str, Any]]) -> uuid.UUID:
    """One item per (domain, cost) entry; a cost of None leaves it out."""
    payloads: list[dict[str, Any]] = [
        {"domain": d, "n": i} | ({} if c is None else {"cost": c})
        for i, (d, c) in enumerate(entries)
    ]
    nb = batches.NewBatch(
        handler=HANDLER,
        items=[(None, json.dumps(p)) for p in payloads],
        limit_keys=[key_limits.key_of(p, ("domain",)) for p in payloads],
    )
    sub = await batches.submit(
        db, nb, tenant="t", actor="test", attempt_budget=3, callback_handler=None
    )
    return uuid.UUID(sub.batch["id"])


async def claim(
    db: dbm.Database,
    n: int = 50,
    *,
    budget: float = 100.0,
    period_s: float = LONG_S,
    cost_path: Sequence[str] | None = ("cost",),
) -> list[store.KeyedClaimedItem]:
    return await store.Queries(db).claim_keyed_items(
        handler=HANDLER,
        limit=n,
        worker="it-worker",
        lease=uuid.UUID(new_lease()),
        global_cap=None,
        rate=None,
        burst=1.0,
        key_cap=None,
        key_rate=None,
        key_burst=1.0,
        budget=budget,
        budget_period_s=period_s,
        cost_path=cost_path,
    )


def spent(claimed: Sequence[store.KeyedClaimedItem]) -> dict[str, float]:
    out: dict[str, float] = {}
    for c in claimed:
        assert c.cost is not None
        out[c.limit_key] = out.get(c.limit_key, 0.0) + c.cost
    return out


async def test_a_keys_starts_stop_at_its_budget_and_other_keys_have_their_own(
    db: dbm.Database,
) -> None:
    await submit(db, [("a", 40), ("a", 40), ("a", 40), ("b", 90), ("b", 20)])
    first = await claim(db)
    assert spent(first) == {"a": 80.0, "b": 90.0}
    assert [json.loads(c.payload)["n"] for c in first if c.limit_key == "a"] == [0, 1]
    # Across claims (of any lease): what the period charged stays charged.
    assert await claim(db) == []
    usage = await store.Queries(db).key_usage(
        handler=HANDLER, key_rate=None, key_burst=1.0, limit=10, budget_period_s=LONG_S
    )
    assert [(u.limit_key, u.budget_used) for u in usage] == [("a", 80.0), ("b", 90.0)]


async def test_the_first_item_that_does_not_fit_holds_back_the_keys_later_ones(
    db: dbm.Database,
) -> None:
    await submit(db, [("a", 30), ("a", 80), ("a", 10)])
    claimed = await claim(db)
    # 10 would fit beside 30, but it comes after 80: small items never starve a big one.
    assert [json.loads(c.payload)["n"] for c in claimed] == [0]


async def test_an_item_dearer_than_the_budget_starts_alone_in_a_fresh_period(
    db: dbm.Database,
) -> None:
    await submit(db, [("a", 500), ("a", 1), ("b", 1), ("b", 500)])
    claimed = await claim(db)
    # a's first item costs more than the whole budget: it starts, alone, and uses
    # the period up; b's dear item comes after a charge, so it waits for the next.
    assert sorted((c.limit_key, c.cost) for c in claimed) == [("a", 500.0), ("b", 1.0)]
    assert await claim(db) == []


async def test_an_item_without_a_cost_costs_one(db: dbm.Database) -> None:
    await submit(db, [("a", None)] * 5)
    assert spent(await claim(db, budget=3.0)) == {"a": 3.0}
    await submit(db, [("b", 50)] * 3)
    # Without a cost pointer every item costs 1, whatever its payload says.
    assert spent(await claim(db, budget=2.0, cost_path=None)) == {"b": 2.0}


async def test_a_reported_cost_corrects_the_charge_of_its_period(db: dbm.Database) -> None:
    await submit(db, [("a", 60), ("a", 60), ("a", 60)])
    (first,) = await claim(db)
    assert first.budget_period_start is not None
    q = store.Queries(db)
    # It cost 10, not 60: 90 left, room for one more 60.
    await q.correct_key_budgets(
        handlers=[HANDLER], keys=["a"], periods=[first.budget_period_start], deltas=[-50.0]
    )
    (second,) = await claim(db)
    assert json.loads(second.payload)["n"] == 1
    # A correction naming a period that is not the key's changes nothing.
    await q.correct_key_budgets(
        handlers=[HANDLER],
        keys=["a"],
        periods=[first.budget_period_start.replace(year=2000)],
        deltas=[-1000.0],
    )
    assert await claim(db) == []


async def test_the_next_period_has_the_whole_budget_again(db: dbm.Database) -> None:
    await submit(db, [("a", 60), ("a", 60)])
    (first,) = await claim(db, period_s=0.5)
    assert first.budget_period_start is not None
    start = first.budget_period_start.timestamp()
    got: list[store.KeyedClaimedItem] = []

    async def second_started() -> bool:
        got.extend(await claim(db, period_s=0.5))
        return bool(got)

    await eventually(second_started, timeout=5, what="the next period's claim")
    assert got[0].budget_period_start is not None
    assert got[0].budget_period_start.timestamp() >= start + 0.5
    assert time.time() >= start + 0.5
