"""``type = "python"``: an importable ``package.module:function`` called with the item.

An ``async def`` runs on the event loop; a plain ``def`` runs in a worker
thread (abandoned, not killed, on timeout: Python threads cannot be killed).
The target is imported and its signature checked when the handler is built.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Callable
from typing import Any

import anyio.to_thread

from supervisor.config import HandlerConfig
from supervisor.errors import HandlerLoadError
from supervisor.models import Item


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

    async def run(self, item: Item) -> Any:
        if self._is_async:
            return await self._fn(item)
        return await anyio.to_thread.run_sync(
            functools.partial(self._fn, item), abandon_on_cancel=True
        )

    async def aclose(self) -> None:
        return None
