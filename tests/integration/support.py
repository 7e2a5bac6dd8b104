"""Helpers of the integration tier: batches submitted, claimed and finished through
the same calls the daemon makes, and a bounded wait for a database condition."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

from supervisor import batches, config, states, store
from supervisor import db as dbm
from supervisor.executor import OutcomeRecord

HANDLER = "work"
WAIT_S = 2.0


def make_config(**sections: dict[str, Any]) -> config.Config:
    """A validated Config; ``worker.name`` defaults to a fixed test name."""
    raw: dict[str, Any] = {"worker": {"name": "it-worker"}}
    for name, section in sections.items():
        raw[name] = {**raw.get(name, {}), **section}
    return config.from_mapping(raw)


def new_lease() -> str:
    return str(uuid.uuid4())


async def submit(
    db: dbm.Database,
    n: int,
    *,
    handler: str = HANDLER,
    attempt_budget: int = 3,
    callback_handler: str | None = None,
) -> uuid.UUID:
    """A batch of ``n`` items (payloads 0..n-1) under ``handler``."""
    nb = batches.NewBatch(handler=handler, items=[(f"k{i}", json.dumps(i)) for i in range(n)])
    sub = await batches.submit(
        db,
        nb,
        tenant="t",
        actor="test",
        attempt_budget=attempt_budget,
        callback_handler=callback_handler,
    )
    return uuid.UUID(sub.batch["id"])


async def claim(
    db: dbm.Database, lease: str, n: int, *, handler: str = HANDLER, worker: str = "it-worker"
) -> list[store.ClaimedItem]:
    """Claim up to ``n`` items as a daemon's dispatcher does (persisted as running)."""
    return await store.Queries(db).claim_items(
        handler=handler,
        limit=n,
        worker=worker,
        lease=uuid.UUID(lease),
        global_cap=None,
        rate=None,
        burst=1.0,
    )


def outcome(
    item: store.ClaimedItem,
    lease: str,
    kind: states.Outcome = states.Outcome.SUCCEEDED,
    *,
    attempt: int | None = None,
    result_json: str | None = None,
    error_json: str | None = None,
    delay_s: float = 0.0,
    handler: str = HANDLER,
) -> OutcomeRecord:
    """The outbox record of one attempt of ``item`` (its current attempt by default)."""
    if result_json is None and kind is states.Outcome.SUCCEEDED:
        result_json = json.dumps({"done": item.id})
    return OutcomeRecord(
        item_id=item.id,
        batch_id=str(item.batch_id),
        attempt=item.attempts if attempt is None else attempt,
        lease=lease,
        handler=handler,
        outcome=kind,
        result_json=result_json,
        error_json=error_json,
        delay_s=delay_s,
        duration_s=0.01,
    )


async def succeed_all(db: dbm.Database, lease: str, claimed: list[store.ClaimedItem]) -> None:
    """Write a success for every claimed item, as one outbox write would."""
    recs = [outcome(c, lease) for c in claimed]
    await store.Queries(db).apply_outcomes(
        store.Outcomes(
            lease=uuid.UUID(lease),
            batches=sorted({c.batch_id for c in claimed}),
            ids=[r.item_id for r in recs],
            attempts=[r.attempt for r in recs],
            outcomes=[r.outcome.value for r in recs],
            results=[r.result_json for r in recs],
            errors=[r.error_json for r in recs],
            delays=[r.delay_s for r in recs],
            actor="test",
        )
    )


async def finished_batch(
    db: dbm.Database, n: int = 2, *, callback_handler: str | None = None
) -> uuid.UUID:
    """A batch whose ``n`` items all succeeded (status completed)."""
    bid = await submit(db, n, callback_handler=callback_handler)
    lease = new_lease()
    claimed = await claim(db, lease, n)
    assert len(claimed) == n
    await succeed_all(db, lease, claimed)
    row = await get_batch(db, bid)
    assert row.status == states.BatchStatus.COMPLETED, row
    return bid


async def get_batch(db: dbm.Database, batch_id: uuid.UUID) -> store.BatchRow:
    row = await store.Queries(db).get_batch(batch_id, tenant=None)
    assert row is not None, f"batch {batch_id} is gone"
    return row


async def items_of(db: dbm.Database, batch_id: uuid.UUID) -> dict[int, store.ItemRow]:
    rows = await store.Queries(db).list_items(batch_id=batch_id, status=None, after=0, limit=1000)
    return {r.id: r for r in rows}


def error_type(item: store.ItemRow) -> str | None:
    """The type of the item's newest error entry."""
    return None if item.error is None else str(json.loads(item.error)["type"])


async def eventually(
    check: Callable[[], Awaitable[bool]], *, timeout: float = WAIT_S, what: str = "condition"
) -> float:
    """Poll ``check`` until it is true; fail after ``timeout`` seconds. Returns the
    seconds it took."""
    start = time.monotonic()
    try:
        with anyio.fail_after(timeout):
            while not await check():
                await anyio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(f"{what} not reached within {timeout}s") from None
    return time.monotonic() - start
