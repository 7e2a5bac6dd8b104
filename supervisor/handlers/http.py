"""``type = "http"``: POSTs ``{"item": {...}}`` as JSON to ``url``, once per attempt.

2xx succeeds (response JSON, else text, is the result); 408, 425, 429, 5xx,
connection errors and timeouts are retried, honouring ``Retry-After``; any
other status fails the item at once. With ``signing_secret`` the request
carries ``X-Supervisor-Signature: sha256=<hex HMAC-SHA256 of the body>`` so the
receiver can tell our requests from forged ones. The body's ``sent_at`` (unix
seconds, also sent as ``X-Supervisor-Timestamp``) is covered by that signature,
so a receiver can refuse a captured request replayed later. Redirects are not followed:
a redirected POST may turn into a GET or carry the signed body elsewhere.

The attempt's only time limit is the handler ``timeout`` the executor
enforces; one connection pool per handler is created on first use.
"""

from __future__ import annotations

import email.utils
import hashlib
import hmac
import json
import re
import time
from datetime import UTC, datetime
from typing import Any

import aiohttp
import yarl

from supervisor import __version__
from supervisor.config import HandlerConfig
from supervisor.errors import HandlerLoadError, PermanentError
from supervisor.models import Item
from supervisor.tracecontext import TraceContext

SIGNATURE_HEADER = "X-Supervisor-Signature"
TIMESTAMP_HEADER = "X-Supervisor-Timestamp"
BODY_LIMIT = 10 * 1024 * 1024  # a successful response is stored as the result: keep it sane
ERROR_BODY_READ = 64 * 1024  # of an error response, only an excerpt is kept
EXCERPT_CHARS = 500
RETRY_AFTER_MAX_S = 86400.0  # a day: a later Retry-After is a misconfigured server
RETRYABLE = frozenset({408, 425, 429})
CONNECTION_LIMIT = 100
PER_HOST_LIMIT = 32
_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")


