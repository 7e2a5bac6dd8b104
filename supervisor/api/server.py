"""The aiohttp application and its runner component.

Middleware first applies the browser-facing checks of :mod:`supervisor.api.guard`
(Host, Origin, JSON content type), then turns every error into problem+json:
validation and state errors raised as :class:`Problem`, a database outage as 503,
aiohttp's own 404/405/413, and anything unexpected as a logged 500 (never a bare
traceback).
"""

from __future__ import annotations

import base64
import hashlib
import logging
import re
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
        return render(p.status, p.detail, instance=request.path, errors=p.errors, headers=p.headers)
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


class ApiServer:
    def __init__(self, ctx: ApiContext) -> None:
        self._ctx = ctx
        self.port: int | None = None

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        runner = web.AppRunner(build_app(self._ctx), access_log=None, shutdown_timeout=2.0)
        await runner.setup()
        try:
            host, port = self._ctx.cfg.server.host, self._ctx.cfg.server.port
            tls = (
                config.tls_context(self._ctx.cfg.server) if self._ctx.cfg.server.tls_cert else None
            )
            site = web.TCPSite(runner, host, port, ssl_context=tls)
            try:
                await site.start()
            except OSError as exc:
                # Configuration can fix this (another daemon on the port, a host
                # that is not ours): exit 78 with one line, not a traceback.
                raise ConfigError(
                    [f"server.port: cannot listen on {host}:{port}: {exc.strerror or exc}"]
                ) from None
            server = getattr(site, "_server", None)
            sockets = getattr(server, "sockets", None) or []
            self.port = sockets[0].getsockname()[1] if sockets else self._ctx.cfg.server.port
            log.info(
                "api.listening host=%s port=%s tls=%s",
                self._ctx.cfg.server.host,
                self.port,
                "on" if tls else "off",
            )
            task_status.started()
            await anyio.sleep_forever()
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                await runner.cleanup()
