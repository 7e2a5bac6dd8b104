"""Workers run their attempts in one cancel scope each; stopping an attempt (timeout,
batch cancelled) cancels that scope, and the worker's next attempt gets a fresh one
(supervisor.dispatcher.Dispatcher._work/_run_item/_watch_deadlines). No database:
the outcomes are read where the dispatcher hands them over (the outbox)."""

from __future__ import annotations

import json
import uuid
from typing import Any

import anyio
import pytest

from supervisor import config, dispatcher, progress, states, store
from supervisor.executor import OutcomeRecord
from supervisor.models import Item


class Outbox:
    """Collects what the dispatcher hands over for writing."""

    def __init__(self) -> None:
        self.records: list[OutcomeRecord] = []
        self.pending = 0

    def put(self, rec: OutcomeRecord) -> None:
        self.records.append(rec)


class Handler:
    """payload "slow": sleeps past the timeout; "stubborn": swallows its
    cancellation and returns; anything else: returned after one checkpoint (where
    a cancellation still pending would land)."""

    def __init__(self, hcfg: config.HandlerConfig) -> None:
        self.config = hcfg

    async def run(self, item: Item) -> Any:
        if item.payload == "slow":
            await anyio.sleep(30)
        if item.payload == "stubborn":
            try:
                await anyio.sleep(30)
            except anyio.get_cancelled_exc_class():
                return "stubborn finished"  # a handler that ignores being stopped
        await anyio.sleep(0)
        return item.payload


def batch_id(name: str) -> uuid.UUID:
    return uuid.uuid5(uuid.NAMESPACE_URL, name)


async def run_items(payloads: list[tuple[str, str]], stop_batch: str | None = None) -> Outbox:
    """Run (batch, payload) items on one worker; returns the outbox once all ended."""
    cfg = config.from_mapping(
        {
            "worker": {"concurrency": 1},
            "handlers": {"h": {"type": "python", "target": "x:y", "timeout": "200ms"}},
        }
    )
    outbox = Outbox()
    d = dispatcher.Dispatcher(
        cfg,
        None,  # type: ignore[arg-type]  # workers never touch the database
        {"h": Handler(cfg.handlers["h"])},  # type: ignore[dict-item]
        outbox,  # type: ignore[arg-type]
        str(uuid.uuid4()),
        progress.Reports(None, uuid.uuid4()),  # type: ignore[arg-type]  # nothing reports
    )
    for n, (batch, payload) in enumerate(payloads):
        claimed = store.ClaimedItem(
            id=n + 1,
            batch_id=batch_id(batch),
            key=None,
            payload=json.dumps(payload),
            attempts=1,
            max_attempts=3,
            batch_metadata="{}",
        )
        d._enqueue("h", claimed)
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(d._work)
            tg.start_soon(d._watch_deadlines)
            if stop_batch is not None:
                while not d._running:
                    await anyio.sleep(0.01)
                assert d.cancel_batch(str(batch_id(stop_batch))) == 1
            while len(outbox.records) < len(payloads):
                await anyio.sleep(0.01)
            tg.cancel_scope.cancel()
    return outbox


def outcomes(outbox: Outbox) -> list[tuple[int, states.Outcome, str | None]]:
    return [(r.item_id, r.outcome, r.result_json) for r in outbox.records]


@pytest.mark.anyio
async def test_a_timed_out_attempt_is_retried_and_the_next_one_runs() -> None:
    outbox = await run_items([("b", "slow"), ("b", "fast")])
    assert outcomes(outbox) == [
        (1, states.Outcome.RETRY, None),
        (2, states.Outcome.SUCCEEDED, '"fast"'),
    ]
    error = json.loads(outbox.records[0].error_json or "{}")
    assert error["type"] == "Timeout"
    assert 0.2 <= outbox.records[0].duration_s < 2.0


@pytest.mark.anyio
async def test_a_handler_that_swallows_its_stop_does_not_stop_the_next_item() -> None:
    # The swallowed cancellation leaves the worker's scope cancelled: without a
    # fresh scope the next item would be cancelled before it started.
    outbox = await run_items([("b", "stubborn"), ("b", "fast")])
    assert outcomes(outbox) == [
        (1, states.Outcome.SUCCEEDED, '"stubborn finished"'),
        (2, states.Outcome.SUCCEEDED, '"fast"'),
    ]


@pytest.mark.anyio
async def test_a_cancelled_batch_stops_only_its_attempt() -> None:
    outbox = await run_items([("stopped", "slow"), ("other", "fast")], stop_batch="stopped")
    assert outcomes(outbox) == [
        (1, states.Outcome.CANCELLED, None),
        (2, states.Outcome.SUCCEEDED, '"fast"'),
    ]
