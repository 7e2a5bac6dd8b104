"""The Python client of the batch-supervisor HTTP API, for programs.

    from supervisor.client import Client

    with Client() as bsv:  # BATCH_SUPERVISOR_URL / BATCH_SUPERVISOR_TOKEN, or arguments
        batch = bsv.submit("extract", [{"file": f} for f in files])
        done = bsv.wait(batch.id)            # the batch's event stream, to its end
        for rec in bsv.iter_results(batch.id):
            print(rec["key"], rec["status"], rec["result"])

:class:`AsyncClient` is the same API for asyncio code (``async with AsyncClient()
as bsv: await bsv.submit(...)``); :class:`Client` runs one in a thread of its own,
so it works from any synchronous code, a web request handler included.

- ``submit`` always sends an idempotency key (a new UUID unless you pass one),
  so it retries a connection error or a 503 safely: a repeat of a submission the
  daemon already accepted answers with that batch, never a second one.
- ``wait`` and ``events`` follow the batch's SSE stream and reconnect with
  ``Last-Event-ID`` when a daemon drains or the connection drops.
- ``iter_results`` streams the results export and resumes after the last item
  received when the connection drops.
- Errors are exceptions carrying the problem+json fields: :class:`ApiError`
  (``status``, ``type``, ``title``, ``detail``, ``errors``, ``body``) and its
  subclasses by status (:class:`NotFound`, :class:`Conflict`, ...), and
  :class:`ConnectionFailed`. Every message is one line.

Only aiohttp, which the daemon already depends on: no further dependency.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import dataclasses
import json
import logging
import os
import random
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar
from urllib.parse import quote

import aiohttp
import anyio.from_thread

log = logging.getLogger("supervisor.client")
DEFAULT_URL = "http://127.0.0.1:8080"
ENV_URL = "BATCH_SUPERVISOR_URL"
ENV_TOKEN = "BATCH_SUPERVISOR_TOKEN"
TERMINAL = frozenset({"completed", "completed_with_errors", "failed", "cancelled"})
RECONNECTS = 10  # consecutive failed attempts before a stream or an export gives up
SUBMIT_RETRIES = 5  # submissions retried after a connection error or a 503
# No total limit on streams: a million-item export takes minutes; a silent
# connection does not.
STREAM_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=60)

T = TypeVar("T")

# --------------------------------------------------------------------------- errors

# C0 and C1 controls and the bidi overrides: server text (item keys, error
# messages: client data) must not drive a terminal it is printed on.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def printable(text: str) -> str:
    """``text`` with control characters shown as escapes (``\\x1b``)."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


def one_line(text: str) -> str:
    return printable(" ".join(text.split()))


class ClientError(Exception):
    """A call to the API failed; ``str()`` is one line, safe to print."""


class ConnectionFailed(ClientError):
    """The daemon could not be reached, or the connection broke before an answer."""


class ApiError(ClientError):
    """The daemon answered with an error (application/problem+json)."""

    def __init__(self, method: str, url: str, status: int, text: str) -> None:
        self.method, self.url, self.status = method, url, status
        self.body: dict[str, Any] = {}
        with contextlib.suppress(ValueError):
            parsed = json.loads(text)
            if isinstance(parsed, dict):
                self.body = parsed
        self.type: str | None = self.body.get("type")
        self.title: str | None = self.body.get("title")
        self.detail: str = str(self.body.get("detail") or self.title or text.strip()[:500])
        raw_errors = self.body.get("errors")
        self.errors: list[dict[str, Any]] = raw_errors if isinstance(raw_errors, list) else []
        detail = self.detail or "(empty response)"
        extra = [
            f"{e.get('path') or '/'}: {e.get('message')}"
            for e in self.errors
            if isinstance(e, dict) and str(e.get("message")) not in detail
        ]
        if extra:
            detail += "; " + "; ".join(extra[:5])
        super().__init__(one_line(f"{method} {url}: {status} {detail}"))

    def __getitem__(self, member: str) -> Any:
        """An extension member of the problem, e.g. ``exc["active_batch_id"]``."""
        return self.body[member]


class BadRequest(ApiError):
    """400: malformed JSON or a bad query parameter."""


class Unauthorized(ApiError):
    """401: no token, or not a valid one."""


