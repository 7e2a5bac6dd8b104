"""``type = "python"``: an importable ``package.module:function`` called with the item.

An ``async def`` runs on the event loop; a plain ``def`` runs in a worker
thread of the handler's own (so that handlers never take the threads the
daemon itself needs). On timeout the thread is abandoned, not killed (Python
threads cannot be killed): it runs on until the function returns. A handler
that hangs would leak one thread per attempt, so once ABANDONED_MAX are left
running (plus at most the attempts running at that moment), attempts fail
with ``ThreadsExhausted`` (retried with backoff) until one returns. The count
is the ``batch_supervisor_handler_threads_abandoned`` gauge.

The target is imported and its signature checked when the handler is built.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import threading
from collections.abc import Callable
from typing import Any

import anyio.to_thread

from supervisor.config import HandlerConfig
from supervisor.errors import HandlerLoadError
from supervisor.models import Item

ABANDONED_MAX = 16
THREADS_PER_HANDLER = 256  # without a handler concurrency; the worker pool bounds it too


class ThreadsExhausted(Exception):
    """Too many threads of this handler's timed-out attempts are still running."""


def _load_target(hcfg: HandlerConfig) -> Callable[..., Any]:
    module_name, _, attr = hcfg.target.partition(":")
    where = f"handler {hcfg.name!r} (target {hcfg.target!r})"
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any import-time failure makes the handler unusable
        raise HandlerLoadError(
            f"{where}: cannot import module {module_name!r}: {type(exc).__name__}: {exc}"
        ) from exc
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise HandlerLoadError(f"{where}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise HandlerLoadError(f"{where}: {attr!r} is not callable")
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError) as exc:
        raise HandlerLoadError(f"{where}: cannot inspect its signature: {exc}") from exc
    try:
        sig.bind(object())
    except TypeError as exc:
        raise HandlerLoadError(
            f"{where}: {attr}{sig} cannot be called with one positional `item` argument ({exc})"
        ) from exc
    return obj  # type: ignore[no-any-return]


class PythonHandler:
    def __init__(self, hcfg: HandlerConfig) -> None:
        self.config = hcfg
        self._fn = _load_target(hcfg)
        self._is_async = inspect.iscoroutinefunction(self._fn) or inspect.iscoroutinefunction(
            getattr(self._fn, "__call__", None)  # noqa: B004 - async callable objects count too
        )
        self._limiter = anyio.CapacityLimiter(hcfg.concurrency or THREADS_PER_HANDLER)
        self._lock = threading.Lock()
        self._live = 0  # threads inside the function (changed by the threads themselves)
        self._attempts = 0  # attempts waiting for a thread's result (event loop only)

    @property
    def abandoned_threads(self) -> int:
        """Threads still running a function whose attempt is over (timed out, stopped)."""
        return max(0, self._live - self._attempts)

    async def run(self, item: Item) -> Any:
        if self._is_async:
            return await self._fn(item)
        if self.abandoned_threads >= ABANDONED_MAX:
            raise ThreadsExhausted(
                f"{self.abandoned_threads} threads of this handler's timed-out attempts are "
                "still running (a thread cannot be killed); no new one until one returns"
            )
        self._attempts += 1
        try:
            return await anyio.to_thread.run_sync(
                functools.partial(self._call, item), abandon_on_cancel=True, limiter=self._limiter
            )
        finally:
            self._attempts -= 1

    def _call(self, item: Item) -> Any:
        with self._lock:
            self._live += 1
        try:
            return self._fn(item)
        finally:
            with self._lock:
                self._live -= 1

    async def aclose(self) -> None:
        return None
