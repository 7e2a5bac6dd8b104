"""The exception tree: one root, the two handler-facing signals, and the errors
the daemon raises at its boundaries (config, database, handlers)."""

from __future__ import annotations


class SupervisorError(Exception):
    """Root of every error batch-supervisor raises on purpose."""


class ConfigError(SupervisorError):
    """The configuration is invalid; ``problems`` lists each one by dotted path."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("invalid configuration:\n  " + "\n  ".join(problems))
        self.problems = problems


class DatabaseUnavailable(SupervisorError):
    """A transient database failure (connection lost, server restarting)."""


class SchemaTooNew(SupervisorError):
    """The database schema is at a version newer than this code understands."""


class HandlerLoadError(SupervisorError):
    """A configured handler cannot be used; the message names it and says why."""


class PermanentError(Exception):
    """Raised by a handler: fail this item now, without retrying."""


class RetryAfter(Exception):
    """Raised by a handler: retry this item after ``seconds``.

    ``scope="key"`` (for a handler with a key_limit): the remote side pushes back
    on the whole key (a provider's 429 for one API key), so every queued item of
    this item's limit key waits ``seconds``, on every daemon, and this attempt is
    handed back without counting against max_attempts. Without a key_limit it is
    an item retry, as with the default ``scope="item"``.
    """

    def __init__(self, seconds: float, message: str = "", *, scope: str = "item") -> None:
        if scope not in ("item", "key"):
            raise ValueError(f"RetryAfter scope must be 'item' or 'key', not {scope!r}")
        super().__init__(message or f"retry after {seconds}s")
        self.seconds = float(seconds)
        self.scope = scope