class Forbidden(ApiError):
    """403: the token may not do this (tenant, handler or admin grant)."""


class NotFound(ApiError):
    """404: no such batch, item or schedule (or not this tenant's)."""


class Conflict(ApiError):
    """409: the state forbids it (an idempotency key reused with other content, an
    exclusive key held: ``exc["active_batch_id"]``, a control on a terminal batch)."""


class Invalid(ApiError):
    """422: the request is well-formed but invalid; ``errors`` names each field."""


class TooManyRequests(ApiError):
    """429: a limit of the daemon (streams, connections)."""


class Unavailable(ApiError):
    """503: the daemon is draining or its database is away; try again."""


_BY_STATUS: dict[int, type[ApiError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    422: Invalid,
    429: TooManyRequests,
    503: Unavailable,
}


def api_error(method: str, url: str, status: int, text: str) -> ApiError:
    """The exception for an error answer, by status."""
    return _BY_STATUS.get(status, ApiError)(method, url, status, text)


# --------------------------------------------------------------------------- models


@dataclasses.dataclass(frozen=True)
class Counts:
    total: int
    queued: int
    running: int
    succeeded: int
    failed: int
    cancelled: int


@dataclasses.dataclass(frozen=True)
class Batch:
    """A batch as the API shows it; ``raw`` is the whole JSON (every field, also
    those newer than this client)."""

    id: str
    handler: str
    status: str
    counts: Counts
    progress: float
    metadata: dict[str, Any]
    created_at: str
    started_at: str | None
    finished_at: str | None
    version: int
    raw: dict[str, Any] = dataclasses.field(repr=False, compare=False)

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    @classmethod
    def of(cls, d: Mapping[str, Any]) -> Batch:
        c = d["counts"]
        return cls(
            id=str(d["id"]),
            handler=str(d["handler"]),
            status=str(d["status"]),
            counts=Counts(**{f.name: int(c[f.name]) for f in dataclasses.fields(Counts)}),
            progress=float(d["progress"]),
            metadata=dict(d.get("metadata") or {}),
            created_at=str(d["created_at"]),
            started_at=d.get("started_at"),
            finished_at=d.get("finished_at"),
            version=int(d["version"]),
            raw=dict(d),
        )


@dataclasses.dataclass(frozen=True)
class Item:
    """An item as the API shows it (``errors`` only from :meth:`AsyncClient.get_item`)."""

    id: str
    batch_id: str
    key: str | None
    status: str
    payload: Any
    result: Any
    attempts: int
    max_attempts: int
    error: dict[str, Any] | None
    progress: dict[str, Any] | None
    errors: list[dict[str, Any]] | None
    raw: dict[str, Any] = dataclasses.field(repr=False, compare=False)

    @classmethod
    def of(cls, d: Mapping[str, Any]) -> Item:
        return cls(
            id=str(d["id"]),
            batch_id=str(d["batch_id"]),
            key=d.get("key"),
            status=str(d["status"]),
            payload=d.get("payload"),
            result=d.get("result"),
            attempts=int(d["attempts"]),
            max_attempts=int(d["max_attempts"]),
            error=d.get("error"),
            progress=d.get("progress"),
            errors=d.get("errors"),
            raw=dict(d),
        )


@dataclasses.dataclass(frozen=True)
class Event:
    """One event of a batch's stream: ``snapshot`` (``data`` is the batch JSON),
    ``item`` (an item reached a terminal state), ``progress`` or ``end``."""

    kind: str
    data: Any
    id: str | None

    @property
    def batch(self) -> Batch | None:
        return Batch.of(self.data) if self.kind == "snapshot" else None


# --------------------------------------------------------------------------- async client


class AsyncClient:
    """The API for asyncio code. ``base_url`` and ``token`` default to the
    environment (BATCH_SUPERVISOR_URL, BATCH_SUPERVISOR_TOKEN: what the CLI reads),
    then to http://127.0.0.1:8080 without a token. Use it as an async context
    manager, or call :meth:`aclose`."""

    def __init__(
        self,
        base_url: str | None = None,
        token: str | None = None,
        *,
        timeout: float = 30.0,
        submit_retries: int = SUBMIT_RETRIES,
    ) -> None:
        self.base_url = (base_url or os.environ.get(ENV_URL) or DEFAULT_URL).rstrip("/")
        token = token if token is not None else os.environ.get(ENV_TOKEN)
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._submit_retries = submit_retries
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        return self._session

    def url(self, path: str) -> str:
        return self.base_url + path

    # -- plain calls

    async def request(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        params: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Any:
        """One call; the parsed JSON answer (None for an empty one). Raises
        :class:`ApiError` (by status) or :class:`ConnectionFailed`."""
        url = self.url(path)
        headers = self._headers | dict(headers or {})
        if method not in ("GET", "HEAD"):
            headers["Content-Type"] = "application/json"  # the API refuses changes without it
        try:
            async with self._http().request(
                method, url, headers=headers, json=json_body, params=params
            ) as resp:
                text = await resp.text()
                if resp.status >= 400:
                    raise api_error(method, url, resp.status, text)
                try:
                    return json.loads(text) if text else None
                except ValueError:
                    raise ClientError(
                        f"{method} {url}: {resp.status} but the body is not JSON "
                        "(is this a batch-supervisor API?)"
                    ) from None
        except aiohttp.ClientError as exc:
            raise ConnectionFailed(one_line(f"cannot reach {url}: {exc}")) from None
        except TimeoutError:
            raise ConnectionFailed(f"{method} {url}: no answer in time") from None

    async def submit(
        self,
        handler: str,
        items: Sequence[Any],
        *,
        idempotency_key: str | None = None,
        traceparent: str | None = None,
        tracestate: str | None = None,
        **fields: Any,
    ) -> Batch:
        """Create a batch (``items``: payloads, or ``{"payload": ..., "key": ...}``;
        ``fields``: the other submission fields, e.g. ``metadata``, ``priority``,
        ``exclusive_key``, ``after``, ``not_before``). Retried after a connection
        error or a 503 with the same idempotency key, so at most one batch is made.
        ``traceparent``/``tracestate``: the W3C trace context the batch's spans join
        (README "Tracing"), e.g. your current span's."""
        body = {"handler": handler, "items": list(items), **fields}
        body["idempotency_key"] = idempotency_key or str(uuid.uuid4())
        trace = {"traceparent": traceparent} if traceparent else {}
        if traceparent and tracestate:
            trace["tracestate"] = tracestate
        attempt = 0
        while True:
            try:
                return Batch.of(
                    await self.request("POST", "/v1/batches", json_body=body, headers=trace)
                )
            except (ConnectionFailed, Unavailable) as exc:
                attempt += 1
                if attempt > self._submit_retries:
                    raise
                delay = min(5.0, 0.2 * 2**attempt) * (0.5 + random.random())
                log.info("submit: retrying in %.1fs with the same idempotency key: %s", delay, exc)
                await asyncio.sleep(delay)

    async def get_batch(self, batch_id: str) -> Batch:
        return Batch.of(await self.request("GET", f"/v1/batches/{quote(batch_id, safe='')}"))

    async def list_batches(
        self,
        *,
        status: str | None = None,
        handler: str | None = None,
        exclusive_key: str | None = None,
        page_size: int = 100,
    ) -> AsyncIterator[Batch]:
        """Every batch the token may see, newest first, page after page."""
        params = {"limit": str(page_size)}
        for name, value in (
            ("status", status),
            ("handler", handler),
            ("exclusive_key", exclusive_key),
        ):
            if value is not None:
                params[name] = value
        async for row in self._pages("/v1/batches", "batches", params):
            yield Batch.of(row)

    async def items(
        self, batch_id: str, *, status: str | None = None, page_size: int = 500
    ) -> AsyncIterator[Item]:
        """A batch's items in id order, page after page."""
        params = {"limit": str(page_size)} | ({"status": status} if status else {})
        path = f"/v1/batches/{quote(batch_id, safe='')}/items"
        async for row in self._pages(path, "items", params):
            yield Item.of(row)

    async def _pages(
        self, path: str, member: str, params: dict[str, str]
    ) -> AsyncIterator[dict[str, Any]]:
        cursor: str | None = None
        while True:
            page = await self.request(
                "GET", path, params=params | ({"cursor": cursor} if cursor else {})
            )
            for row in page[member]:
                yield row
            cursor = page.get("next_cursor")
            if not cursor:
                return

    async def get_item(self, item_id: str) -> Item:
        """One item, with its whole error history (``errors``)."""
        return Item.of(await self.request("GET", f"/v1/items/{quote(str(item_id), safe='')}"))

    async def _control(self, batch_id: str, verb: str, body: Any = None) -> Batch:
        path = f"/v1/batches/{quote(batch_id, safe='')}/{verb}"
        return Batch.of(await self.request("POST", path, json_body=body))

    async def cancel(self, batch_id: str) -> Batch:
        return await self._control(batch_id, "cancel")

    async def pause(self, batch_id: str) -> Batch:
        return await self._control(batch_id, "pause")

    async def resume(self, batch_id: str) -> Batch:
        return await self._control(batch_id, "resume")

    async def retry(self, batch_id: str, *, include_cancelled: bool = False) -> Batch:
        body = {"include_cancelled": True} if include_cancelled else None
        return await self._control(batch_id, "retry", body)

    async def redeliver(self, batch_id: str) -> Batch:
        """Run a finished completion callback again (admin)."""
        return await self._control(batch_id, "callback/redeliver")

    async def retry_item(self, item_id: str) -> Item:
        path = f"/v1/items/{quote(str(item_id), safe='')}/retry"
        return Item.of(await self.request("POST", path))

    async def cancel_item(self, item_id: str) -> Item:
        path = f"/v1/items/{quote(str(item_id), safe='')}/cancel"
        return Item.of(await self.request("POST", path))

    # -- the event stream

    async def events(
        self, batch_id: str, *, last_event_id: str | None = None
    ) -> AsyncIterator[Event]:
        """The batch's events until ``end`` (included). When the connection drops
        or a draining daemon closes it, it reconnects with the last event id seen,
        up to RECONNECTS failures in a row: item events are at least once."""
        path = f"/v1/batches/{quote(batch_id, safe='')}/events"
        async for ev in self.stream(path, last_event_id=last_event_id):
            yield ev

    async def stream(self, path: str, *, last_event_id: str | None = None) -> AsyncIterator[Event]:
        """Any of the API's event streams (a batch's, a pipeline run's) until
        ``end``, reconnecting as :meth:`events` does."""
        url = self.url(path)
        failures = 0
        while True:
            try:
                async for ev in self._stream(url, last_event_id):
                    failures = 0
                    last_event_id = ev.id or last_event_id
                    yield ev
                    if ev.kind == "end":
                        return
            except (aiohttp.ClientError, TimeoutError) as exc:
                failures += 1
                if failures > RECONNECTS:
                    raise ConnectionFailed(
                        one_line(f"lost the event stream {url}: {exc}")
                    ) from None
            await asyncio.sleep(min(5.0, 0.2 * 2**failures))

    async def _stream(self, url: str, last_id: str | None) -> AsyncIterator[Event]:
        """The events of one connection to an SSE stream, until it closes."""
        headers = self._headers | {"Accept": "text/event-stream"}
        if last_id is not None:
            headers["Last-Event-ID"] = last_id
        async with self._http().get(url, headers=headers, timeout=STREAM_TIMEOUT) as resp:
            if resp.status >= 400:
                raise api_error("GET", url, resp.status, await resp.text())
            event, event_id, data = "message", None, list[str]()
            async for raw in resp.content:
                line = raw.decode().rstrip("\r\n")
                if not line:
                    if data:
                        yield Event(event, json.loads("\n".join(data)), event_id)
                    event, event_id, data = "message", None, []
                elif line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("id:"):
                    event_id = line[3:].strip()
                elif line.startswith("data:"):
                    data.append(line[5:].strip())

    async def wait(
        self,
        batch_id: str,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - a bounded wait is what callers ask for
        on_event: Callable[[Event], None] | None = None,
    ) -> Batch:
        """Follow the batch's stream until it ends and return the terminal batch
        (``on_event`` sees every event meanwhile). TimeoutError after ``timeout``
        seconds; the batch goes on either way."""
        async with asyncio.timeout(timeout):
            async for ev in self.events(batch_id):
                if on_event is not None:
                    on_event(ev)
        return await self.get_batch(batch_id)

    # -- results

    async def iter_results(
        self,
        batch_id: str,
        *,
        status: str | Sequence[str] | None = None,
        after: str | int | None = None,
    ) -> AsyncIterator[dict[str, Any]]:
        """Every item's outcome (``id``, ``key``, ``status``, ``attempts``,
        ``result``, ``error``) in id order, from the JSON Lines export, resumed by
        itself after a dropped connection. To continue a run that stopped, pass the
        last ``id`` it got as ``after``; ``status`` keeps only those statuses."""
        async for _, rec in self.result_records(batch_id, status=status, after=after):
            yield rec

    async def result_records(
        self,
        batch_id: str,
        *,
        fmt: str = "jsonl",
        status: str | Sequence[str] | None = None,
        after: str | int | None = None,
    ) -> AsyncIterator[tuple[str, Any]]:
        """``(text, parsed)`` of every record of the export in ``fmt`` (``jsonl``: a
        dict; ``csv``: the row's cells, the header first, once). A dropped
        connection, a stream the daemon cut, a silent one or a 503 is resumed with
        ``after=<the last id received>``, so each record comes exactly once, up to
        RECONNECTS failed attempts in a row."""
        url = self.url(f"/v1/batches/{quote(batch_id, safe='')}/results")
        params = {"format": fmt}
        if status:
            params["status"] = status if isinstance(status, str) else ",".join(status)
        csv_format = fmt == "csv"
        header_sent = False
        failures = 0
        while True:
            if after is not None:
                params["after"] = str(after)
            try:
                async with self._http().get(
                    url, params=params, headers=self._headers, timeout=STREAM_TIMEOUT
                ) as resp:
                    if resp.status >= 400:
                        problem = api_error("GET", url, resp.status, await resp.text())
                        if resp.status != 503:
                            raise problem
                        raise _Interrupted(str(problem))
                    header = csv_format
                    async for text in _records(resp, csv_format):
                        if csv_format:
                            row = next(csv.reader([text]))
                            if header:  # every response starts with it; pass it on once
                                header = False
                                if header_sent:
                                    continue
                                header_sent = True
                                yield text, row
                                continue
                            after = row[0]
                            yield text, row
                        else:
                            rec = json.loads(text)
                            after = rec["id"]
                            yield text, rec
                        failures = 0
                    return
            except (aiohttp.ClientError, TimeoutError, _Interrupted) as exc:
                failures += 1
                if failures > RECONNECTS:
                    raise ConnectionFailed(
                        one_line(f"GET {url}: gave up after {RECONNECTS} retries: {exc}")
                    ) from None
                log.warning("results: resuming after item %s: %s", after, one_line(str(exc)))
            await asyncio.sleep(min(5.0, 0.2 * 2**failures))

    async def limits(self) -> dict[str, Any]:
        """``GET /v1/limits`` (admin): each keyed handler's key_limit, its keys in
        use now (running items, bucket tokens, pause) and the limit keys throttled
        now (``{"handlers": [...], "truncated": bool}``)."""
        return dict(await self.request("GET", "/v1/limits"))

    # -- schedules

    async def schedules(self) -> list[dict[str, Any]]:
        return list((await self.request("GET", "/v1/schedules"))["schedules"])

    async def schedule(self, name: str, action: str | None = None) -> dict[str, Any]:
        """One schedule, or ``action`` (``pause``, ``resume``, ``run``) on it."""
        path = f"/v1/schedules/{quote(name, safe='')}"
        if action is None:
            return dict(await self.request("GET", path))
        return dict(await self.request("POST", f"{path}/{action}"))


class _Interrupted(Exception):
    """A results export stopped before its end (cut, timed out, or a 503): resume it."""


async def _records(resp: aiohttp.ClientResponse, csv_format: bool) -> AsyncIterator[str]:
    """The complete records of a results body, as text with their line end. A CSV
    record may span lines (a quoted newline) and is complete when its quotes
    balance. A body that ends inside a record was cut: _Interrupted."""
    buf = bytearray()
    pending = ""
    async for chunk in resp.content.iter_any():  # not readline: a record may be megabytes
        buf += chunk
        start = 0
        while (end := buf.find(b"\n", start)) >= 0:
            line = buf[start : end + 1].decode()
            start = end + 1
            if csv_format:
                pending += line
                if pending.count('"') % 2:
                    continue
                line, pending = pending, ""
            yield line
        del buf[:start]
    if buf or pending:
        raise _Interrupted("the response ended inside a record")


# --------------------------------------------------------------------------- sync client


class Client:
    """The same API for synchronous code: every method of :class:`AsyncClient`,
    run on an event loop in a thread of this client's own (iterators are plain
    iterators). Use it as a context manager, or call :meth:`close`."""

    def __init__(
        self,
        base_url: str | None = None,
        token: str | None = None,
        *,
        timeout: float = 30.0,
        submit_retries: int = SUBMIT_RETRIES,
    ) -> None:
        self._portal_cm = anyio.from_thread.start_blocking_portal()
        self._portal = self._portal_cm.__enter__()
        self.aio = AsyncClient(base_url, token, timeout=timeout, submit_retries=submit_retries)
        self.base_url = self.aio.base_url

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._portal_cm is None:
            return
        try:
            self._portal.call(self.aio.aclose)
        finally:
            self._portal_cm.__exit__(None, None, None)
            self._portal_cm = None  # type: ignore[assignment]

    def _call(self, fn: Callable[..., Awaitable[T]], *args: Any, **kw: Any) -> T:
        async def run() -> T:
            return await fn(*args, **kw)

        return self._portal.call(run)

    def _iter(self, agen: AsyncIterator[T]) -> Iterator[T]:
        try:
            while True:
                try:
                    yield self._portal.call(agen.__anext__)
                except StopAsyncIteration:
                    return
        finally:
            aclose = getattr(agen, "aclose", None)
            if aclose is not None:
                self._portal.call(aclose)

    def request(self, method: str, path: str, **kw: Any) -> Any:
        return self._call(self.aio.request, method, path, **kw)

    def submit(
        self, handler: str, items: Sequence[Any], *, idempotency_key: str | None = None, **f: Any
    ) -> Batch:
        return self._call(self.aio.submit, handler, items, idempotency_key=idempotency_key, **f)

    def get_batch(self, batch_id: str) -> Batch:
        return self._call(self.aio.get_batch, batch_id)

    def list_batches(self, **kw: Any) -> Iterator[Batch]:
        return self._iter(self.aio.list_batches(**kw))

    def items(self, batch_id: str, **kw: Any) -> Iterator[Item]:
        return self._iter(self.aio.items(batch_id, **kw))

    def get_item(self, item_id: str) -> Item:
        return self._call(self.aio.get_item, item_id)

    def cancel(self, batch_id: str) -> Batch:
        return self._call(self.aio.cancel, batch_id)

    def pause(self, batch_id: str) -> Batch:
        return self._call(self.aio.pause, batch_id)

    def resume(self, batch_id: str) -> Batch:
        return self._call(self.aio.resume, batch_id)

    def retry(self, batch_id: str, *, include_cancelled: bool = False) -> Batch:
        return self._call(self.aio.retry, batch_id, include_cancelled=include_cancelled)

    def redeliver(self, batch_id: str) -> Batch:
        return self._call(self.aio.redeliver, batch_id)

    def retry_item(self, item_id: str) -> Item:
        return self._call(self.aio.retry_item, item_id)

    def cancel_item(self, item_id: str) -> Item:
        return self._call(self.aio.cancel_item, item_id)

    def events(self, batch_id: str, *, last_event_id: str | None = None) -> Iterator[Event]:
        return self._iter(self.aio.events(batch_id, last_event_id=last_event_id))

    def wait(
        self,
        batch_id: str,
        *,
        timeout: float | None = None,
        on_event: Callable[[Event], None] | None = None,
    ) -> Batch:
        return self._call(self.aio.wait, batch_id, timeout=timeout, on_event=on_event)

    def iter_results(self, batch_id: str, **kw: Any) -> Iterator[dict[str, Any]]:
        return self._iter(self.aio.iter_results(batch_id, **kw))

    def limits(self) -> dict[str, Any]:
        return self._call(self.aio.limits)

    def schedules(self) -> list[dict[str, Any]]:
        return self._call(self.aio.schedules)

    def schedule(self, name: str, action: str | None = None) -> dict[str, Any]:
        return self._call(self.aio.schedule, name, action)
