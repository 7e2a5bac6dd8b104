"""The one way a process gets its database URL: the configured one, or the
embedded server, started on entry and given up on exit.

The daemon and every CLI verb go through :func:`database_url`, so they share one
rule for the embedded server: each process that uses it holds a shared use of it
while it runs, and the last one out stops it (a second daemon or a CLI command
beside a daemon never stops the first one's database).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator

import anyio
import anyio.to_thread

from supervisor.config import Config
from supervisor.embedded.base import EmbeddedPostgresError, logger
from supervisor.embedded.server import EmbeddedPostgres
from supervisor.errors import ConfigError, SupervisorError


class EmbeddedStartFailed(SupervisorError):
    """The embedded server could not be started (the message says why)."""


@dataclasses.dataclass(frozen=True)
class Served:
    url: str
    server: EmbeddedPostgres | None  # None: the configured database.url


@contextlib.asynccontextmanager
async def database_url(cfg: Config) -> AsyncIterator[Served]:
    """The database to connect to. With no ``database.url`` (nor its environment
    variable) the embedded server is started, or adopted when it already runs
    for the data directory; on exit our use of it ends, and it stops unless
    another process still uses it. A bad ``embedded.bin_dir`` is a ConfigError."""
    if cfg.database_url:
        yield Served(cfg.database_url, None)
        return
    data_dir = cfg.embedded_data_dir
    pg = EmbeddedPostgres(
        data_dir,
        port=cfg.embedded.port,
        bin_dir=cfg.embedded.bin_dir or None,
        schema=cfg.database.schema,
    )
    logger.info("embedded.starting data_dir=%s", data_dir)
    try:
        try:
            # Shielded: a signal during start-up lands once the server is up, so
            # the stop below always knows what it is stopping.
            with anyio.CancelScope(shield=True):
                url = await anyio.to_thread.run_sync(pg.start)
        except EmbeddedPostgresError as exc:
            if cfg.embedded.bin_dir:
                raise ConfigError([f"embedded.bin_dir: {exc}"]) from exc
            raise EmbeddedStartFailed(
                f"cannot start the embedded PostgreSQL server: {exc}"
            ) from exc
        yield Served(url, pg)
    finally:  # also after a failed start: it may have got as far as a running server
        with anyio.CancelScope(shield=True):
            stopped = await anyio.to_thread.run_sync(pg.stop)
        logger.info("embedded.stopped" if stopped else "embedded.left_running: still in use")
