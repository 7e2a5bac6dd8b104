"""The "auto" prefetch window: nothing beyond concurrency for slow handlers, grown
for fast ones,
and what counts against it (supervisor.dispatcher.Dispatcher.window/free_slots)."""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest

from supervisor import config, dispatcher


class FakeOutbox:
    pending = 0


def make(worker: dict[str, Any]) -> tuple[dispatcher.Dispatcher, FakeOutbox]:
    cfg = config.from_mapping({"worker": worker})
    outbox = FakeOutbox()
    d = dispatcher.Dispatcher(cfg, None, {}, outbox, str(uuid.uuid4()))  # type: ignore[arg-type]
    return d, outbox


def run_at(monkeypatch: pytest.MonkeyPatch, d: dispatcher.Dispatcher, rate: float) -> int:
    """Feed ``rate`` finished attempts per second for two seconds of fake time; the window then."""
    clock = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])  # the dispatcher's clock
    d._rate_at = clock[0]
    window = d.window()
    for _ in range(100):
        clock[0] += 0.02
        d._finished += round(rate * 0.02)
        window = d.window()
    return window


@pytest.mark.anyio
async def test_slow_handlers_get_no_prefetch(monkeypatch: pytest.MonkeyPatch) -> None:
    """A claimed item of a slow handler would wait for a worker while its batch
    counts it as `running`: the window holds only what the workers run."""
    d, _ = make({"concurrency": 8})
    assert d.window() == 8
    assert run_at(monkeypatch, d, 10.0) == 8  # 10/s x 50 ms = 0.5: not one more
    assert run_at(monkeypatch, d, 50.0) == 8 + 2  # 50/s x 50 ms: 2 start within 50 ms


@pytest.mark.anyio
async def test_fast_handlers_grow_the_window_up_to_the_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    d, _ = make({"concurrency": 8})
    assert 8 + 19 <= run_at(monkeypatch, d, 400.0) <= 8 + 20  # 400/s x 50 ms, smoothed
    assert run_at(monkeypatch, d, 100_000.0) == 8 + 8 * 8  # capped
    assert run_at(monkeypatch, d, 0.0) == 8  # and back when they slow down


@pytest.mark.anyio
async def test_a_fixed_prefetch_never_grows(monkeypatch: pytest.MonkeyPatch) -> None:
    d, _ = make({"concurrency": 8, "prefetch": 0})
    assert run_at(monkeypatch, d, 100_000.0) == 8


@pytest.mark.anyio
async def test_unwritten_outcomes_count_beyond_the_growth(monkeypatch: pytest.MonkeyPatch) -> None:
    d, outbox = make({"concurrency": 8, "prefetch": 8})
    d.owned, outbox.pending = 3, 5
    assert d.free_slots() == 16 - 3 - 5  # fixed window: everything not yet written counts
    d, outbox = make({"concurrency": 8})
    assert run_at(monkeypatch, d, 100_000.0) == 72  # grown by 64
    d.owned, outbox.pending = 3, 60
    assert d.free_slots() == 72 - 3  # a write of 60 in flight overlaps the next claim
    outbox.pending = 70
    assert d.free_slots() == 72 - 3 - 6  # beyond the growth, writes are falling behind
