"""Logging to stderr, one line per event: ``text`` for people, ``json`` for
journald/ELK. Messages start with a stable action name (``dispatcher.released``)."""

from __future__ import annotations

import json
import logging
import sys
import time
from datetime import UTC, datetime

CLIENT_ERRORS_PER_WINDOW = 10
CLIENT_ERROR_WINDOW_S = 10.0


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        out = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat().replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "action": msg.split(" ", 1)[0] if msg else "",
            "message": msg,
        }
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out)


class ClientErrorFilter(logging.Filter):
    """aiohttp logs a malformed request (a header line too long, a broken request
    line) as an ERROR with a traceback whose text holds what the client sent: a
    bearer token among it. Such records become one WARNING line naming only the
    error type and the peer, at most CLIENT_ERRORS_PER_WINDOW per window (a flood
    of bad requests must not flood the log); the rest are counted and reported."""

    def __init__(self) -> None:
        super().__init__()
        self._window_start = 0.0
        self._in_window = 0
        self._suppressed = 0

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is None or not _is_client_error(exc):
            return True
        now = time.monotonic()
        if now - self._window_start >= CLIENT_ERROR_WINDOW_S:
            self._window_start, self._in_window = now, 0
        self._in_window += 1
        if self._in_window > CLIENT_ERRORS_PER_WINDOW:
            self._suppressed += 1
            return False
        peer = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
        record.msg = "api.bad_request peer=%s error=%s%s"
        more = f" (and {self._suppressed} more not logged)" if self._suppressed else ""
        record.args = (peer, type(exc).__name__, more)
        self._suppressed = 0
        record.exc_info = None
        record.exc_text = None
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def _is_client_error(exc: BaseException) -> bool:
    from aiohttp import http_exceptions  # the API's dependency; loaded only when used

    return isinstance(exc, http_exceptions.HttpProcessingError)


def setup(level: str = "info", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    server_log = logging.getLogger("aiohttp.server")
    server_log.filters[:] = [f for f in server_log.filters if not isinstance(f, ClientErrorFilter)]
    server_log.addFilter(ClientErrorFilter())
