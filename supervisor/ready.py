"""Claimed items waiting for a worker: one FIFO per handler, served round-robin,
each handler below its own ``concurrency`` cap in this daemon.

Pure bookkeeping: the dispatcher puts what a claim returned, its workers take
the next item they may start, and a pause, cancel or drain drops what has not
started.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Mapping

from supervisor.models import Item


class ReadyQueues:
    def __init__(self, handlers: Iterable[str], caps: Mapping[str, int]) -> None:
        self._queues: dict[str, deque[Item]] = {n: deque() for n in handlers}
        self._caps = dict(caps)  # handler -> its concurrency cap (absent: none)
        self._turn = 0
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def waiting(self, handler: str) -> int:
        return len(self._queues[handler])

    def items(self) -> list[Item]:
        """Every waiting item (a copy)."""
        return [item for queue in self._queues.values() for item in queue]

    def ids(self) -> set[int]:
        return {int(item.id) for queue in self._queues.values() for item in queue}

    def put(self, item: Item) -> None:
        self._queues[item.handler].append(item)
        self._count += 1

    def take(self, running: Mapping[str, int]) -> Item | None:
        """The next item a worker may start (``running``: attempts per handler now),
        or None; handlers take turns, so one busy handler does not starve another."""
        if not self._count:
            return None
        names = list(self._queues)
        for k in range(len(names)):
            name = names[(self._turn + k) % len(names)]
            queue = self._queues[name]
            cap = self._caps.get(name)
            if queue and (cap is None or running.get(name, 0) < cap):
                self._turn = (self._turn + k + 1) % len(names)
                self._count -= 1
                return queue.popleft()
        return None

    def drop(self, which: Callable[[Item], bool]) -> list[Item]:
        """Remove and return the waiting items ``which`` selects, in queue order."""
        dropped: list[Item] = []
        for queue in self._queues.values():
            keep: list[Item] = []
            for item in queue:
                (dropped if which(item) else keep).append(item)
            queue.clear()
            queue.extend(keep)
        self._count -= len(dropped)
        return dropped
