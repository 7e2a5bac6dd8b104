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

A python handler runs inside the daemon, with the daemon's account. Started as
root, the daemon refuses a handler of the operator's own (anything outside the
``supervisor`` package) unless ``user = "root"`` says that is intended: its
payloads come from whoever can submit, and a root daemon would run the
function's bugs as root. Exec handlers switch accounts instead.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
import pwd
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


def _account_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def check_account(hcfg: HandlerConfig, euid: int) -> None:
    """Refuse what would run as an account other than the operator intends (see
    the module docstring); HandlerLoadError names the field and the ways out."""
    field = f"handlers.{hcfg.name}.user"
    me = _account_name(euid)
    if hcfg.user:
        if hcfg.user != me:
            raise HandlerLoadError(
                f"{field}: a python handler runs inside the daemon, as the daemon's own "
                f"account ({me}), so it cannot run as {hcfg.user!r}; an exec handler can"
            )
        return
    module = hcfg.target.partition(":")[0]
    if euid == 0 and module != "supervisor" and not module.startswith("supervisor."):
        raise HandlerLoadError(
            f"handler {hcfg.name!r}: this daemon runs as root, and a python handler runs "
            "inside it, so its function would run as root on whatever payloads are "
            "submitted. Run the daemon as an unprivileged account (the systemd unit "
            "does), make it an exec handler (run as batch-supervisor-run), or set "
            f'{field} = "root" to accept that'
        )


class PythonHandler:
    def __init__(self, hcfg: HandlerConfig) -> None:
        self.config = hcfg
        check_account(hcfg, os.geteuid())
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
