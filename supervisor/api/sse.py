"""Server-Sent Events for one batch.

On connect: ``snapshot`` (the batch JSON). Then, on every change (woken by
NOTIFY from any daemon, or polling when LISTEN is down): ``item`` events for
items that reached a terminal state, ``progress`` events for running items whose
handler reported progress since the last look (the latest report of each; on
connect, every running item's), and a new ``snapshot`` when the version moved,
at most ~5 per second. After the terminal snapshot: ``end``, and the
stream closes. Snapshots carry ``id: <version>``; ``Last-Event-ID`` resumes
item events from that version (at least once: a resumed stream may repeat an
item event, never skip one).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from datetime import UTC, datetime
from typing import Any

import anyio
from aiohttp import web

from supervisor import batches, models, pipeline_runs, states, store
from supervisor.api.context import ApiContext, principal
from supervisor.errors import DatabaseUnavailable
from supervisor.events import Wakeup

log = logging.getLogger(__name__)
MIN_SNAPSHOT_GAP_S = 0.2
POLL_S = 0.25
LISTEN_IDLE_S = 5.0
KEEPALIVE_S = 15.0
ITEMS_PER_TICK = 1000
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _frame(event: str, data: Any, event_id: int | None = None) -> bytes:
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


async def stream(request: web.Request, ctx: ApiContext, row: store.BatchRow) -> web.StreamResponse:
    try:
        return await _stream(request, ctx, row)
    except ConnectionResetError:
        # The client went away (a closed dashboard tab): normal for a stream, not
        # an error of ours.
        log.debug("sse.client_gone batch=%s", row.id)
        return web.Response()


async def _stream(request: web.Request, ctx: ApiContext, row: store.BatchRow) -> web.StreamResponse:
    resp = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
        }
    )
    await resp.prepare(request)
    tracebacks = principal(request).sees_tracebacks
    batch_id = row.id
    resume = request.headers.get("Last-Event-ID", "")
    valid = resume.isascii() and resume.isdigit() and len(resume) <= 18  # fits a bigint
    cursor = int(resume) if valid else row.version
    sent_version = -1
    progress_since = EPOCH
    last_snapshot = 0.0
    last_write = time.monotonic()
    with ctx.bus.subscribe(str(batch_id)) as changed:
        while True:
            try:
                fresh = await ctx.q.get_batch(batch_id, tenant=None)
                if fresh is None:
                    break  # deleted meanwhile
                row = fresh
                items = await ctx.q.items_finished_since(
                    batch_id=batch_id, version=cursor, limit=ITEMS_PER_TICK
                )
                progressed = await ctx.q.items_progress_since(
                    batch_id=batch_id, since=progress_since, limit=ITEMS_PER_TICK
                )
            except DatabaseUnavailable:
                await changed.wait(1.0)
                continue
            for it in items:
                await resp.write(
                    _frame(
                        "item",
                        {
                            "id": str(it.id),
                            "key": it.key,
                            "status": it.status,
                            "error": models.error_json(it.error, tracebacks=tracebacks),
                        },
                    )
                )
                cursor = max(cursor, it.finished_version)
            for p in progressed:
                await resp.write(
                    _frame("progress", {"id": str(p.id), "key": p.key} | json.loads(p.progress))
                )
                progress_since = max(progress_since, p.progress_at)
            if len(items) == ITEMS_PER_TICK:
                continue  # more finished items to send before the snapshot
            if row.version != sent_version:
                snapshot = await batches.describe(ctx.q, row)
                await resp.write(_frame("snapshot", snapshot, row.version))
                sent_version = row.version
                cursor = max(cursor, row.version)
                last_snapshot = time.monotonic()
                last_write = last_snapshot
            if models.is_terminal(row):
                await resp.write(
                    _frame("end", {"batch_id": str(batch_id), "status": row.status}, row.version)
                )
                break
            if ctx.bus.closing:
                break  # the daemon is draining: clients reconnect to another one
            await changed.wait(LISTEN_IDLE_S if ctx.bus.listening else POLL_S)
            if ctx.bus.closing:
                break
            gap = MIN_SNAPSHOT_GAP_S - (time.monotonic() - last_snapshot)
            if gap > 0:
                await anyio.sleep(gap)  # coalesce bursts of changes into one snapshot
            if time.monotonic() - last_write > KEEPALIVE_S:
                await resp.write(b": keepalive\n\n")
                last_write = time.monotonic()
    await resp.write_eof()
    return resp


async def run_stream(
    request: web.Request, ctx: ApiContext, run: store.RunRow
) -> web.StreamResponse:
    try:
        return await _run_stream(request, ctx, run)
    except ConnectionResetError:
        log.debug("sse.client_gone run=%s", run.id)
        return web.Response()


async def _run_stream(
    request: web.Request, ctx: ApiContext, run: store.RunRow
) -> web.StreamResponse:
    """A pipeline run's stream. On connect and on every change: ``snapshot`` (the
    run JSON); ``stage`` when a stage starts (its batch is created) or ends (its
    batch is terminal, or it was skipped); after the run's terminal snapshot,
    ``end``. Woken by the run's own announcements and its current stage batch's,
    from any daemon (polling when LISTEN is down)."""
    resp = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
        }
    )
    await resp.prepare(request)
    sent: dict[str, Any] | None = None
    seen: dict[str, str] = {}  # stage name -> the last status told
    last_write = time.monotonic()
    with ctx.bus.subscribe(str(run.id)) as run_changed:
        while True:
            try:
                fresh = await ctx.q.get_pipeline_run(run.id, tenant=None)
                if fresh is None:
                    break  # deleted meanwhile
                run = fresh
                snapshot = await pipeline_runs.describe(ctx.q, run)
            except DatabaseUnavailable:
                await run_changed.wait(1.0)
                continue
            for st in snapshot["stages"]:
                status, before = st["status"], seen.get(st["name"])
                if status == before or status == "pending":
                    continue
                if before is None and status != "skipped":
                    await resp.write(_frame("stage", {"event": "started"} | st))
                if status in ("skipped", "deleted") or states.is_batch_terminal(status):
                    await resp.write(_frame("stage", {"event": "ended"} | st))
                seen[st["name"]] = status
            if snapshot != sent:
                await resp.write(_frame("snapshot", snapshot))
                sent = snapshot
                last_write = time.monotonic()
            if run.status != states.RunStatus.RUNNING:
                await resp.write(_frame("end", {"run_id": str(run.id), "status": run.status}))
                break
            if ctx.bus.closing:
                break
            current = next(
                (
                    s["batch_id"]
                    for s in snapshot["stages"]
                    if s["name"] == snapshot["current_stage"]
                ),
                None,
            )
            idle = LISTEN_IDLE_S if ctx.bus.listening else POLL_S
            with contextlib.ExitStack() as stack:
                waits = [run_changed]
                if current is not None:
                    waits.append(stack.enter_context(ctx.bus.subscribe(current)))
                await _first_of(waits, idle)
            if ctx.bus.closing:
                break
            if time.monotonic() - last_write > KEEPALIVE_S:
                await resp.write(b": keepalive\n\n")
                last_write = time.monotonic()
            await anyio.sleep(MIN_SNAPSHOT_GAP_S)  # coalesce bursts of changes
    await resp.write_eof()
    return resp


async def _first_of(waits: list[Wakeup], timeout: float) -> None:  # noqa: ASYNC109 - a bounded wait
    """Until any of ``waits`` (Wakeups) is set, or ``timeout``."""
    if len(waits) == 1:
        await waits[0].wait(timeout)
        return
    async with anyio.create_task_group() as tg:

        async def one(w: Wakeup) -> None:
            await w.wait(timeout)
            tg.cancel_scope.cancel()

        for w in waits:
            tg.start_soon(one, w)
