"""Completion callbacks (supervisor/callbacks.py) against the real database: a
finished batch's pending callback is claimed, run with the batch and its summary,
and recorded; retries, a missing handler and a shutdown mid-callback."""

from __future__ import annotations

import json
import os
import pwd
import uuid
from collections.abc import AsyncIterator
from typing import Any

import anyio
import asyncpg
import pytest

from supervisor import callbacks, handlers, store
from supervisor import db as dbm
from supervisor.config import Config
from supervisor.metrics import Metrics
from supervisor.models import Item
from tests.integration import support
from tests.integration.support import eventually, finished_batch, get_batch

pytestmark = pytest.mark.anyio
RECEIVED: list[Item] = []  # what record_callback was called with, in order


async def record_callback(item: Item) -> Any:
    """A completion callback that keeps what it was given."""
    RECEIVED.append(item)
    return {"ok": True}


def python_handler(target: str, **extra: Any) -> dict[str, Any]:
    # A python handler runs as the daemon's own account; saying so explicitly keeps
    # the test valid when the suite runs as root.
    me = pwd.getpwuid(os.geteuid()).pw_name
    return {"type": "python", "target": target, "user": me, **extra}


def make_config(**worker: str) -> Config:
    return support.make_config(
        worker={"name": "cb-worker", "poll_interval": "50ms", "drain_timeout": "0s", **worker},
        handlers={
            "records": python_handler("tests.integration.test_callbacks:record_callback"),
            "raises": python_handler(
                "tests.handlers:callback_raises",
                max_attempts=2,
                retry_backoff={"initial": "10ms", "max": "10ms"},
            ),
            "hangs": python_handler("tests.handlers:sleeper"),
        },
    )


class Running:
    """A Callbacks component running in a task group, stopped at the end."""

    def __init__(self, cfg: Config, db: dbm.Database) -> None:
        self.lease = support.new_lease()
        self.metrics = Metrics()
        self.handlers = handlers.build_all(cfg)
        self.cbs = callbacks.Callbacks(cfg, db, self.handlers, self.lease, self.metrics)

    def count(self, outcome: str) -> float:
        v = self.metrics.registry.get_sample_value(
            "batch_supervisor_callbacks_total", {"outcome": outcome}
        )
        return v or 0.0


@pytest.fixture(autouse=True)
def _fresh_record() -> None:
    RECEIVED.clear()


@pytest.fixture
async def running(db: dbm.Database) -> AsyncIterator[Running]:
    r = Running(make_config(), db)
    async with anyio.create_task_group() as tg:
        await tg.start(r.cbs.run)
        yield r
        r.cbs.stop_claiming()  # a clean stop ends run() by itself
    await handlers.close_all(r.handlers)


async def callback_done(db: dbm.Database, bid: uuid.UUID) -> store.BatchRow:
    async def done() -> bool:
        return (await get_batch(db, bid)).callback_state in ("succeeded", "failed")

    await eventually(done, what="the callback finished")
    return await get_batch(db, bid)


async def test_a_finished_batch_gets_its_callback_with_the_batch_and_summary(
    db: dbm.Database, running: Running
) -> None:
    bid = await finished_batch(db, 2, callback_handler="records")

    b = await callback_done(db, bid)

    assert (b.callback_state, b.callback_attempts, b.callback_error) == ("succeeded", 1, None)
    assert (b.callback_lease, b.callback_worker) == (None, "cb-worker")
    assert b.status == "completed"
    (item,) = RECEIVED
    assert (item.id, item.batch_id, item.attempt, item.handler) == (
        f"callback:{bid}",
        str(bid),
        1,
        "records",
    )
    assert item.payload["batch"]["id"] == str(bid)
    summary = item.payload["summary"]
    assert (summary["batch_id"], summary["status"], summary["final"]) == (
        str(bid),
        "completed",
        True,
    )
    assert summary["counts"]["succeeded"] == 2
    log = [e.action for e in await store.Queries(db).batch_log(bid)]
    assert log.count("callback_succeeded") == 1
    assert running.count("succeeded") == 1.0


async def test_a_callback_handler_not_configured_fails_the_callback_only(
    db: dbm.Database, running: Running
) -> None:
    bid = await finished_batch(db, 1, callback_handler="nowhere")

    b = await callback_done(db, bid)

    assert (b.callback_state, b.callback_attempts, b.status) == ("failed", 1, "completed")
    err = json.loads(b.callback_error or "{}")
    assert err["type"] == "HandlerNotConfigured"
    assert "'nowhere'" in err["message"]
    assert (err["attempt"], err["worker"]) == (1, "cb-worker")
    assert RECEIVED == []
    assert running.count("failed") == 1.0


async def test_a_failing_callback_is_retried_until_its_attempts_are_spent(
    db: dbm.Database, running: Running
) -> None:
    bid = await finished_batch(db, 1, callback_handler="raises")

    b = await callback_done(db, bid)

    assert (b.callback_state, b.callback_attempts, b.status) == ("failed", 2, "completed")
    err = json.loads(b.callback_error or "{}")
    assert (err["type"], err["message"], err["attempt"]) == (
        "RuntimeError",
        "summary service is down",
        2,
    )
    log = [e.action for e in await store.Queries(db).batch_log(bid)]
    assert log.count("callback_failed") == 1
    assert (running.count("retried"), running.count("failed")) == (1.0, 1.0)


async def test_a_batch_without_a_callback_handler_is_left_alone(
    db: dbm.Database, running: Running
) -> None:
    plain = await finished_batch(db, 1)
    marker = await finished_batch(db, 1, callback_handler="records")
    await callback_done(db, marker)  # the component has been around the loop since

    b = await get_batch(db, plain)
    assert (b.callback_state, b.callback_attempts) == ("none", 0)
    assert [i.batch_id for i in RECEIVED] == [str(marker)]


async def test_wake_claims_a_new_callback_without_waiting_for_the_poll(
    db: dbm.Database, conn: asyncpg.Connection
) -> None:
    r = Running(make_config(poll_interval="30s"), db)  # the idle wait: 60s

    async def first_claim_answered() -> bool:
        n = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND state = 'idle' AND query = $1",
            db.sql("claim_callbacks"),
        )
        return bool(n)

    async with anyio.create_task_group() as tg:
        await tg.start(r.cbs.run)
        # The first claim found nothing: from now on only wake() (or 60s) claims again.
        await eventually(first_claim_answered, what="the first, empty claim")
        bid = await finished_batch(db, 1, callback_handler="records")
        r.cbs.wake()
        b = await callback_done(db, bid)
        r.cbs.stop_claiming()
    assert b.callback_state == "succeeded"


async def test_a_callback_running_at_shutdown_goes_back_to_pending(db: dbm.Database) -> None:
    r = Running(make_config(), db)
    bid = await finished_batch(db, 1, callback_handler="hangs")

    async with anyio.create_task_group() as tg:
        await tg.start(r.cbs.run)

        async def claimed() -> bool:
            return (await get_batch(db, bid)).callback_state == "running"

        await eventually(claimed, what="the callback claimed")
        r.cbs.stop_claiming()  # drain_timeout 0s: the running callback is stopped
    # run() returned: the stop is complete, and the callback was handed back.

    b = await get_batch(db, bid)
    assert (b.callback_state, b.callback_lease, b.callback_error) == ("pending", None, None)
    assert b.status == "completed"
    # Another daemon can claim it now.
    (again,) = await store.Queries(db).claim_callbacks(
        limit=1, lease=uuid.uuid4(), worker="next-daemon"
    )
    assert (again.id, again.callback_attempts) == (bid, 2)
