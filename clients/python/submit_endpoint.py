"""A web endpoint that submits a batch per request, the way a FastAPI or Flask
app would: the request returns at once with the batch id, and the work happens
in the daemon, durably, whatever becomes of this process.

    .venv/bin/python clients/python/submit_endpoint.py   # then:
    curl -XPOST localhost:9000/extract -d '{"files": ["a.pdf", "b.pdf"]}'

BATCH_SUPERVISOR_URL / BATCH_SUPERVISOR_TOKEN say where the daemon is. (With
FastAPI the handler body is the same two lines: ``bsv.submit(...)`` on a
module-level ``Client``, or ``await`` on an ``AsyncClient``.)
"""

from __future__ import annotations

import os
from typing import Any

from aiohttp import web

from supervisor.client import AsyncClient, ClientError

HANDLER = os.environ.get("EXAMPLE_HANDLER", "echo")  # a handler of the daemon's config


async def extract(request: web.Request) -> web.Response:
    body: dict[str, Any] = await request.json()
    bsv: AsyncClient = request.app["bsv"]
    try:
        # One batch per request; the idempotency key makes a client retry (or the
        # user's double click, with their own key) return the same batch.
        batch = await bsv.submit(
            HANDLER,
            [{"key": f, "payload": {"file": f}} for f in body["files"]],
            idempotency_key=request.headers.get("Idempotency-Key"),
            metadata={"requested_by": request.remote or "?"},
        )
    except ClientError as exc:  # one line, with the problem's detail
        return web.json_response({"error": str(exc)}, status=502)
    return web.json_response({"batch_id": batch.id, "status": batch.status}, status=202)


async def client_ctx(app: web.Application) -> Any:
    async with AsyncClient() as bsv:
        app["bsv"] = bsv
        yield


def make_app() -> web.Application:
    app = web.Application()
    app.router.add_post("/extract", extract)
    app.cleanup_ctx.append(client_ctx)
    return app


if __name__ == "__main__":
    web.run_app(make_app(), port=int(os.environ.get("PORT", "9000")))
