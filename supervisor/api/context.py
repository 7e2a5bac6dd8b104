"""What the routes need from the daemon, in one object stored on the app."""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable

from aiohttp import web

from supervisor import db as dbm
from supervisor.api.auth import Authenticator, Principal
from supervisor.config import Config
from supervisor.events import Bus
from supervisor.metrics import Metrics


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


CTX: web.AppKey[ApiContext] = web.AppKey("ctx", ApiContext)
PRINCIPAL = "principal"


def principal(request: web.Request) -> Principal:
    p: Principal = request[PRINCIPAL]
    return p
