"""Browser-facing request checks: what stops a web page the operator happens to
open from driving the API (cross-site request forgery) or reading it through a
DNS-rebound name.

- ``Host`` must name an address this daemon serves (``server.host``; on a loopback
  host also ``localhost``, ``127.0.0.1`` and ``::1``) or one listed in
  ``server.allowed_hosts``; otherwise 421. A daemon bound to a wildcard address
  (``0.0.0.0``) accepts any ``Host`` unless ``allowed_hosts`` is set: it requires
  tokens anyway, which a rebound page does not have.
- A present ``Origin`` must be the daemon's own (the dashboard) or listed in
  ``server.allowed_origins``; otherwise 403.
- Requests that change state (POST, PATCH, PUT, DELETE) must say
  ``Content-Type: application/json``, with or without a body; otherwise 415. A
  page on another origin cannot send that without a CORS preflight, which this
  daemon never approves, so forms and ``text/plain`` fetches are refused.
"""

from __future__ import annotations

import ipaddress

from aiohttp import web

from supervisor.api.problems import Problem
from supervisor.config import ServerConfig

MUTATING = frozenset({"POST", "PATCH", "PUT", "DELETE"})
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
WILDCARD = ("0.0.0.0", "::", "")


def _host_only(host_header: str) -> str:
    """``example.com:8080`` → ``example.com``; ``[::1]:8080`` → ``::1``."""
    h = host_header.strip().lower()
    if h.startswith("["):
        return h[1 : h.find("]")] if "]" in h else h
    if h.count(":") == 1:
        return h.split(":", 1)[0]
    return h  # a bare IPv6 address, or no port


def _is_loopback_host(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class Guard:
    def __init__(self, server: ServerConfig) -> None:
        self._any_host = server.host in WILDCARD and not server.allowed_hosts
        hosts = {server.host.lower(), *(h.lower() for h in server.allowed_hosts)}
        if _is_loopback_host(server.host.lower()):
            hosts.update(LOOPBACK_NAMES)
        self._hosts = frozenset(hosts)
        self._origins = frozenset(o.rstrip("/").lower() for o in server.allowed_origins)

    def check(self, request: web.Request) -> None:
        """Raise a :class:`Problem` for a request a browser page must not make."""
        host_header = request.headers.get("Host", "")
        if not self._any_host and _host_only(host_header) not in self._hosts:
            raise Problem(
                421,
                f"Host {host_header!r} is not an address this daemon serves; "
                "add it to [server] allowed_hosts if it is yours",
            )
        origin = request.headers.get("Origin")
        if origin is not None:
            own = f"{request.scheme}://{host_header}".lower()
            if origin.rstrip("/").lower() not in (own, *self._origins):
                raise Problem(
                    403,
                    f"requests from origin {origin!r} are not allowed; "
                    "add it to [server] allowed_origins if it is yours",
                )
        if request.method in MUTATING and request.content_type != "application/json":
            raise Problem(
                415,
                f"{request.method} requests need Content-Type: application/json "
                "(also without a body)",
            )
