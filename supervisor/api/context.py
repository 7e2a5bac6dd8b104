"""What the routes need from the daemon, in one object stored on the app."""

from __future__ import annotations

import contextlib
import dataclasses
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import TYPE_CHECKING

import anyio
from aiohttp import web

from supervisor import db as dbm
from supervisor import store
from supervisor.api.auth import Authenticator, Principal
from supervisor.api.problems import Problem
from supervisor.config import Config
from supervisor.events import Bus
from supervisor.metrics import Metrics

if TYPE_CHECKING:  # supervisor.schedules imports the API's validation
    from supervisor.schedules import Plan


class StreamSlots:
    """Caps on SSE streams open at once, in all and per token (429 beyond): each
    holds a connection and wakes on every change of its batch."""

    def __init__(self, total: int, per_token: int) -> None:
        self._total, self._per_token = total, per_token
        self._open: Counter[str] = Counter()

    @contextlib.contextmanager
    def slot(self, token: str) -> Iterator[None]:
        if sum(self._open.values()) >= self._total:
            raise Problem(429, f"too many event streams open ({self._total})", headers=RETRY)
        if self._open[token] >= self._per_token:
            raise Problem(
                429,
                f"this token has {self._per_token} event streams open already",
                headers=RETRY,
            )
        self._open[token] += 1
        try:
            yield
        finally:
            self._open[token] -= 1


RETRY = {"Retry-After": "5"}


@dataclasses.dataclass
class ApiContext:
    cfg: Config
    db: dbm.Database
    bus: Bus
    metrics: Metrics
    auth: Authenticator
    readiness: Callable[[], Awaitable[tuple[bool, list[str]]]]
    draining: Callable[[], bool]
    serving: Callable[[], bool] = lambda: True  # False while the daemon is starting
    # Why the daemon cannot make progress by itself (/healthz 503); empty when healthy.
    health: Callable[[], list[str]] = lambda: []
    # Large request bodies are parsed one at a time (see routes.LARGE_BODY_BYTES).
    large_bodies: anyio.Semaphore = dataclasses.field(default_factory=lambda: anyio.Semaphore(1))
    streams: StreamSlots = dataclasses.field(init=False)  # from cfg.server's stream caps
    # The configured schedules, checked (supervisor.schedules.build_all).
    plans: Mapping[str, Plan] = dataclasses.field(default_factory=dict)

    q: store.Queries = dataclasses.field(init=False)  # the typed queries, on db's pool

    def __post_init__(self) -> None:
        server = self.cfg.server
        self.streams = StreamSlots(server.max_streams, server.max_streams_per_token)
        self.q = store.Queries(self.db)


CTX: web.AppKey[ApiContext] = web.AppKey("ctx", ApiContext)
PRINCIPAL = "principal"


def principal(request: web.Request) -> Principal:
    p: Principal = request[PRINCIPAL]
    return p
