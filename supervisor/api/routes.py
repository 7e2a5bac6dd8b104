"""HTTP API v1 routes. Thin: validate, authorize, call
:mod:`supervisor.batches` or a named query, shape the JSON."""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import json
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol, TypeVar

import anyio
import anyio.to_thread
from aiohttp import web

from supervisor import batches, models, pipeline_runs, schedules, states, store, tracecontext
from supervisor.api import results, schemas, sse
from supervisor.api.auth import Principal
from supervisor.api.context import CTX, ApiContext, principal
from supervisor.api.problems import Problem, ValidationFailed
from supervisor.config import Config

routes = web.RouteTableDef()
JSON_CT = "application/json"


def ctx_of(request: web.Request) -> ApiContext:
    return request.app[CTX]


# An item listing stops at this many bytes of items (at least one item), whatever
# `limit` asks for, and continues from its next_cursor: a page of large payloads
# must not become a 100 MB response.
MAX_PAGE_BYTES = 8 * 1024 * 1024
# Bodies above this (or of unannounced size) are parsed in a worker thread, one at
# a time: parsing a big body on the event loop stalled it for seconds, and several
# at once multiplied the memory a body costs. A large submission holds the turn
# from reading its body until its batch is committed.
LARGE_BODY_BYTES = 1024 * 1024


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(text=json.dumps(data), status=status, content_type=JSON_CT, headers=headers)


