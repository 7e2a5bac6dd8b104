"""Handler registry: builds one runnable handler per ``[handlers.NAME]`` and
checks each at start-up (and in ``batch-supervisor check``) so a broken handler
stops the daemon before it claims anything, naming the handler and the reason.

A handler is called with a :class:`supervisor.Item` and returns a
JSON-serialisable result, or raises :class:`supervisor.PermanentError`,
:class:`supervisor.RetryAfter` or any other exception (retried with backoff).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from supervisor.config import Config, HandlerConfig
from supervisor.errors import HandlerLoadError
from supervisor.models import Item


class Handler(Protocol):
    """One configured handler, ready to run items."""

    config: HandlerConfig

    async def run(self, item: Item) -> Any:
        """Do the work of one attempt; raise to fail or retry it."""

    async def aclose(self) -> None:
        """Release resources (sessions, processes) at shutdown."""


def build(hcfg: HandlerConfig) -> Handler:
    """Create and check one handler; raises HandlerLoadError naming it."""
    if hcfg.type == "python":
        from supervisor.handlers import python

        return python.PythonHandler(hcfg)
    if hcfg.type == "http":
        from supervisor.handlers import http

        return http.HttpHandler(hcfg)
    if hcfg.type == "exec":
        from supervisor.handlers import exec as exec_

        return exec_.ExecHandler(hcfg)
    raise HandlerLoadError(f"handler {hcfg.name!r}: unknown type {hcfg.type!r}")


def build_all(cfg: Config) -> dict[str, Handler]:
    """Build every configured handler; collects all failures into one error."""
    out: dict[str, Handler] = {}
    problems: list[str] = []
    for name, hcfg in cfg.handlers.items():
        try:
            out[name] = build(hcfg)
        except HandlerLoadError as exc:
            problems.append(str(exc))
    if problems:
        raise HandlerLoadError("; ".join(problems))
    return out


def check_all(cfg: Config) -> list[str]:
    """Problems with the configured handlers, one line each (empty when all load)."""
    problems: list[str] = []
    for hcfg in cfg.handlers.values():
        try:
            build(hcfg)
        except HandlerLoadError as exc:
            problems.append(str(exc))
    return problems


async def close_all(handlers: Mapping[str, Handler]) -> None:
    for h in handlers.values():
        await h.aclose()
