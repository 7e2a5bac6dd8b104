"""Worker registration and heartbeats (supervisor/heartbeat.py) against the real
database: the worker row, the name lock against a live holder, reclaiming a gone
predecessor, re-registration after being reaped, deregistration."""

from __future__ import annotations

import os
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator

import anyio
import asyncpg
import pytest

from supervisor import db as dbm
from supervisor import heartbeat, store
from supervisor.errors import ConfigError
from tests.integration import support
from tests.integration.support import claim, error_type, eventually, items_of, new_lease, submit

pytestmark = pytest.mark.anyio
NAME = "hb-worker"


class Node:
    """One daemon's view: its mutable state and in-flight count, and what it reclaimed."""

    def __init__(self) -> None:
        self.state = "running"
        self.in_flight = 0
        self.reclaimed: list[store.Transitions] = []


def make(
    db: dbm.Database, lease: str | None = None, **worker: str
) -> tuple[heartbeat.Heartbeat, Node]:
    cfg = support.make_config(
        worker={
            "name": NAME,
            "concurrency": 7,
            "heartbeat_interval": "50ms",
            "dead_after": "500ms",
            **worker,
        }
    )
    node = Node()
    hb = heartbeat.Heartbeat(
        cfg,
        db,
        lease or new_lease(),
        lambda: node.state,
        lambda: node.in_flight,
        node.reclaimed.append,
    )
    return hb, node


async def worker_rows(conn: asyncpg.Connection) -> dict[str, asyncpg.Record]:
    rows = await conn.fetch("SELECT * FROM supervisor.workers")
    return {str(r["id"]): r for r in rows}


async def set_host(conn: asyncpg.Connection, lease: str, host: str) -> None:
    await conn.execute(
        "UPDATE supervisor.workers SET host = $2 WHERE id = $1", uuid.UUID(lease), host
    )


@pytest.fixture
def daemon_process() -> Iterator[int]:
    """A process on this host whose arguments say batch-supervisor (a live daemon)."""
    p = subprocess.Popen(["bash", "-c", "exec -a batch-supervisor sleep 60"])
    try:
        deadline = time.monotonic() + support.WAIT_S
        while not _cmdline(p.pid).startswith(b"batch-supervisor\0"):  # until exec is done
            assert time.monotonic() < deadline, "the stand-in daemon did not start"
            time.sleep(0.01)
        yield p.pid
    finally:
        p.kill()
        p.wait()


def _cmdline(pid: int) -> bytes:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read()


async def test_register_creates_the_worker_row(db: dbm.Database, conn: asyncpg.Connection) -> None:
    hb, node = make(db)
    assert await worker_rows(conn) == {}

    await hb.register()

    rows = await worker_rows(conn)
    assert list(rows) == [hb.lease]
    row = rows[hb.lease]
    assert (row["name"], row["host"], row["pid"]) == (NAME, socket.gethostname(), os.getpid())
    assert (row["state"], row["concurrency"]) == ("running", 7)
    assert node.reclaimed == []
    assert hb.stalled() == ""


async def test_beats_publish_state_and_load_and_wake_beats_at_once(
    db: dbm.Database, conn: asyncpg.Connection
) -> None:
    # The default interval (5s) is far beyond the wait: only wake() can beat in time.
    hb, node = make(db, heartbeat_interval="5s", dead_after="30s")
    await hb.register()
    first = (await worker_rows(conn))[hb.lease]["heartbeat_at"]

    async with anyio.create_task_group() as tg:
        await tg.start(hb.run)
        node.state, node.in_flight = "draining", 3
        hb.wake()

        async def published() -> bool:
            row = (await worker_rows(conn))[hb.lease]
            return (row["state"], row["in_flight"]) == ("draining", 3)

        await eventually(published, what="the woken beat")
        tg.cancel_scope.cancel()
    assert (await worker_rows(conn))[hb.lease]["heartbeat_at"] > first


async def test_a_second_registration_while_the_first_heartbeats_is_refused(
    db: dbm.Database, conn: asyncpg.Connection
) -> None:
    first, _ = make(db)
    await first.register()
    # Its daemon runs on another host: only a heartbeat that moves proves it alive.
    await set_host(conn, first.lease, "elsewhere.example")
    second, node = make(db)

    async with anyio.create_task_group() as tg:
        await tg.start(first.run)
        with anyio.fail_after(support.WAIT_S), pytest.raises(ConfigError) as err:
            await second.register()
        tg.cancel_scope.cancel()

    (problem,) = err.value.problems
    assert problem.startswith(f"worker.name: {NAME!r} is held by a live daemon")
    assert "elsewhere.example" in problem and "still heartbeating" in problem
    assert set(await worker_rows(conn)) == {first.lease}  # the holder keeps its row
    assert node.reclaimed == []


