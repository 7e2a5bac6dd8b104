"""The aiohttp application and its runner component.

Middleware first applies the browser-facing checks of :mod:`supervisor.api.guard`
(Host, Origin, JSON content type), then turns every error into problem+json:
validation and state errors raised as :class:`Problem`, a database outage as 503,
aiohttp's own 404/405/413, and anything unexpected as a logged 500 (never a bare
traceback).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import re
import resource
import time
import weakref
from collections.abc import Awaitable, Callable
from importlib import resources

import anyio
import anyio.abc
from aiohttp import web

from supervisor import config
from supervisor.api import routes
from supervisor.api.context import CTX, PRINCIPAL, ApiContext
from supervisor.api.guard import Guard
from supervisor.api.problems import Problem, render
from supervisor.errors import ConfigError, DatabaseUnavailable

log = logging.getLogger(__name__)
# Open files the daemon needs besides client sockets and its pools: the listening
# socket, logs, the embedded server's lock and socket files, python imports.
FILES_HEADROOM = 64
REFUSAL = (
    b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\nRetry-After: 1\r\n"
    b"Content-Type: text/plain\r\nContent-Length: 28\r\n\r\ntoo many connections; retry\n"
)
REFUSAL_LOG_EVERY_S = 10.0
PUBLIC = ("/healthz", "/readyz", "/metrics", "/v1/openapi.json", "/", "/static/")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
GUARD = web.AppKey("guard", Guard)


@web.middleware
async def problems(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        request.app[GUARD].check(request)
        path = request.path
        ctx = request.app[CTX]
        if path == "/metrics" and ctx.cfg.server.metrics_auth:
            ctx.auth.authenticate(request).require("read")
        elif not (path in PUBLIC or path.startswith("/static/")):
            if not ctx.serving():
                raise Problem(
                    503,
                    "the daemon is starting (waiting for the database or "
                    "migrating it); retry shortly",
                    headers={"Retry-After": "1"},
                )
            request[PRINCIPAL] = ctx.auth.authenticate(request)
        return await handler(request)
    except Problem as p:
        return render(
            p.status,
            p.detail,
            instance=request.path,
            errors=p.errors,
            headers=p.headers,
            extensions=p.extensions,
        )
    except DatabaseUnavailable as exc:
        log.warning("api.db_unavailable path=%s error=%s", request.path, exc)
        return render(
            503,
            "the database is unavailable; retry shortly",
            instance=request.path,
            headers={"Retry-After": "1"},
        )
    except web.HTTPRequestEntityTooLarge as exc:
        return render(413, exc.text or "request body too large", instance=request.path)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        detail = (
            exc.reason if exc.status != 404 else f"no route for {request.method} {request.path}"
        )
        allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return render(exc.status, detail, instance=request.path, headers=allow)
    except Exception:
        log.exception("api.internal_error method=%s path=%s", request.method, request.path)
        return render(500, "internal error; the daemon logged the details", instance=request.path)


def _page_headers(html: bytes) -> dict[str, str]:
    """Security headers for the dashboard: a CSP admitting only its own inline
    script (by hash) and same-origin requests, no framing, no type sniffing."""
    scripts = re.findall(rb"<script>(.*?)</script>", html, re.S)
    hashes = " ".join(
        "'sha256-" + base64.b64encode(hashlib.sha256(body).digest()).decode() + "'"
        for body in scripts
    )
    csp = (
        f"default-src 'none'; script-src {hashes}; style-src 'unsafe-inline'; "
        "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    )
    return {
        "Content-Security-Policy": csp,
        "X-Frame-Options": "DENY",
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
    }


def _static(name: str, content_type: str) -> Handler:
    async def serve(request: web.Request) -> web.StreamResponse:
        try:
            data = resources.files("supervisor").joinpath("api", "static", name).read_bytes()
        except FileNotFoundError:
            raise Problem(404, f"{name} is not shipped with this build") from None
        headers = (
            _page_headers(data)
            if content_type == "text/html"
            else {"X-Content-Type-Options": "nosniff"}
        )
        return web.Response(body=data, content_type=content_type, headers=headers)

    return serve


def build_app(ctx: ApiContext) -> web.Application:
    app = web.Application(middlewares=[problems], client_max_size=ctx.cfg.server.max_body_bytes)
    app[CTX] = ctx
    app[GUARD] = Guard(ctx.cfg.server)
    app.add_routes(routes.routes)
    app.router.add_get("/v1/openapi.json", _static("openapi.json", "application/json"))
    app.router.add_get("/", _static("index.html", "text/html"))
    return app


def connection_cap(cfg: config.Config) -> tuple[int, int]:
    """(connections the API accepts at once, the open-file limit it fits in).

    Every client socket is a file. ~1,100 idle sockets under a 1024-file limit
    stopped accept() for everyone and starved the database pools, so the
    heartbeat stopped too. The soft limit is raised to the hard one, and the cap
    is ``[server] max_connections`` lowered to leave room for the pools, the exec
    handlers' pipes (three per attempt) and FILES_HEADROOM."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        wanted = 1 << 20 if hard == resource.RLIM_INFINITY else hard
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError):
            pass  # keep the soft limit we have
    if soft == resource.RLIM_INFINITY:
        return cfg.server.max_connections, soft
    db = cfg.database
    needed = FILES_HEADROOM + db.pool_max + db.api_pool_max + 3 * cfg.worker.concurrency
    return max(1, min(cfg.server.max_connections, soft - needed)), soft


