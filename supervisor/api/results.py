"""A batch's results as a dataset: every item's id, key, status, attempts, result
and last error, as JSON Lines or CSV (GET /v1/batches/{id}/results).

The body is streamed page by page, each page a keyset query on the item id
written out before the next is fetched, so a million-item batch costs the memory
of one page, and no database connection is held while a slow client reads.
Records come in id order and each carries its id: a client that lost the
connection asks again with ``after=<the last id it got>`` and receives exactly
the rest. A stream that fails part-way (the database went away) is cut without
its final chunk, so the client sees a truncated response, never a short one that
looks complete.
"""

from __future__ import annotations

import csv
import io
import logging
import uuid
from collections.abc import Sequence
from typing import Any

from aiohttp import web

from supervisor import models, store
from supervisor.api.context import ApiContext
from supervisor.api.schemas import RESULT_MEDIA
from supervisor.errors import DatabaseUnavailable

log = logging.getLogger(__name__)
# Rows per page: the same as the largest GET …/items page, so an export holds no
# more at once than a listing does; a test derives its batch size from it.
PAGE_ROWS = 500
COLUMNS = ("id", "key", "status", "attempts", "result", "error")


def record(r: store.ItemResult, *, tracebacks: bool) -> dict[str, Any]:
    """One item's outcome as JSON (the id as a string, like every item id)."""
    return {
        "id": str(r.id),
        "key": r.key,
        "status": r.status,
        "attempts": r.attempts,
        "result": models.loads(r.result),
        "error": models.error_json(r.error, tracebacks=tracebacks),
    }


def jsonl_page(rows: Sequence[store.ItemResult], *, tracebacks: bool) -> bytes:
    return "".join(
        models.compact_json(record(r, tracebacks=tracebacks)) + "\n" for r in rows
    ).encode()


def _cell(value: Any) -> str:
    """A JSON value as a CSV cell: compact JSON text, empty for null."""
    return "" if value is None else models.compact_json(value)


def csv_page(rows: Sequence[store.ItemResult], *, tracebacks: bool, header: bool) -> bytes:
    """RFC 4180 rows (quoted where needed, CRLF); a null key, result or error is
    an empty cell (a key is never empty, so an empty key cell always means null)."""
    buf = io.StringIO()
    w = csv.writer(buf)
    if header:
        w.writerow(COLUMNS)
    for r in rows:
        rec = record(r, tracebacks=tracebacks)
        w.writerow(
            (
                rec["id"],
                rec["key"] if rec["key"] is not None else "",
                rec["status"],
                rec["attempts"],
                _cell(rec["result"]),
                _cell(rec["error"]),
            )
        )
    return buf.getvalue().encode()


async def stream(
    request: web.Request,
    ctx: ApiContext,
    batch_id: uuid.UUID,
    *,
    fmt: str,
    statuses: list[str] | None,
    after: int,
    tracebacks: bool,
) -> web.StreamResponse:
    async def page(after: int) -> list[store.ItemResult]:
        return await ctx.q.item_results(
            batch_id=batch_id, statuses=statuses, after=after, limit=PAGE_ROWS
        )

    def encode(rows: Sequence[store.ItemResult], first: bool) -> bytes:
        if fmt == "csv":
            return csv_page(rows, tracebacks=tracebacks, header=first)
        return jsonl_page(rows, tracebacks=tracebacks)

    media = RESULT_MEDIA[fmt] + ("; charset=utf-8" if fmt == "csv" else "")
    resp = web.StreamResponse(headers={"Content-Type": media, "Cache-Control": "no-store"})
    if request.method == "HEAD":  # the headers only: no page is read for a body never sent
        await resp.prepare(request)
        await resp.write_eof()
        return resp
    # The first page before the status line: a database that is away now is a 503
    # the client can act on, not a 200 cut short.
    rows = await page(after)
    await resp.prepare(request)
    first = True
    try:
        while True:
            await resp.write(encode(rows, first))
            first = False
            if len(rows) < PAGE_ROWS:
                break
            after = rows[-1].id
            rows = await page(after)
    except ConnectionResetError:
        log.debug("api.results_client_gone batch=%s", batch_id)
        return resp
    except Exception as exc:
        # Past the status line no error response can be sent: cut the connection
        # before the final chunk so the client knows the body is incomplete (it
        # resumes with after=<its last id>). Falling through to the middleware
        # would write a second response into this one.
        if isinstance(exc, DatabaseUnavailable):
            log.warning("api.results_aborted batch=%s after=%s error=%s", batch_id, after, exc)
        else:
            log.exception("api.results_aborted batch=%s after=%s", batch_id, after)
        if request.transport is not None:
            request.transport.close()
        return resp
    await resp.write_eof()
    return resp
