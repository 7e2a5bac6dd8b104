"""The prefetch window: how many claimed, unfinished attempts a daemon may hold.

``[worker] concurrency`` run at once; ``[worker] prefetch = N`` lets N more wait
claimed for a worker. ``prefetch = "auto"`` (the default) holds only what the
workers will start within HORIZON_S at the pace they finish attempts (at most
MAX_FACTOR x concurrency): nothing for slow handlers, whose claimed items would
sit `running` in their batch's counts while no handler runs them, and claims big
enough to amortise their transactions for fast ones. The pace is that of
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
        self._rate = 0.0  # attempts finished per second, smoothed
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
        self._sampled_at, self._sampled_finished = now, self._finished

    def size(self) -> int:
        """Claimed and unfinished attempts the daemon may hold now."""
        if self.fixed:
            return self.base
        grown = min(MAX_FACTOR * self.concurrency, int(self._rate * HORIZON_S))
        return self.concurrency + grown
