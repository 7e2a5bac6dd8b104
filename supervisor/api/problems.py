"""RFC 9457 problem details: every error the API returns goes through here."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from aiohttp import web

CONTENT_TYPE = "application/problem+json"
TITLES = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    409: "Conflict",
    413: "Content Too Large",
    415: "Unsupported Media Type",
    422: "Unprocessable Content",
    429: "Too Many Requests",
    500: "Internal Server Error",
    503: "Service Unavailable",
}
SLUGS = {
    400: "bad-request",
    401: "unauthorized",
    403: "forbidden",
    404: "not-found",
    405: "method-not-allowed",
    408: "request-timeout",
    409: "conflict",
    413: "too-large",
    415: "unsupported-media-type",
    422: "validation-error",
    429: "too-many-requests",
    500: "internal-error",
    503: "unavailable",
}


class Problem(Exception):
    """Raise anywhere in a route; the middleware renders it."""

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        errors: list[dict[str, str]] | None = None,
        headers: dict[str, str] | None = None,
        extensions: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.errors = errors
        self.headers = headers or {}
        # Extension members (RFC 9457 section 3.2): facts a client acts on, such as
        # the id of the batch holding an exclusive key, besides the prose of detail.
        self.extensions = dict(extensions or {})


class ValidationFailed(Problem):
    def __init__(self, errors: list[dict[str, str]], status: int = 422) -> None:
        n = len(errors)
        first = errors[0]
        detail = f"{first['path']}: {first['message']}" + (f" (and {n - 1} more)" if n > 1 else "")
        super().__init__(status, detail, errors=errors)


def render(
    status: int,
    detail: str,
    *,
    instance: str | None = None,
    errors: list[dict[str, str]] | None = None,
    headers: dict[str, str] | None = None,
    extensions: Mapping[str, Any] | None = None,
) -> web.Response:
    body: dict[str, Any] = {
        "type": f"https://batch-supervisor.dev/problems/{SLUGS.get(status, 'error')}",
        "title": TITLES.get(status, "Error"),
        "status": status,
        "detail": detail,
    }
    if instance:
        body["instance"] = instance
    if errors is not None:
        body["errors"] = errors
    for name, value in (extensions or {}).items():
        body.setdefault(name, value)  # never in place of a standard member
    return web.Response(
        status=status, text=json.dumps(body), content_type=CONTENT_TYPE, headers=headers
    )
