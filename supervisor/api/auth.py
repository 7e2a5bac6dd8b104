"""Bearer tokens, tenants and scopes.

Tokens are configured by their SHA-256 only; a presented token is hashed and
compared with every configured digest in constant time. With no tokens the API
is open (config validation allows that only on a loopback address) and every
request acts as tenant ``default``. The ``admin`` scope implies read and write
and sees every tenant.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
from collections.abc import Sequence

from aiohttp import web

from supervisor.api.problems import Problem
from supervisor.config import TokenConfig

OPEN_TENANT = "default"


@dataclasses.dataclass(frozen=True)
class Principal:
    name: str
    tenant: str
    scopes: frozenset[str]
    handlers: frozenset[str] | None = None  # None: every handler

    def may_use(self, handler: str, field: str) -> None:
        """403 unless this token may run ``handler`` (named by request ``field``)."""
        if self.handlers is not None and handler not in self.handlers:
            raise Problem(403, f"{field}: this token may not use handler {handler!r}")

    @property
    def tenant_filter(self) -> str | None:
        """The tenant to restrict reads to; None for admins (every tenant)."""
        return None if "admin" in self.scopes else self.tenant

    @property
    def sees_tracebacks(self) -> bool:
        """Handler tracebacks are for operators (``admin``, or the open API)."""
        return "admin" in self.scopes

    def require(self, scope: str) -> None:
        if scope not in self.scopes and "admin" not in self.scopes:
            raise Problem(403, f"this token lacks the {scope!r} scope")


class Authenticator:
    def __init__(self, tokens: Sequence[TokenConfig]) -> None:
        self._tokens = list(tokens)

    @property
    def open(self) -> bool:
        return not self._tokens

    def authenticate(self, request: web.Request) -> Principal:
        if self.open:
            return Principal("anonymous", OPEN_TENANT, frozenset({"read", "write", "admin"}))
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Problem(
                401,
                "missing bearer token (Authorization: Bearer <token>)",
                headers={"WWW-Authenticate": 'Bearer realm="batch-supervisor"'},
            )
        # non-UTF-8 header bytes arrive surrogate-escaped: hash them as sent (no match)
        digest = hashlib.sha256(token.strip().encode("utf-8", "surrogateescape")).hexdigest()
        match: TokenConfig | None = None
        for t in self._tokens:
            if hmac.compare_digest(digest, t.sha256):
                match = t
        if match is None:
            raise Problem(
                401, "invalid token", headers={"WWW-Authenticate": 'Bearer error="invalid_token"'}
            )
        allowed = frozenset(match.handlers) if match.handlers is not None else None
        return Principal(match.name, match.tenant, frozenset(match.scopes), allowed)
