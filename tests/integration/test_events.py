"""The LISTEN/NOTIFY bridge (supervisor/events.py) against the real database:
wake-ups, per-batch change notices and controls reach their consumers, the
delivery probe stays internal, and a lost LISTEN session is reopened."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable

import anyio
import asyncpg
import pytest

from supervisor import db as dbm
from supervisor import events, store
from tests.integration import support
from tests.integration.support import claim, eventually, new_lease, submit

pytestmark = pytest.mark.anyio


class Heard:
    """Everything the bus handed to its consumers."""

    def __init__(self, bus: events.Bus) -> None:
        self.wake: list[str] = []
        self.cancel: list[str] = []
        self.pause: list[str] = []
        bus.on_wake = self.wake.append
        bus.on_cancel = self.cancel.append
        bus.on_pause = self.pause.append


@pytest.fixture
async def bus(db: dbm.Database, db_url: str) -> AsyncIterator[events.Bus]:
    """A started bus (its LISTEN session open), as app.py starts it."""
    b = events.Bus(db, db_url, db.schema)
    HEARD[id(b)] = Heard(b)
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(b.run)
            yield b
            tg.cancel_scope.cancel()
    finally:
        del HEARD[id(b)]


HEARD: dict[int, Heard] = {}


def heard(bus: events.Bus) -> Heard:
    return HEARD[id(bus)]


async def until(pred: Callable[[], object], what: str) -> None:
    async def check() -> bool:
        return bool(pred())

    await eventually(check, what=what)


async def caught_up(bus: events.Bus, conn: asyncpg.Connection) -> None:
    """Until every notice committed so far has been dispatched (one queue, in commit
    order: a marker sent now arrives after them)."""
    marker = f"marker:{uuid.uuid4()}"
    await conn.execute("SELECT pg_notify('supervisor_wake', $1)", marker)
    await until(lambda: marker in heard(bus).wake, "the marker notice")


async def test_it_listens_on_the_schemas_channels_once_started(
    bus: events.Bus, conn: asyncpg.Connection
) -> None:
    assert bus.listening
    assert bus.channels == {
        "wake": "supervisor_wake",
        "batch": "supervisor_batch",
        "control": "supervisor_control",
        "schedule": "supervisor_schedule",
    }
    # Started means listening: consumers catch up on what happened before.
    assert heard(bus).wake == ["reconnect"]
    listening = await conn.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND query LIKE 'LISTEN %'"
    )
    assert listening == 1


async def test_wake_notifications_reach_on_wake_but_the_probe_does_not(
    bus: events.Bus, db: dbm.Database, conn: asyncpg.Connection
) -> None:
    await submit(db, 1, handler="resize")  # a submission wakes the daemons of its handler
    await conn.execute("SELECT pg_notify('supervisor_wake', 'from-another-daemon')")

    await until(lambda: len(heard(bus).wake) >= 3, "two wake-ups")
    assert heard(bus).wake == ["reconnect", "resize", "from-another-daemon"]
    assert not any(p.startswith("probe:") for p in heard(bus).wake)


async def test_a_batch_change_wakes_only_that_batchs_subscribers(
    bus: events.Bus, db: dbm.Database, conn: asyncpg.Connection
) -> None:
    changed, other = await submit(db, 1), await submit(db, 1)
    q = store.Queries(db)
    await caught_up(bus, conn)  # the submissions' own notices are past
    with bus.subscribe(str(changed)) as w1, bus.subscribe(str(other)) as w2:
        assert await q.pause_batch(changed, tenant=None, actor="test", pause=True) == (
            store.ControlResult(store.ControlKind.OK)
        )
        with anyio.fail_after(support.WAIT_S):
            assert await w1.wait(support.WAIT_S)
        assert not await w2.wait(0)
        # Consumed: a Wakeup fires once per change.
        assert not await w1.wait(0)
    assert heard(bus).pause == [str(changed)]


async def test_cancelling_a_batch_with_running_items_reaches_on_cancel(
    bus: events.Bus, db: dbm.Database, conn: asyncpg.Connection
) -> None:
    bid = await submit(db, 2)
    await claim(db, new_lease(), 1)
    await caught_up(bus, conn)
    with bus.subscribe(str(bid)) as w:
        result = await store.Queries(db).cancel_batch(bid, tenant=None, actor="test")
        assert result == store.ControlResult(store.ControlKind.OK)
        assert await w.wait(support.WAIT_S)
    await until(lambda: heard(bus).cancel, "the cancel notice")
    assert heard(bus).cancel == [str(bid)]


async def test_close_streams_wakes_every_subscriber(bus: events.Bus) -> None:
    with bus.subscribe(str(uuid.uuid4())) as w1, bus.subscribe(str(uuid.uuid4())) as w2:
        assert not bus.closing
        bus.close_streams()
        assert bus.closing
        assert await w1.wait(0) and await w2.wait(0)


async def test_a_lost_listen_session_is_reopened_and_consumers_catch_up(
    bus: events.Bus, conn: asyncpg.Connection
) -> None:
    quiet = str(uuid.uuid4())  # no notice ever names it: only a catch-up wakes it
    with bus.subscribe(quiet) as w:
        assert not await w.wait(0)
        killed = await conn.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND query LIKE 'LISTEN %'"
        )
        assert killed == 1
        await until(lambda: not bus.listening, "the loss noticed")
        await until(lambda: bus.listening, "listening again")
        # Anything may have changed while deaf: every consumer is woken.
        assert heard(bus).wake == ["reconnect", "reconnect"]
        assert await w.wait(0)

    await conn.execute("SELECT pg_notify('supervisor_wake', 'after-reconnect')")
    await until(lambda: "after-reconnect" in heard(bus).wake, "a wake-up on the new session")
