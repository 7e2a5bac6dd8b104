"""supervisor.client against real daemons: the sync and async clients, typed
models and errors, the event stream, results, and a submission retried after
its answer was lost (exactly one batch)."""

from __future__ import annotations

import asyncio
import pathlib
import socket
import threading
from typing import Any

import pytest

from supervisor.client import (
    AsyncClient,
    Batch,
    Client,
    Conflict,
    ConnectionFailed,
    Event,
    Invalid,
    NotFound,
    Unauthorized,
)
from tests.daemon import DEFAULT_HANDLERS
from tests.pgharness import free_port
from tests.test_api import sha256hex

HANDLERS = dict(DEFAULT_HANDLERS) | {
    "steps": {"type": "python", "target": "tests.handlers:reports_progress", "timeout": "30s"},
}


def test_submit_wait_and_results_with_the_sync_client(daemons: Any) -> None:
    d = daemons()
    with Client(d.url) as bsv:
        b = bsv.submit("echo", [{"key": "a", "payload": 1}, 2, 3], metadata={"run": "x"})
        assert isinstance(b, Batch) and b.counts.total == 3 and b.metadata == {"run": "x"}
        assert b.raw["idempotency_key"]  # always sent: retries are safe
        seen: list[str] = []
        done = bsv.wait(b.id, timeout=30, on_event=lambda ev: seen.append(ev.kind))
        assert done.terminal and done.status == "completed" and done.counts.succeeded == 3
        assert seen[0] == "snapshot" and seen[-1] == "end" and seen.count("item") == 3
        results = list(bsv.iter_results(b.id))
        assert [r["status"] for r in results] == ["succeeded"] * 3
        assert results[0]["key"] == "a"
        items = list(bsv.items(b.id))
        assert [it.key for it in items] == ["a", None, None]
        one = bsv.get_item(items[0].id)
        assert one.errors == [] and one.status == "succeeded"
        assert [x.id for x in bsv.list_batches(handler="echo")] == [b.id]


def test_errors_are_typed_and_carry_the_problem(daemons: Any) -> None:
    d = daemons()
    with Client(d.url) as bsv:
        with pytest.raises(Invalid) as invalid:
            bsv.submit("echo", [1], priority=5000)
        assert invalid.value.status == 422 and invalid.value.errors[0]["path"] == "/priority"
        assert "422" in str(invalid.value) and "\n" not in str(invalid.value)
        with pytest.raises(NotFound):
            bsv.get_batch("00000000-0000-0000-0000-000000000000")
        first = bsv.submit("echo", [{"sleep": 5}], exclusive_key="portfolio:1")
        with pytest.raises(Conflict) as busy:
            bsv.submit("echo", [1], exclusive_key="portfolio:1")
        assert busy.value["active_batch_id"] == first.id
        bsv.cancel(first.id)
    with Client(f"http://127.0.0.1:{free_port()}", submit_retries=1) as nobody:
        with pytest.raises(ConnectionFailed, match="cannot reach"):
            nobody.submit("echo", [1])


def test_token_from_the_argument_or_the_environment(
    daemons: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    tokens = [
        {"name": "a", "tenant": "A", "sha256": sha256hex("tok-a"), "scopes": ["read", "write"]}
    ]
    d = daemons(extra={"auth": {"tokens": tokens}})
    with Client(d.url) as anonymous, pytest.raises(Unauthorized):
        anonymous.submit("echo", [1])
    with Client(d.url, token="tok-a") as bsv:
        assert bsv.get_batch(bsv.submit("echo", [1]).id).raw["tenant"] == "A"
    monkeypatch.setenv("BATCH_SUPERVISOR_URL", d.url)
    monkeypatch.setenv("BATCH_SUPERVISOR_TOKEN", "tok-a")
    with Client() as from_env:
        assert from_env.base_url == d.url
        assert from_env.submit("echo", [1]).raw["tenant"] == "A"


def test_the_async_client_streams_events_and_progress(daemons: Any, tmp_path: pathlib.Path) -> None:
    d = daemons(handlers=HANDLERS)
    gate = tmp_path / "go"

    async def go() -> tuple[list[Event], Batch]:
        async with AsyncClient(d.url) as bsv:
            b = await bsv.submit("steps", [{"total": 2, "holds": {"1": str(gate)}}])
            events: list[Event] = []
            async for ev in bsv.events(b.id):
                events.append(ev)
                if ev.kind == "progress" and ev.data["done"] == 1:
                    gate.touch()
            return events, await bsv.get_batch(b.id)

    events, final = asyncio.run(go())
    kinds = [e.kind for e in events]
    assert kinds[0] == "snapshot" and kinds[-1] == "end" and "progress" in kinds
    snapshot = events[0].batch
    assert snapshot is not None and snapshot.id == final.id
    assert final.status == "completed"


class DropFirstAnswer(threading.Thread):
    """A TCP proxy to the daemon that forwards the first connection's request,
    then closes that connection as the answer starts to arrive: the daemon did the
    work, the client never hears of it (a network failure at the worst moment)."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.target = port
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.connections = 0

    def run(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(
                target=self._serve, args=(client, self.connections == 1), daemon=True
            ).start()

    def _serve(self, client: socket.socket, drop: bool) -> None:
        upstream = socket.create_connection(("127.0.0.1", self.target))

        def pump(src: socket.socket, dst: socket.socket) -> None:
            try:
                while data := src.recv(65536):
                    dst.sendall(data)
            except OSError:
                pass
            finally:
                for s in (src, dst):
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

        threading.Thread(target=pump, args=(client, upstream), daemon=True).start()
        if drop:
            upstream.recv(1)  # the daemon answers: the batch is committed
            client.close()
            upstream.close()
            return
        pump(upstream, client)

    def close(self) -> None:
        self.sock.close()


def test_a_submission_whose_answer_was_lost_is_retried_into_the_same_batch(
    daemons: Any,
) -> None:
    d = daemons()
    proxy = DropFirstAnswer(d.port)
    proxy.start()
    try:
        with Client(f"http://127.0.0.1:{proxy.port}") as bsv:
            b = bsv.submit("echo", [1, 2])
        assert proxy.connections >= 2  # the first answer was lost, then retried
    finally:
        proxy.close()
    code, page, _ = d.api("GET", "/v1/batches")
    assert code == 200
    assert [x["id"] for x in page["batches"]] == [b.id]  # one batch, not two
