"""The "auto" prefetch window: nothing beyond concurrency for slow handlers, one
item per worker for short attempts, grown for fast ones (supervisor.prefetch.Window),
and what counts against it (supervisor.dispatcher.Dispatcher.free_slots)."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from supervisor import config, dispatcher, prefetch, progress


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def window(concurrency: int, fixed: int | None = None) -> tuple[prefetch.Window, Clock]:
    clock = Clock()
    return prefetch.Window(concurrency, fixed, clock), clock


def run_at(w: prefetch.Window, clock: Clock, rate: float) -> int:
    """Finish ``rate`` attempts per second for two seconds of fake time; the size then."""
    carry = 0.0
    for _ in range(100):
        clock.now += 0.02
        carry += rate * 0.02
        while carry >= 1:
            w.finished()
            carry -= 1
        w.sample()
    return w.size()


def test_slow_handlers_get_no_prefetch() -> None:
    """A claimed item of a slow handler would wait for a worker while its batch
    counts it as `running`: the window holds only what the workers run."""
    w, clock = window(8)
    assert w.size() == 8
    assert run_at(w, clock, 0.1) == 8  # 80 s attempts: 0.1/s x 2 s, not one more
    for _ in range(3):
        run_at(w, clock, 1.0)
    assert 8 + 1 <= run_at(w, clock, 1.0) <= 8 + 2  # 8 s attempts: what starts within 2 s


def test_short_attempts_get_one_waiting_item_per_worker() -> None:
    """A wave of workers finishing together (equal I/O-bound items of one batch)
    finds as many items claimed: 1,000 workers on 200 ms attempts hold 1,000 more,
    where 50 ms at their pace would be 250 and the wave would wait for claims."""
    w, clock = window(1000)
    assert 1000 + 990 <= run_at(w, clock, 5000.0) <= 1000 + 1000
    assert run_at(w, clock, 5000.0) == 1000 + 1000  # never more than one per worker
    w, clock = window(8)
    assert run_at(w, clock, 10.0) == 8 + 8  # 0.8 s attempts


def test_fast_handlers_grow_the_window_up_to_the_cap() -> None:
    w, clock = window(8)
    assert 8 + 19 <= run_at(w, clock, 400.0) <= 8 + 20  # 400/s x 50 ms, smoothed
    assert run_at(w, clock, 100_000.0) == 8 + 8 * 8  # capped
    for _ in range(5):
        run_at(w, clock, 0.0)
    assert run_at(w, clock, 0.0) == 8  # and back within seconds when they slow down


def test_a_fixed_prefetch_never_grows() -> None:
    w, clock = window(8, fixed=0)
    assert run_at(w, clock, 100_000.0) == 8


def test_reading_the_size_changes_nothing() -> None:
    w, clock = window(8)
    run_at(w, clock, 400.0)
    clock.now += 10  # a long quiet spell, not yet sampled
    assert w.size() == w.size()  # only sample() folds time in
    w.sample()
    assert w.size() < 8 + 19


class FakeOutbox:
    pending = 0


def make(worker: dict[str, Any]) -> tuple[dispatcher.Dispatcher, FakeOutbox, Clock]:
    cfg = config.from_mapping({"worker": worker})
    outbox = FakeOutbox()
    reports = progress.Reports(None, uuid.uuid4())  # type: ignore[arg-type]  # nothing reports
    d = dispatcher.Dispatcher(cfg, None, {}, outbox, str(uuid.uuid4()), reports)  # type: ignore[arg-type]
    clock = Clock()
    d._window = prefetch.Window(cfg.worker.concurrency, cfg.worker.prefetch, clock)
    return d, outbox, clock


@pytest.mark.anyio
async def test_unwritten_outcomes_count_beyond_the_growth() -> None:  # events need a loop
    d, outbox, _ = make({"concurrency": 8, "prefetch": 8})
    d.owned, outbox.pending = 3, 5
    assert d.free_slots() == 16 - 3 - 5  # fixed window: everything not yet written counts
    d, outbox, clock = make({"concurrency": 8})
    assert run_at(d._window, clock, 100_000.0) == 72  # grown by 64
    d.owned, outbox.pending = 3, 60
    assert d.free_slots() == 72 - 3  # a write of 60 in flight overlaps the next claim
    outbox.pending = 70
    assert d.free_slots() == 72 - 3 - 6  # beyond the growth, writes are falling behind
