"""Client errors in aiohttp's log become one rate-limited line without what the
client sent (supervisor.logs.ClientErrorFilter)."""

from __future__ import annotations

import logging
import sys

from aiohttp import http_exceptions

from supervisor import logs


def record(secret: str) -> logging.LogRecord:
    try:
        raise http_exceptions.LineTooLong(f"Authorization: Bearer {secret}", "8190")
    except http_exceptions.HttpProcessingError:
        info = sys.exc_info()
    return logging.LogRecord(
        "aiohttp.server",
        logging.ERROR,
        __file__,
        1,
        "Error handling request from %s",
        ("127.0.0.1",),
        info,
    )


def test_a_client_error_is_one_warning_naming_only_type_and_peer() -> None:
    f = logs.ClientErrorFilter()
    rec = record("s3cret")
    assert f.filter(rec)
    assert rec.levelname == "WARNING" and rec.exc_info is None
    text = rec.getMessage()
    assert text == "api.bad_request peer=127.0.0.1 error=LineTooLong", text
    assert "s3cret" not in text


def test_a_flood_is_cut_to_a_few_lines_per_window() -> None:
    f = logs.ClientErrorFilter()
    passed = [f.filter(record("x")) for _ in range(50)]
    assert sum(passed) == logs.CLIENT_ERRORS_PER_WINDOW


def test_other_records_pass_untouched() -> None:
    f = logs.ClientErrorFilter()
    rec = logging.LogRecord("aiohttp.server", logging.ERROR, __file__, 1, "boom", (), None)
    assert f.filter(rec) and rec.levelname == "ERROR"