def _cursor_encode(obj: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")


def _cursor_decode(text: str) -> dict[str, Any]:
    try:
        obj = json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
        if not isinstance(obj, dict):
            raise ValueError
        return obj
    except (ValueError, binascii.Error, UnicodeDecodeError, RecursionError):
        raise ValidationFailed(
            [{"path": "cursor", "message": "not a cursor returned by this API"}], 400
        ) from None


class _Listed(Protocol):
    """A row of a newest-first listing (batches, pipeline runs)."""

    @property
    def created_at(self) -> datetime: ...

    @property
    def id(self) -> uuid.UUID: ...


L = TypeVar("L", bound=_Listed)


def _newest_first_cursor(text: str | None) -> tuple[datetime, uuid.UUID] | None:
    """The (created_at, id) a newest-first listing continues after (None: from
    the start); 400 naming ``cursor`` for anything this API did not hand out."""
    if not text:
        return None
    c = _cursor_decode(text)
    try:
        if not isinstance(c.get("t"), str) or not isinstance(c.get("id"), str):
            raise ValueError
        return datetime.fromisoformat(c["t"]).astimezone(UTC), uuid.UUID(c["id"])
    except (ValueError, OverflowError):
        raise ValidationFailed(
            [{"path": "cursor", "message": "not a cursor returned by this API"}], 400
        ) from None


def _newest_first_page(rows: list[L], limit: int) -> tuple[list[L], str | None]:
    """A page of a newest-first listing fetched with ``limit + 1`` rows: the first
    ``limit`` and the cursor after the last of them (None: no more)."""
    if len(rows) <= limit:
        return rows, None
    last = rows[limit - 1]
    return rows[:limit], _cursor_encode({"t": last.created_at.isoformat(), "id": str(last.id)})


async def _batch_or_404(request: web.Request) -> store.BatchRow:
    ctx = ctx_of(request)
    who = principal(request)
    row = await batches.get(ctx.db, request.match_info["id"], who.tenant_filter)
    if row is None:
        raise Problem(404, f"no batch {request.match_info['id']!r}")
    return row


def _is_large(request: web.Request) -> bool:
    """A body over LARGE_BODY_BYTES, or of a size not announced (chunked)."""
    return request.content_length is None or request.content_length > LARGE_BODY_BYTES


async def _read_body(request: web.Request) -> bytes:
    ctx = ctx_of(request)
    limit = ctx.cfg.server.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise Problem(
            413,
            f"request body of {request.content_length} bytes exceeds the limit of "
            f"{limit} bytes ([server] max_body_bytes)",
        )
    timeout = ctx.cfg.server.read_timeout_s
    try:
        if request.content.is_eof():
            # All of it arrived with the headers (small bodies usually do): nothing
            # to wait for, and no deadline to set up on the hot path.
            return await request.read()
        with anyio.fail_after(timeout):  # a slow sender must not hold its socket forever
            return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise Problem(
            413, f"request body exceeds the limit of {limit} bytes ([server] max_body_bytes)"
        ) from None
    except TimeoutError:
        raise Problem(
            408,
            f"request body not received within {timeout:g}s ([server] read_timeout)",
            headers={"Connection": "close"},
        ) from None


def _key_busy(exc: batches.ExclusiveKeyBusy) -> Problem:
    """409 naming the batch that holds the exclusive key, in the detail for people
    and as ``active_batch_id`` for programs (to wait for it or cancel it)."""
    return Problem(
        409,
        str(exc),
        extensions={"active_batch_id": str(exc.active_batch_id), "exclusive_key": exc.key},
    )


async def _read_json(request: web.Request) -> Any:
    """A small request's JSON body (None when empty); large ones are parsed in a
    worker thread, one at a time."""
    if not _is_large(request):
        raw = await _read_body(request)
        return schemas.parse_json(raw) if raw else None
    async with ctx_of(request).large_bodies:
        raw = await _read_body(request)
        return await anyio.to_thread.run_sync(schemas.parse_json, raw) if raw else None


def _key_pointer(cfg: Config) -> Callable[[str], str | None]:
    """The JSON Pointer of each handler's key limit (None: it has none)."""

    def pointer(name: str) -> str | None:
        kl = cfg.handlers[name].key_limit
        return kl.key if kl is not None else None

    return pointer


def _cost_pointer(cfg: Config) -> Callable[[str], str | None]:
    """The JSON Pointer of each handler's key budget cost (None: it has none)."""

    def pointer(name: str) -> str | None:
        kl = cfg.handlers[name].key_limit
        return kl.cost if kl is not None and kl.budget is not None else None

    return pointer


@routes.post("/v1/batches")
async def create_batch(request: web.Request) -> web.Response:
    ctx = ctx_of(request)
    who = principal(request)
    who.require("write")
    header_key = request.headers.get("Idempotency-Key")

    def validate(raw: bytes) -> batches.NewBatch:
        if not raw:
            raise Problem(400, "request body is empty: expected a JSON object")
        return schemas.submission(
            schemas.parse_json(raw),
            header_key=header_key,
            handler_exists=lambda name: name in ctx.cfg.handlers,
            max_items=ctx.cfg.server.max_items_per_batch,
            key_pointer=_key_pointer(ctx.cfg),
            cost_pointer=_cost_pointer(ctx.cfg),
        )

    # A large submission holds several times its size while it is parsed, checked
    # and copied into the database: one at a time from reading to commit, so that
    # concurrent large ones do not multiply that (and off the event loop).
    large = _is_large(request)
    async with ctx.large_bodies if large else contextlib.nullcontext():
        raw = await _read_body(request)
        nb = await anyio.to_thread.run_sync(validate, raw) if large else validate(raw)
        del raw
        trace = tracecontext.parse(
            request.headers.get("traceparent"), request.headers.get("tracestate")
        )
        if trace is not None:
            nb = dataclasses.replace(nb, trace=trace)
        hcfg = ctx.cfg.handlers[nb.handler]
        who.may_use(nb.handler, "handler")
        if nb.on_complete is not None:
            who.may_use(nb.on_complete, "on_complete")
        try:
            result = await batches.submit(
                ctx.db,
                nb,
                tenant=who.tenant,
                actor=who.name,
                attempt_budget=hcfg.max_attempts,
                callback_handler=nb.on_complete or hcfg.on_complete,
            )
        except batches.IdempotencyConflict as exc:
            raise Problem(409, str(exc)) from None
        except batches.ExclusiveKeyBusy as exc:
            raise _key_busy(exc) from None
        except batches.UnknownDependencies as exc:
            raise ValidationFailed([{"path": "/after", "message": str(exc)}]) from None
        except batches.DependencyEnded as exc:
            raise Problem(
                409,
                str(exc),
                extensions={
                    "dependency_batch_id": str(exc.dependency),
                    "dependency_status": exc.status,
                },
            ) from None
    b = result.batch
    return _json(
        b,
        201 if result.created else 200,
        {"Location": f"/v1/batches/{b['id']}", "ETag": f'"{b["version"]}"'},
    )


@routes.get("/v1/batches")
async def list_batches(request: web.Request) -> web.Response:
    ctx = ctx_of(request)
    who = principal(request)
    who.require("read")
    q = request.query
    limit = schemas.limit_param(q.get("limit"))
    before = _newest_first_cursor(q.get("cursor"))
    status = schemas.status_param(q.get("status"), states.BatchStatus)
    handler = schemas.text_param("handler", q.get("handler"))
    rows = await ctx.q.list_batches(
        tenant=who.tenant_filter,
        status=status,
        handler=handler,
        exclusive_key=schemas.exclusive_key_param(q.get("exclusive_key")),
        before=before,
        limit=limit + 1,
    )
    rows, nxt = _newest_first_page(rows, limit)
    return _json({"batches": [models.batch_json(r) for r in rows], "next_cursor": nxt})


@routes.get("/v1/batches/{id}")
async def get_batch(request: web.Request) -> web.StreamResponse:
    principal(request).require("read")
    row = await _batch_or_404(request)
    etag = f'"{row.version}"'
    inm = request.headers.get("If-None-Match")
    if inm and etag in [t.strip() for t in inm.split(",")]:
        return web.Response(status=304, headers={"ETag": etag})
    return _json(await batches.describe(ctx_of(request).q, row), headers={"ETag": etag})


@routes.patch("/v1/batches/{id}")
async def patch_batch(request: web.Request) -> web.Response:
    ctx = ctx_of(request)
    who = principal(request)
    who.require("write")
    fields = schemas.patch(await _read_json(request))
    row = await _batch_or_404(request)
    mf = fields.get("max_failures")
    nbf = fields.get("not_before")
    outcome = await ctx.q.patch_batch(
        row.id,
        tenant=who.tenant_filter,
        actor=who.name,
        fields=json.dumps(fields | {"not_before": models.rfc3339(nbf)} if nbf else fields),
        priority=fields.get("priority"),
        max_concurrency=fields.get("max_concurrency"),
        max_failures=json.dumps(mf) if mf is not None else None,
        max_failures_limit=batches.failure_limit(mf, row.total),
        not_before=nbf,
    )
    return await _control_response(request, outcome)


@routes.delete("/v1/batches/{id}")
async def delete_batch(request: web.Request) -> web.Response:
    ctx = ctx_of(request)
    who = principal(request)
    who.require("write")
    row = await _batch_or_404(request)
    if not await ctx.q.delete_batch(row.id, tenant=who.tenant_filter):
        raise Problem(409, f"batch is {row.status}: only a terminal batch can be deleted")
    return web.Response(status=204)


async def _control_response(request: web.Request, outcome: store.ControlResult) -> web.Response:
    if outcome.kind is store.ControlKind.NOT_FOUND:
        raise Problem(404, f"no batch {request.match_info['id']!r}")
    if outcome.kind is store.ControlKind.CONFLICT:
        raise Problem(409, outcome.reason)
    row = await _batch_or_404(request)
    return _json(
        await batches.describe(ctx_of(request).q, row), headers={"ETag": f'"{row.version}"'}
    )


Control = Callable[[store.Queries, uuid.UUID, Principal], Awaitable[store.ControlResult]]


async def _control(request: web.Request, run: Control, *, scope: str = "write") -> web.Response:
    """Run one batch control for the caller: 404 for an id that names no batch."""
    who = principal(request)
    who.require(scope)
    bid = batches.parse_id(request.match_info["id"])
    outcome = store.NOT_FOUND if bid is None else await run(ctx_of(request).q, bid, who)
    return await _control_response(request, outcome)


@routes.post("/v1/batches/{id}/cancel")
async def cancel_batch(request: web.Request) -> web.Response:
    return await _control(
        request, lambda q, bid, who: q.cancel_batch(bid, tenant=who.tenant_filter, actor=who.name)
    )


def _pausing(pause: bool) -> Control:
    return lambda q, bid, who: q.pause_batch(
        bid, tenant=who.tenant_filter, actor=who.name, pause=pause
    )


@routes.post("/v1/batches/{id}/pause")
async def pause_batch(request: web.Request) -> web.Response:
    return await _control(request, _pausing(True))


@routes.post("/v1/batches/{id}/resume")
async def resume_batch(request: web.Request) -> web.Response:
    return await _control(request, _pausing(False))


@routes.post("/v1/batches/{id}/callback/redeliver")
async def redeliver_callback(request: web.Request) -> web.Response:
    """Admin: run a failed (or succeeded) completion callback again."""
    return await _control(
        request,
        lambda q, bid, who: q.redeliver_callback(bid, tenant=who.tenant_filter, actor=who.name),
        scope="admin",
    )


def _include_cancelled(body: Any) -> bool:
    """A retry's body: nothing, or {"include_cancelled": true|false}."""
    if body is None:
        return False
    if not isinstance(body, dict) or set(body) - {"include_cancelled"}:
        raise ValidationFailed(
            [{"path": "", "message": 'body may only hold {"include_cancelled": true|false}'}]
        )
    include = body.get("include_cancelled", False)
    if not isinstance(include, bool):
        raise ValidationFailed([{"path": "/include_cancelled", "message": "must be a boolean"}])
    return include


@routes.post("/v1/batches/{id}/retry")
async def retry_batch(request: web.Request) -> web.Response:
    principal(request).require("write")  # before reading the body: a 403 is no 422
    include = _include_cancelled(await _read_json(request))
    try:
        return await _control(
            request,
            lambda q, bid, who: batches.retry(
                q, bid, tenant=who.tenant_filter, actor=who.name, include_cancelled=include
            ),
        )
    except batches.ExclusiveKeyBusy as exc:  # reopening it would take back a held key
        raise _key_busy(exc) from None


@routes.get("/v1/batches/{id}/items")
async def list_items(request: web.Request) -> web.Response:
    ctx = ctx_of(request)
    principal(request).require("read")
    row = await _batch_or_404(request)
    q = request.query
    limit = schemas.limit_param(q.get("limit"))
    after = 0
    if q.get("cursor"):
        c = _cursor_decode(q["cursor"])
        raw_after: Any = c.get("after")
        after = int(raw_after) if schemas.is_int(raw_after) and raw_after < 2**63 else -1
        if after < 0:
            raise ValidationFailed(
                [{"path": "cursor", "message": "not a cursor returned by this API"}], 400
            )
    status = schemas.status_param(q.get("status"), states.ItemStatus)
    keys = schemas.key_range_param(q.get("key"), q.get("key_prefix"))
    error_type = schemas.error_type_param(q.get("error_type"))
    # One query per search, each walking its own index in id order (a key range,
    # an error type, or the whole batch), so a plan cached for one never serves
    # another as a scan of the batch.
    rows: list[store.ItemRow]
    if keys is not None:
        rows = await ctx.q.list_items_by_key(
            batch_id=row.id,
            key_from=keys[0],
            key_to=keys[1],
            status=status,
            error_type=error_type,
            after=after,
            limit=limit + 1,
        )
    elif error_type is not None:
        rows = await ctx.q.list_items_by_error_type(
            batch_id=row.id, error_type=error_type, status=status, after=after, limit=limit + 1
        )
    else:
        rows = await ctx.q.list_items(batch_id=row.id, status=status, after=after, limit=limit + 1)
    tb = principal(request).sees_tracebacks
    items: list[str] = []
    size = 0
    for r in rows[:limit]:
        text = json.dumps(models.item_json(r, tracebacks=tb))
        if items and size + len(text) > MAX_PAGE_BYTES:
            break
        items.append(text)
        size += len(text) + 1
    more = len(rows) > len(items)
    nxt = _cursor_encode({"after": rows[len(items) - 1].id}) if more and items else None
    body = '{"items": [' + ", ".join(items) + '], "next_cursor": ' + json.dumps(nxt) + "}"
    return web.Response(text=body, content_type=JSON_CT)


FAILURE_GROUPS_MAX = 100  # error types listed at most, largest groups first


@routes.get("/v1/batches/{id}/errors")
async def batch_errors(request: web.Request) -> web.Response:
    """The batch's failed items grouped by the type of their last error, with a
    sample of each group (its newest failed item), largest group first."""
    principal(request).require("read")
    row = await _batch_or_404(request)
    groups = await ctx_of(request).q.batch_failures(row.id, limit=FAILURE_GROUPS_MAX + 1)
    return _json(
        {
            "batch_id": str(row.id),
            "failed": row.failed,
            "errors": [
                {
                    "error_type": g.error_type,
                    "count": g.count,
                    "sample_message": g.sample_message,
                    "sample_item_id": str(g.sample_id),
                    "sample_key": g.sample_key,
                    "last_failed_at": g.sample_at,
                }
                for g in groups[:FAILURE_GROUPS_MAX]
            ],
            "truncated": len(groups) > FAILURE_GROUPS_MAX,
        }
    )


@routes.post("/v1/batches/{id}/items/retry")
async def retry_items(request: web.Request) -> web.Response:
    """Queue chosen items of one batch again: the items named by ``ids``, or (up
    to BULK_RETRY_MAX per call) its failed items whose last error has the type
    ``error_type``. Each goes through the item retry; the ones it refuses are
    listed in ``skipped`` with the reason. 409 when none could be retried."""
    who = principal(request)
    who.require("write")  # before reading the body: a 403 is no 422
    ids, error_type = schemas.bulk_retry(await _read_json(request))
    ctx = ctx_of(request)
    bid = batches.parse_id(request.match_info["id"])
    if bid is None:
        raise Problem(404, f"no batch {request.match_info['id']!r}")
    limit = schemas.BULK_RETRY_MAX
    try:
        out = await batches.retry_items(
            ctx.q,
            bid,
            ids=ids,
            error_type=error_type,
            limit=limit,
            tenant=who.tenant_filter,
            actor=who.name,
        )
    except batches.ExclusiveKeyBusy as exc:  # reopening it would take back a held key
        raise _key_busy(exc) from None
    if out is None:
        raise Problem(404, f"no batch {request.match_info['id']!r}")
    seen = {r.id for r in out}
    retried = [str(r.id) for r in out if r.result.kind is store.ControlKind.OK]
    skipped: list[dict[str, str | None]] = [
        {"id": str(r.id), "status": r.status, "reason": r.result.reason}
        for r in out
        if r.result.kind is not store.ControlKind.OK
    ] + [
        {"id": str(i), "status": None, "reason": "no such item in this batch"}
        for i in (ids or [])
        if i not in seen
    ]
    if not retried:
        raise Problem(
            409,
            str(skipped[0]["reason"]) if skipped else "nothing to retry: no item matches",
            extensions={"skipped": skipped},
        )
    # The call stopped at its limit: are failed items of that type left after it?
    more = (
        error_type is not None
        and ids is None
        and len(out) == limit
        and bool(
            await ctx.q.list_items_by_error_type(
                batch_id=bid, error_type=error_type, status="failed", after=out[-1].id, limit=1
            )
        )
    )
    b = await _batch_or_404(request)
    return _json(
        {
            "batch": await batches.describe(ctx.q, b),
            "retried": retried,
            "skipped": skipped,
            "more": more,
        },
        headers={"ETag": f'"{b.version}"'},
    )


@routes.get("/v1/batches/{id}/results")
async def batch_results(request: web.Request) -> web.StreamResponse:
    """Every item's outcome as JSON Lines or CSV, streamed (see api/results.py).
    Held in a stream slot like SSE: an export of a big batch lasts minutes."""
    ctx = ctx_of(request)
    who = principal(request)
    who.require("read")
    row = await _batch_or_404(request)
    q = request.query
    fmt = schemas.results_format(q.get("format"), request.headers.get("Accept"))
    statuses = schemas.statuses_param(q.get("status"), states.ItemStatus)
    after = schemas.after_param(q.get("after"))
    with ctx.streams.slot(who.name):
        return await results.stream(
            request,
            ctx,
            row.id,
            fmt=fmt,
            statuses=statuses,
            after=after,
            tracebacks=who.sees_tracebacks,
        )


def _item_id(request: web.Request) -> int:
    """The item id of the URL; 404 for text that cannot name one (a bigint)."""
    raw = request.match_info["id"]
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 18:
        raise Problem(404, f"no item {raw!r}")
    return int(raw)


@routes.get("/v1/items/{id}")
async def get_item(request: web.Request) -> web.Response:
    ctx = ctx_of(request)
    who = principal(request)
    who.require("read")
    item_id = _item_id(request)
    row = await ctx.q.get_item(item_id, tenant=who.tenant_filter)
    if row is None:
        raise Problem(404, f"no item {request.match_info['id']!r}")
    return _json(models.item_json(row, with_errors=True, tracebacks=who.sees_tracebacks))


ItemControl = Callable[[store.Queries, int, Principal], Awaitable[store.ItemControlResult]]


async def _item_control(request: web.Request, run: ItemControl) -> web.Response:
    """Run one item control for the caller: 404 for an id that names no item of
    its tenant, 409 naming the item's status (``item_status``) when the item is
    not in a state the control applies to, else 200 with the item as it is now.
    The body may be absent or ``{}``: the controls take no options."""
    who = principal(request)
    who.require("write")  # before reading the body: a 403 is no 422
    body = await _read_json(request)
    if body is not None and body != {}:
        raise ValidationFailed([{"path": "", "message": "an item control takes no body (or {})"}])
    ctx = ctx_of(request)
    item_id = _item_id(request)
    try:
        out = await run(ctx.q, item_id, who)
    except batches.ExclusiveKeyBusy as exc:  # reopening its batch would take back a held key
        raise _key_busy(exc) from None
    if out.result.kind is store.ControlKind.NOT_FOUND:
        raise Problem(404, f"no item {request.match_info['id']!r}")
    if out.result.kind is store.ControlKind.CONFLICT:
        raise Problem(
            409,
            out.result.reason,
            extensions={"item_status": out.status, "batch_id": str(out.batch_id)},
        )
    row = await ctx.q.get_item(item_id, tenant=who.tenant_filter)
    if row is None:  # its batch was deleted just now
        raise Problem(404, f"no item {request.match_info['id']!r}")
    return _json(models.item_json(row, with_errors=True, tracebacks=who.sees_tracebacks))


@routes.post("/v1/items/{id}/cancel")
async def cancel_item(request: web.Request) -> web.Response:
    """Cancel a queued or running item; its batch follows in the same transaction."""
    return await _item_control(
        request, lambda q, iid, who: q.cancel_item(iid, tenant=who.tenant_filter, actor=who.name)
    )


@routes.post("/v1/items/{id}/retry")
async def retry_item(request: web.Request) -> web.Response:
    """Queue a failed, cancelled or succeeded item again; a finished batch reopens."""
    return await _item_control(
        request,
        lambda q, iid, who: batches.retry_item(q, iid, tenant=who.tenant_filter, actor=who.name),
    )


@routes.get("/v1/batches/{id}/summary")
async def get_summary(request: web.Request) -> web.Response:
    principal(request).require("read")
    row = await _batch_or_404(request)
    return _json(await batches.summary(ctx_of(request).db, row))


@routes.get("/v1/batches/{id}/log")
async def get_log(request: web.Request) -> web.Response:
    principal(request).require("read")
    row = await _batch_or_404(request)
    rows = await ctx_of(request).q.batch_log(row.id)
    return _json(
        {
            "batch_id": str(row.id),
            "entries": [
                {
                    "at": models.rfc3339(r.at),
                    "action": r.action,
                    "actor": r.actor,
                    "detail": models.loads(r.detail),
                }
                for r in rows
            ],
        }
    )


@routes.get("/v1/batches/{id}/events")
async def events(request: web.Request) -> web.StreamResponse:
    who = principal(request)
    who.require("read")
    row = await _batch_or_404(request)
    ctx = ctx_of(request)
    with ctx.streams.slot(who.name):
        return await sse.stream(request, ctx, row)


def _pipeline_json(p: Any) -> dict[str, Any]:
    return {
        "name": p.name,
        "stages": [{"name": s.name, "handler": s.handler, "items": s.items} for s in p.stages],
        "on_stage_failure": p.on_stage_failure,
    }


def _run_key_busy(exc: pipeline_runs.RunKeyBusy) -> Problem:
    """409 naming the running run that holds the exclusive key."""
    return Problem(
        409, str(exc), extensions={"active_run_id": str(exc.run_id), "exclusive_key": exc.key}
    )


@routes.get("/v1/pipelines")
async def list_pipelines(request: web.Request) -> web.Response:
    principal(request).require("read")
    cfg = ctx_of(request).cfg
    return _json({"pipelines": [_pipeline_json(p) for p in cfg.pipelines.values()]})


@routes.post("/v1/pipelines/{name}/runs")
async def create_run(request: web.Request) -> web.Response:
    """A run of a configured pipeline: the run and its first stage's batch."""
    ctx = ctx_of(request)
    who = principal(request)
    who.require("write")
    name = request.match_info["name"]
    p = ctx.cfg.pipelines.get(name)
    if p is None:
        raise Problem(404, f"no pipeline {name!r}")
    for stage in p.stages:
        who.may_use(stage.handler, "handler")
    first = ctx.cfg.handlers.get(p.stages[0].handler)
    kl = first.key_limit if first is not None else None
    nr = schemas.run_submission(
        await _read_json(request),
        pipeline=name,
        header_key=request.headers.get("Idempotency-Key"),
        max_items=ctx.cfg.server.max_items_per_batch,
        key_limit=(kl.key, kl.tokens) if kl is not None else None,
    )
    try:
        run, created = await pipeline_runs.submit(
            ctx.db, ctx.cfg, nr, tenant=who.tenant, actor=who.name
        )
    except pipeline_runs.RunIdempotencyConflict as exc:
        raise Problem(409, str(exc)) from None
    except pipeline_runs.RunKeyBusy as exc:
        raise _run_key_busy(exc) from None
    body = await pipeline_runs.describe(ctx.q, run)
    return _json(body, 201 if created else 200, {"Location": f"/v1/pipeline-runs/{body['id']}"})


@routes.get("/v1/pipeline-runs")
async def list_runs(request: web.Request) -> web.Response:
    ctx = ctx_of(request)
    who = principal(request)
    who.require("read")
    q = request.query
    limit = schemas.limit_param(q.get("limit"))
    before = _newest_first_cursor(q.get("cursor"))
    rows = await ctx.q.list_pipeline_runs(
        tenant=who.tenant_filter,
        status=schemas.status_param(q.get("status"), states.RunStatus),
        pipeline=schemas.text_param("pipeline", q.get("pipeline")),
        before=before,
        limit=limit + 1,
    )
    rows, nxt = _newest_first_page(rows, limit)
    return _json({"runs": await pipeline_runs.describe_all(ctx.q, rows), "next_cursor": nxt})


async def _run_or_404(request: web.Request) -> store.RunRow:
    ctx = ctx_of(request)
    rid = pipeline_runs.parse_id(request.match_info["id"])
    row = (
        None
        if rid is None
        else await ctx.q.get_pipeline_run(rid, tenant=principal(request).tenant_filter)
    )
    if row is None:
        raise Problem(404, f"no pipeline run {request.match_info['id']!r}")
    return row


@routes.get("/v1/pipeline-runs/{id}")
async def get_run(request: web.Request) -> web.Response:
    principal(request).require("read")
    row = await _run_or_404(request)
    return _json(await pipeline_runs.describe(ctx_of(request).q, row))


RunControl = Callable[[uuid.UUID, Principal], Awaitable[store.RunRow | None]]


async def _run_control(request: web.Request, control: RunControl) -> web.Response:
    """One run control for the caller: 404 for an id that names no run, 409 when
    it does not apply to the run as it is."""
    who = principal(request)
    who.require("write")
    rid = pipeline_runs.parse_id(request.match_info["id"])
    try:
        row = None if rid is None else await control(rid, who)
    except pipeline_runs.RunConflict as exc:
        raise Problem(409, str(exc)) from None
    if row is None:
        raise Problem(404, f"no pipeline run {request.match_info['id']!r}")
    return _json(await pipeline_runs.describe(ctx_of(request).q, row))


@routes.post("/v1/pipeline-runs/{id}/cancel")
async def cancel_run(request: web.Request) -> web.Response:
    db = ctx_of(request).db
    return await _run_control(
        request,
        lambda rid, who: pipeline_runs.cancel(db, rid, tenant=who.tenant_filter, actor=who.name),
    )


def _run_pausing(request: web.Request, paused: bool) -> RunControl:
    db = ctx_of(request).db
    return lambda rid, who: pipeline_runs.pause(
        db, rid, tenant=who.tenant_filter, actor=who.name, paused=paused
    )


@routes.post("/v1/pipeline-runs/{id}/pause")
async def pause_run(request: web.Request) -> web.Response:
    return await _run_control(request, _run_pausing(request, True))


@routes.post("/v1/pipeline-runs/{id}/resume")
async def resume_run(request: web.Request) -> web.Response:
    return await _run_control(request, _run_pausing(request, False))


@routes.post("/v1/pipeline-runs/{id}/retry")
async def retry_run(request: web.Request) -> web.Response:
    principal(request).require("write")  # before reading the body: a 403 is no 422
    include = _include_cancelled(await _read_json(request))
    db = ctx_of(request).db
    return await _run_control(
        request,
        lambda rid, who: pipeline_runs.retry(
            db, rid, tenant=who.tenant_filter, actor=who.name, include_cancelled=include
        ),
    )


@routes.get("/v1/pipeline-runs/{id}/events")
async def run_events(request: web.Request) -> web.StreamResponse:
    who = principal(request)
    who.require("read")
    row = await _run_or_404(request)
    ctx = ctx_of(request)
    with ctx.streams.slot(who.name):
        return await sse.run_stream(request, ctx, row)


@routes.get("/v1/workers")
async def workers(request: web.Request) -> web.Response:
    # Hosts and pids of the whole fleet, across tenants: operators only.
    principal(request).require("admin")
    rows = await ctx_of(request).q.list_workers()
    return _json(
        {
            "workers": [
                {
                    "name": r.name,
                    "host": r.host,
                    "pid": r.pid,
                    "state": r.state,
                    "started_at": models.rfc3339(r.started_at),
                    "heartbeat_at": models.rfc3339(r.heartbeat_at),
                    "in_flight": r.in_flight,
                    "concurrency": r.concurrency,
                }
                for r in rows
            ]
        }
    )


LIMITS_THROTTLES_MAX = 1000  # throttled keys listed at most, in all
LIMITS_KEYS_MAX = 1000  # keys in use listed at most, per handler


def _key_usage(u: store.KeyUsage, budget: float | None, period_s: float) -> dict[str, Any]:
    out: dict[str, Any] = {
        "limit_key": u.limit_key,
        "running": u.running,
        "tokens": None if u.tokens is None else round(u.tokens, 3),
        "throttled_until": models.rfc3339(u.throttled_until),
    }
    if budget is not None:
        start = u.budget_period_start
        out["budget"] = {
            "used": u.budget_used or 0.0,
            "budget": budget,
            "period_start": models.rfc3339(start),
            "period_end": models.rfc3339(start + timedelta(seconds=period_s)) if start else None,
        }
    return out


@routes.get("/v1/limits")
async def limits(request: web.Request) -> web.Response:
    # Limit keys are payload values (domains, API key names) of every tenant:
    # operators only, as for /v1/workers.
    principal(request).require("admin")
    ctx = ctx_of(request)
    rows = await ctx.q.key_throttles(limit=LIMITS_THROTTLES_MAX + 1)
    truncated = len(rows) > LIMITS_THROTTLES_MAX
    paused: dict[str, list[dict[str, Any]]] = {}
    for r in rows[:LIMITS_THROTTLES_MAX]:
        paused.setdefault(r.handler, []).append(
            {"limit_key": r.limit_key, "throttled_until": models.rfc3339(r.throttled_until)}
        )
    out = []
    for name, h in sorted(ctx.cfg.handlers.items()):
        kl = h.key_limit
        if kl is None:
            continue
        # Read from the database, so what every daemon runs is counted.
        usage = await ctx.q.key_usage(
            handler=name,
            key_rate=kl.rate_per_s,
            key_burst=kl.burst,
            limit=LIMITS_KEYS_MAX + 1,
            budget_period_s=kl.budget_period_s if kl.budget is not None else None,
        )
        keys_truncated = len(usage) > LIMITS_KEYS_MAX
        truncated = truncated or keys_truncated
        out.append(
            {
                "name": name,
                "key_limit": {
                    "key": kl.key,
                    "concurrency": kl.concurrency,
                    "rate_limit": kl.rate_limit,
                    "burst": kl.burst if kl.rate_per_s is not None else None,
                    "budget": kl.budget,
                    "budget_period": kl.budget_period if kl.budget is not None else None,
                    "cost": kl.cost if kl.budget is not None else None,
                },
                "throttled_keys": paused.get(name, []),
                "keys": [
                    _key_usage(u, kl.budget, kl.budget_period_s) for u in usage[:LIMITS_KEYS_MAX]
                ],
                "keys_truncated": keys_truncated,
            }
        )
    return _json({"handlers": out, "truncated": truncated})


@routes.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    reasons = ctx_of(request).health()
    if reasons:
        return _json({"status": "unhealthy", "reasons": reasons}, 503)
    return _json({"status": "ok"})


@routes.get("/readyz")
async def readyz(request: web.Request) -> web.Response:
    ready, reasons = await ctx_of(request).readiness()
    return _json({"ready": ready, "reasons": reasons}, 200 if ready else 503)


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    body = ctx_of(request).metrics.render()
    return web.Response(
        body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"}
    )


# -- schedules -----------------------------------------------------------------------


def _visible_plans(request: web.Request) -> list[schedules.Plan]:
    """The schedules of the caller's tenant (every schedule for admins)."""
    who = principal(request)
    who.require("read")
    tenant = who.tenant_filter
    return [p for p in ctx_of(request).plans.values() if tenant is None or p.cfg.tenant == tenant]


def _plan_or_404(request: web.Request) -> schedules.Plan:
    name = request.match_info["name"]
    for p in _visible_plans(request):
        if p.cfg.name == name:
            return p
    raise Problem(404, f"no schedule {name!r}")


async def _schedule_json(request: web.Request, plan: schedules.Plan) -> dict[str, Any]:
    return (await schedules.describe(ctx_of(request).q, [plan]))[0]


@routes.get("/v1/schedules")
async def list_schedules(request: web.Request) -> web.Response:
    plans = _visible_plans(request)
    return _json({"schedules": await schedules.describe(ctx_of(request).q, plans)})


@routes.get("/v1/schedules/{name}")
async def get_schedule(request: web.Request) -> web.Response:
    return _json(await _schedule_json(request, _plan_or_404(request)))


async def _set_paused(request: web.Request, paused: bool) -> web.Response:
    plan = _plan_or_404(request)
    who = principal(request)
    who.require("write")
    await ctx_of(request).q.set_schedule_paused(plan.cfg.name, paused=paused, actor=who.name)
    return _json(await _schedule_json(request, plan))


@routes.post("/v1/schedules/{name}/pause")
async def pause_schedule(request: web.Request) -> web.Response:
    return await _set_paused(request, True)


@routes.post("/v1/schedules/{name}/resume")
async def resume_schedule(request: web.Request) -> web.Response:
    return await _set_paused(request, False)


@routes.post("/v1/schedules/{name}/run")
async def run_schedule(request: web.Request) -> web.Response:
    """Run now: one manual run outside the slot sequence (paused or not), under
    the schedule's overlap policy; 409 when that refuses it."""
    plan = _plan_or_404(request)
    who = principal(request)
    who.require("write")
    ctx = ctx_of(request)
    await ctx.q.ensure_schedules([plan.cfg.name])
    try:
        fired = await schedules.fire(
            ctx.db,
            ctx.cfg,
            plan,
            slot_at=None,
            kind="manual",
            worker=ctx.cfg.worker.name,
            actor=who.name,
        )
    except batches.ExclusiveKeyBusy as exc:
        raise _key_busy(exc) from None
    except pipeline_runs.RunKeyBusy as exc:
        raise _run_key_busy(exc) from None
    except schedules.ItemsFailed as exc:
        raise Problem(409, f"the schedule's items could not be built: {exc}") from None
    if fired.run is not None:  # a pipeline schedule's run
        return _json(
            {"schedule": await _schedule_json(request, plan), "run": fired.run},
            201,
            {"Location": f"/v1/pipeline-runs/{fired.run['id']}"},
        )
    b = fired.batch
    if b is None:  # the schedule's row was deleted under us
        raise Problem(409, f"schedule {plan.cfg.name!r} could not be run: {fired.detail}")
    return _json(
        {"schedule": await _schedule_json(request, plan), "batch": b},
        201,
        {"Location": f"/v1/batches/{b['id']}"},
    )
