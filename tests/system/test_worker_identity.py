"""Worker identity: two daemons on one host never reclaim each other's live work.

The worker name is what a restarted daemon uses to find its predecessor's items
and reclaim them at once. If two live daemons shared a name, the second would
"reclaim" (re-run, and record a false WorkerLost on) everything the first is
running. So the default name is unique per daemon on a host, a name held by a
live daemon is refused, and only a provably gone predecessor is reclaimed early.
"""

from __future__ import annotations

import asyncio
import socket
import uuid
from typing import Any

import asyncpg

from tests.conftest import DaemonFactory
from tests.daemon import Daemon, wait_for
from tests.system.test_operations import all_running_on, item_detail, workers

N = 3


def _lost(d: Daemon, batch_id: str) -> list[dict[str, Any]]:
    return [
        e
        for it in d.items(batch_id)
        for e in item_detail(d, it["id"])["errors"]
        if e["type"] == "WorkerLost"
    ]


def test_default_names_are_unique_per_daemon_on_a_host(daemons: DaemonFactory) -> None:
    a = daemons("a", worker={"name": None})
    host = socket.gethostname()
    assert [w["name"] for w in workers(a)] == [f"{host}:{a.port}"]
    batch = a.submit("sleeper", [{"sleep": 3600, "n": i} for i in range(N)])
    wait_for(lambda: all_running_on(a, batch["id"], f"{host}:{a.port}", N), 10, what="a runs")

    b = daemons("b", worker={"name": None})  # same host, same defaults, its own port
    assert sorted(w["name"] for w in workers(b)) == sorted([f"{host}:{a.port}", f"{host}:{b.port}"])
    # a's items are still a's first attempt: b did not take them as "its previous life".
    assert all_running_on(a, batch["id"], f"{host}:{a.port}", N)
    assert all(i["attempts"] == 1 for i in a.items(batch["id"]))
    assert _lost(a, batch["id"]) == []
    assert "reclaimed_previous" not in b.log(), b.log()


def test_a_name_held_by_a_live_daemon_is_refused(daemons: DaemonFactory) -> None:
    a = daemons("a", worker={"name": "shared"})
    batch = a.submit("sleeper", [{"sleep": 3600, "n": i} for i in range(N)])
    wait_for(lambda: all_running_on(a, batch["id"], "shared", N), 10, what="a runs")

    b = daemons("b", start=False, worker={"name": "shared"})
    b.start(wait=False)
    assert b.wait_exit(30) == 78, b.log()
    message = b.log()
    assert "worker.name: 'shared' is held by a live daemon" in message, message
    assert f"pid {a.pid}" in message, message
    assert "Traceback" not in message, message

    assert all_running_on(a, batch["id"], "shared", N)
    assert all(i["attempts"] == 1 for i in a.items(batch["id"]))
    assert _lost(a, batch["id"]) == []


def test_a_restart_reclaims_its_killed_predecessor_at_once(daemons: DaemonFactory) -> None:
    # dead_after is long: only the "provably gone" rule can explain a quick reclaim.
    worker = {"name": "same", "dead_after": "10m", "heartbeat_interval": "500ms"}
    a = daemons("a", worker=worker)
    batch = a.submit("sleeper", [{"sleep": 0.2 if i else 3600, "n": i} for i in range(N)])
    wait_for(lambda: any(i["status"] == "running" for i in a.items(batch["id"])), 10)
    a.kill()

    a2 = daemons("a2", worker=worker)
    assert "heartbeat.reclaimed_previous name=same" in a2.log(), a2.log()
    lost = _lost(a2, batch["id"])
    assert lost and all(e["worker"] == "same" for e in lost), lost


def test_a_beating_registration_on_another_host_is_refused(
    daemons: DaemonFactory, db_url: str
) -> None:
    """A row we cannot check locally (another host) counts as live once its
    heartbeat moves; the daemon waits for that instead of taking its items."""

    async def beat_until(stop: asyncio.Event) -> None:
        conn = await asyncpg.connect(db_url)
        try:
            await conn.execute(
                "INSERT INTO supervisor.workers (id, name, host, pid, concurrency) "
                "VALUES ($1, 'elsewhere', 'other-host', 4242, 1)",
                uuid.uuid4(),
            )
            while not stop.is_set():
                await conn.execute(
                    "UPDATE supervisor.workers SET heartbeat_at = now() WHERE name = 'elsewhere'"
                )
                try:
                    await asyncio.wait_for(stop.wait(), 0.3)
                except TimeoutError:
                    pass
        finally:
            await conn.close()

    b = daemons("b", start=False, worker={"name": "elsewhere", "dead_after": "1m"})

    async def go() -> int:
        stop = asyncio.Event()
        beater = asyncio.create_task(beat_until(stop))
        try:
            await asyncio.sleep(0.5)
            b.start(wait=False)
            return await asyncio.to_thread(b.wait_exit, 30)
        finally:
            stop.set()
            await beater

    assert asyncio.run(go()) == 78, b.log()
    assert "host other-host, pid 4242" in b.log(), b.log()
