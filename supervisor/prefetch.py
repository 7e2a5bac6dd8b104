"""The prefetch window: how many claimed, unfinished attempts a daemon may hold.

``[worker] concurrency`` run at once; ``[worker] prefetch = N`` lets N more wait
claimed for a worker. ``prefetch = "auto"`` (the default) holds what the workers
will start within WAVE_S at the pace they finish attempts, but at most one item
per worker: attempts shorter than WAVE_S get one waiting item per worker, so a
wave of workers that finish together (one batch of equal I/O-bound items) finds
their next items already claimed instead of waiting for a claim of hundreds of
rows; longer attempts get proportionally fewer (64 workers on 10 s attempts: 12;
on minutes-long attempts: none or one or two), because a claimed item sits
`running` in its batch's counts while no handler runs it (and another daemon's
free worker cannot take it). Fast handlers
get more: what the workers start within HORIZON_S, claims big enough to amortise
their transactions, at most MAX_FACTOR x concurrency. The pace is that of
finished attempts, not of starts: a burst of starts (all workers taking their
first item) says nothing about when a worker will be free again.

Pure bookkeeping, no I/O: :meth:`Window.finished` counts an attempt,
:meth:`Window.sample` folds the count into the pace (at most every SAMPLE_S),
:meth:`Window.size` reads it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

HORIZON_S = 0.05  # "auto": hold about this much work of fast handlers
WAVE_S = 2.0  # ... and up to one item per worker for attempts shorter than this
# (at concurrency 1,000, 200 ms sleeps ran at 74-91 % of the ideal without it,
# 96-97 % with one item per worker waiting: bench/README.md)
MAX_FACTOR = 8  # ... and at most this many times concurrency (12 x made
# Python steps long enough to push the status p99 past 20 ms under load)
SAMPLE_S = 0.02  # the finish rate is sampled at most this often
SMOOTH_S = 0.2  # and smoothed over about this long


class Window:
    def __init__(
        self,
        concurrency: int,
        prefetch: int | None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.concurrency = concurrency
        self.fixed = prefetch is not None  # a configured prefetch never grows
        self.base = concurrency + (prefetch or 0)  # the window before any growth
        self._clock = clock
        self._finished = 0  # attempts finished
        self._rate = 0.0  # attempts finished per second, smoothed over SMOOTH_S
        # The same smoothed over WAVE_S: slow handlers finish rarely, and equal
        # items in waves (a smoothing this long sees 3/4 of a 1 s wave's pace).
        self._steady = 0.0
        self._sampled_at = clock()
        self._sampled_finished = 0

    def finished(self) -> None:
        """One attempt finished (whatever its outcome)."""
        self._finished += 1

    def sample(self) -> None:
        """Fold the attempts finished since the last sample into the pace."""
        now = self._clock()
        elapsed = now - self._sampled_at
        if elapsed < SAMPLE_S:
            return
        measured = (self._finished - self._sampled_finished) / elapsed
        self._rate += (measured - self._rate) * min(1.0, elapsed / SMOOTH_S)
        self._steady += (measured - self._steady) * min(1.0, elapsed / WAVE_S)
        # Capped so a fast handler's pace is forgotten within seconds (past the cap
        # the wave term is concurrency anyway).
        self._steady = min(self._steady, 10 * self.concurrency / WAVE_S)
        self._sampled_at, self._sampled_finished = now, self._finished

    def size(self) -> int:
        """Claimed and unfinished attempts the daemon may hold now."""
        if self.fixed:
            return self.base
        wave = min(self.concurrency, self._steady * WAVE_S)  # = busy x WAVE_S / duration
        grown = min(MAX_FACTOR * self.concurrency, int(max(self._rate * HORIZON_S, wave)))
        return self.concurrency + grown