async def test_a_name_held_by_a_daemon_process_on_this_host_is_refused_at_once(
    db: dbm.Database, daemon_process: int
) -> None:
    await store.Queries(db).register_worker(
        lease=uuid.uuid4(), name=NAME, host=socket.gethostname(), pid=daemon_process, concurrency=1
    )
    hb, _ = make(db)

    with anyio.fail_after(0.4), pytest.raises(ConfigError) as err:  # less than dead_after
        await hb.register()

    assert f"pid {daemon_process}" in err.value.problems[0]


async def test_an_earlier_life_under_the_name_is_reclaimed_at_registration(
    db: dbm.Database, conn: asyncpg.Connection
) -> None:
    bid = await submit(db, 3)
    earlier, _ = make(db)
    await earlier.register()  # same host and pid: a restart of this very process
    held = await claim(db, earlier.lease, 2, worker=NAME)
    orphan = new_lease()  # an even earlier life: items running, no worker row
    (orphaned,) = await claim(db, orphan, 1, worker=NAME)
    hb, node = make(db)

    with anyio.fail_after(0.4):  # at once: no waiting for dead_after
        await hb.register()

    assert set(await worker_rows(conn)) == {hb.lease}
    (done,) = node.reclaimed
    assert done.statuses == {c.id: "queued" for c in [*held, orphaned]}
    items = await items_of(db, bid)
    assert {(i.status, error_type(i)) for i in items.values()} == {("queued", "WorkerLost")}


async def test_a_silent_registration_on_another_host_is_waited_out_then_reclaimed(
    db: dbm.Database, conn: asyncpg.Connection
) -> None:
    bid = await submit(db, 1)
    gone, _ = make(db)
    await gone.register()
    await set_host(conn, gone.lease, "elsewhere.example")
    (item,) = await claim(db, gone.lease, 1, worker=NAME)
    hb, node = make(db)

    start = time.monotonic()
    with anyio.fail_after(support.WAIT_S):
        await hb.register()
    took = time.monotonic() - start

    assert took >= 0.4  # its heartbeat had to go stale (dead_after 500ms) first
    assert set(await worker_rows(conn)) == {hb.lease}
    assert node.reclaimed[0].statuses == {item.id: "queued"}
    assert (await items_of(db, bid))[item.id].status == "queued"


async def test_a_beat_registers_again_after_the_row_was_reaped(
    db: dbm.Database, conn: asyncpg.Connection
) -> None:
    hb, _ = make(db)
    await hb.register()
    await store.Queries(db).delete_workers([uuid.UUID(hb.lease)])
    assert await worker_rows(conn) == {}

    await hb.beat()

    rows = await worker_rows(conn)
    assert list(rows) == [hb.lease]
    assert rows[hb.lease]["name"] == NAME


async def test_deregister_removes_the_row_and_later_beats_do_not_restore_it(
    db: dbm.Database, conn: asyncpg.Connection
) -> None:
    hb, _ = make(db)
    other, _ = make(db, name="someone-else")
    await hb.register()
    await other.register()

    await hb.deregister()

    assert set(await worker_rows(conn)) == {other.lease}
    await hb.beat()
    assert set(await worker_rows(conn)) == {other.lease}
    assert hb.stalled() == ""


async def test_stalled_says_so_past_dead_after_and_recovers_with_beats(
    db: dbm.Database,
) -> None:
    hb, _ = make(db, heartbeat_interval="50ms", dead_after="200ms")
    await hb.register()
    assert hb.stalled() == ""

    async def stalled() -> bool:
        return hb.stalled() != ""

    await eventually(stalled, what="stalled without beats")
    assert "worker.dead_after is exceeded" in hb.stalled()

    async def recovered() -> bool:
        return hb.stalled() == ""

    async with anyio.create_task_group() as tg:
        await tg.start(hb.run)
        await eventually(recovered, what="recovery once it beats")
        tg.cancel_scope.cancel()