class HTTPStatusError(Exception):
    """A retryable status (408, 425, 429, 5xx); ``retry_after`` from the response, if any."""

    def __init__(self, message: str, status: int, retry_after: float | None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


class HTTPRejectedError(PermanentError):
    """A status that retrying will not change (other 4xx, 3xx, 1xx)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class HTTPResponseTooLarge(PermanentError):
    """A 2xx response body larger than :data:`BODY_LIMIT`."""


class HTTPConnectionError(Exception):
    """The request did not get a response (refused, reset, DNS, TLS): retried."""


def retry_after_seconds(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` value (delay-seconds or HTTP-date)."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return min(float(value), RETRY_AFTER_MAX_S)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None  # unparseable: fall back to the handler's backoff
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    delay = (when - (now or datetime.now(UTC))).total_seconds()
    return min(max(0.0, delay), RETRY_AFTER_MAX_S)


def sign(secret: str, body: bytes) -> str:
    """The ``X-Supervisor-Signature`` value for ``body``."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def _validate(hcfg: HandlerConfig) -> yarl.URL:
    where = f"handler {hcfg.name!r}"
    try:
        url = yarl.URL(hcfg.url)
    except (TypeError, ValueError) as exc:
        raise HandlerLoadError(f"{where}: url {hcfg.url!r} is not a valid URL: {exc}") from exc
    if url.scheme not in ("http", "https"):
        raise HandlerLoadError(
            f"{where}: url {hcfg.url!r} must use http or https, not {url.scheme or 'no scheme'!r}"
        )
    if not url.host:
        raise HandlerLoadError(f"{where}: url {hcfg.url!r} has no host")
    for key, value in hcfg.headers.items():
        if not isinstance(key, str) or not _TOKEN.match(key):
            raise HandlerLoadError(f"{where}: header name {key!r} is not a valid HTTP token")
        if not isinstance(value, str):
            raise HandlerLoadError(
                f"{where}: header {key!r} must be a string, got {type(value).__name__}"
            )
        if any(c in value for c in "\r\n\x00"):
            raise HandlerLoadError(f"{where}: header {key!r} contains CR, LF or NUL")
    if hcfg.signing_secret is not None and not hcfg.signing_secret:
        raise HandlerLoadError(f"{where}: signing_secret is empty")
    return url


def _display(url: yarl.URL) -> str:
    """The URL for error messages: no credentials, no query (it may hold a token)."""
    return str(url.with_user(None).with_query(None).with_fragment(None))


async def _read(resp: aiohttp.ClientResponse, limit: int) -> tuple[bytes, bool]:
    """Up to ``limit`` bytes of the body, and whether there was more."""
    if resp.content_length is not None and resp.content_length > limit:
        return b"", True
    buf = bytearray()
    async for chunk in resp.content.iter_chunked(64 * 1024):
        buf += chunk
        if len(buf) > limit:
            return bytes(buf[:limit]), True
    return bytes(buf), False


def _decode(resp: aiohttp.ClientResponse, raw: bytes) -> str:
    try:
        return raw.decode(resp.charset or "utf-8", errors="replace")
    except LookupError:
        return raw.decode("utf-8", errors="replace")  # unknown charset name: best effort


def _excerpt(text: str) -> str:
    text = text.strip()
    if not text:
        return "(empty body)"
    return text if len(text) <= EXCERPT_CHARS else text[:EXCERPT_CHARS] + "…"


class HttpHandler:
    def __init__(self, hcfg: HandlerConfig) -> None:
        self.config = hcfg
        self._url = _validate(hcfg)
        self._where = _display(self._url)
        self._headers = dict(hcfg.headers)
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(
                    limit=CONNECTION_LIMIT, limit_per_host=PER_HOST_LIMIT
                ),
                # The executor's per-attempt timeout is the only limit.
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=None, sock_read=None),
            )
        return self._session

    def _request_headers(
        self, body: bytes, sent_at: int, trace: TraceContext | None = None
    ) -> dict[str, str]:
        headers = {
            "Content-Type": "application/json",
            "User-Agent": f"batch-supervisor/{__version__}",
            TIMESTAMP_HEADER: str(sent_at),
        }
        if trace is not None:  # the attempt's span (tracing on): the endpoint's parent
            headers["traceparent"] = trace.traceparent
            if trace.tracestate:
                headers["tracestate"] = trace.tracestate
        lower = {k.lower(): k for k in headers}
        for key, value in self._headers.items():
            headers.pop(lower.get(key.lower(), key), None)
            headers[key] = value
        if self.config.signing_secret:
            headers[SIGNATURE_HEADER] = sign(self.config.signing_secret, body)
        return headers

    async def run(self, item: Item) -> Any:
        sent_at = int(time.time())
        body = json.dumps(
            {"item": item.to_json(), "sent_at": sent_at}, separators=(",", ":")
        ).encode()
        try:
            async with self._client().post(
                self._url,
                data=body,
                headers=self._request_headers(body, sent_at, item.trace),
                allow_redirects=False,
            ) as resp:
                status = resp.status
                if 200 <= status < 300:
                    raw, too_large = await _read(resp, BODY_LIMIT)
                    if too_large:
                        raise HTTPResponseTooLarge(
                            f"HTTP {status} from {self._where}: response body exceeds "
                            f"{BODY_LIMIT} bytes"
                        )
                    return self._result(resp, raw)
                raw, _ = await _read(resp, ERROR_BODY_READ)
                excerpt = _excerpt(_decode(resp, raw))
                message = f"HTTP {status} from {self._where}: {excerpt}"
                if status in RETRYABLE or status >= 500:
                    retry_after = retry_after_seconds(resp.headers.get("Retry-After"))
                    raise HTTPStatusError(message, status, retry_after)
                if 300 <= status < 400:
                    location = resp.headers.get("Location", "?")
                    message = (
                        f"HTTP {status} from {self._where} (redirects are not followed; "
                        f"Location: {location}): {excerpt}"
                    )
                raise HTTPRejectedError(message, status)
        except aiohttp.ClientResponseError as exc:
            # A malformed response (bad status line, headers): the server is misbehaving.
            raise HTTPConnectionError(
                f"POST {self._where}: invalid response: {type(exc).__name__}: {exc}"
            ) from exc
        except aiohttp.ClientError as exc:
            raise HTTPConnectionError(
                f"POST {self._where} failed: {type(exc).__name__}: {exc}"
            ) from exc

    @staticmethod
    def _result(resp: aiohttp.ClientResponse, raw: bytes) -> Any:
        text = _decode(resp, raw)
        if not text.strip():
            return None
        try:
            return json.loads(text)
        except ValueError:
            return text  # not JSON: the text is the result

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