class _Refused(asyncio.Protocol):
    """A connection beyond the cap: one 503 and closed, its file freed at once."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        transport.write(REFUSAL)
        transport.close()


class _Tracked(asyncio.Protocol):
    """aiohttp's request handler for one connection, counted by its
    :class:`_ConnectionLimit` from the moment it is created."""

    __slots__ = ("__weakref__", "_inner", "_limit", "_made")

    def __init__(self, inner: asyncio.Protocol, limit: _ConnectionLimit) -> None:
        self._inner = inner
        self._limit = limit
        self._made = False
        limit.pending.add(self)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._limit.pending.discard(self)
        self._limit.open += 1
        self._made = True
        self._inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._made:
            self._made = False
            self._limit.open -= 1
        self._inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()


class _ConnectionLimit:
    """The listening socket's protocol factory: aiohttp's request handler while
    fewer than ``cap`` connections are open, a refusal beyond. A connection
    counts from its creation: asyncio creates the protocols of a burst of
    accepts before any of them is connected. One that never connects (a failed
    TLS handshake) is dropped by asyncio and leaves ``pending`` with it."""

    def __init__(self, server: web.Server, cap: int) -> None:
        self._server = server
        self._cap = cap
        self.open = 0
        self.pending: weakref.WeakSet[_Tracked] = weakref.WeakSet()
        self._refused = 0
        self._logged_at = 0.0

    def __call__(self) -> asyncio.BaseProtocol:
        if self.open + len(self.pending) < self._cap:
            return _Tracked(self._server(), self)
        self._refused += 1
        now = time.monotonic()
        if now - self._logged_at >= REFUSAL_LOG_EVERY_S:
            log.warning(
                "api.connections_full cap=%s refused=%s ([server] max_connections)",
                self._cap,
                self._refused,
            )
            self._logged_at, self._refused = now, 0
        return _Refused()


class ApiServer:
    def __init__(self, ctx: ApiContext) -> None:
        self._ctx = ctx
        self.port: int | None = None

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        server_cfg = self._ctx.cfg.server
        # keepalive_timeout bounds how long a connection may take to send a request
        # head, new or idle (aiohttp closes one whose head is incomplete by then);
        # bodies are bounded where they are read (routes._read_body).
        runner = web.AppRunner(
            build_app(self._ctx),
            access_log=None,
            shutdown_timeout=2.0,
            keepalive_timeout=server_cfg.read_timeout_s,
        )
        await runner.setup()
        assert runner.server is not None  # set up above
        listener: asyncio.Server | None = None
        try:
            host, port = server_cfg.host, server_cfg.port
            tls = config.tls_context(server_cfg) if server_cfg.tls_cert else None
            cap, files = connection_cap(self._ctx.cfg)
            try:
                listener = await asyncio.get_running_loop().create_server(
                    _ConnectionLimit(runner.server, cap), host, port, ssl=tls, backlog=128
                )
            except OSError as exc:
                # Configuration can fix this (another daemon on the port, a host
                # that is not ours): exit 78 with one line, not a traceback.
                raise ConfigError(
                    [f"server.port: cannot listen on {host}:{port}: {exc.strerror or exc}"]
                ) from None
            self.port = listener.sockets[0].getsockname()[1] if listener.sockets else port
            log.info(
                "api.listening host=%s port=%s tls=%s max_connections=%s open_files=%s",
                host,
                self.port,
                "on" if tls else "off",
                cap,
                files,
            )
            task_status.started()
            await anyio.sleep_forever()
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                if listener is not None:
                    listener.close()  # accept nothing more; cleanup closes the connections
                await runner.cleanup()
