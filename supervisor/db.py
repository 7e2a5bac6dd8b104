"""The database: pool lifecycle, the only executor of SQL, and the policy for
transient errors.

Queries are named (``sql/queries.sql``) and run through :class:`Database` (or a
:class:`Tx`) by :mod:`supervisor.store`, their one typed caller; errors that mean
"the database is away for now" are wrapped once, here, into
:class:`~supervisor.errors.DatabaseUnavailable`, and retried with the single
tenacity policy defined below by the callers that must not give up (outcome
writes, heartbeats, start-up).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

import asyncpg
import tenacity

from supervisor import sqlfile
from supervisor.config import Config
from supervisor.errors import ConfigError, DatabaseUnavailable, SchemaTooNew

log = logging.getLogger(__name__)
T = TypeVar("T")
Record = asyncpg.Record

_TRANSIENT = (
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InsufficientResourcesError,
    asyncpg.exceptions.TransactionRollbackError,
    OSError,
    TimeoutError,
)


# The server answered, and refused who we are or where we asked to go: no retry
# fixes that, the configured URL does.
_MISCONFIGURED = (
    asyncpg.exceptions.InvalidCatalogNameError,  # no such database
    asyncpg.exceptions.InvalidAuthorizationSpecificationError,  # no such role, pg_hba
    asyncpg.exceptions.InvalidPasswordError,
)


def is_transient(exc: BaseException) -> bool:
    """True for errors that go away by themselves: retry, do not crash."""
    if isinstance(exc, (DatabaseUnavailable, *_TRANSIENT)):
        return True
    if isinstance(exc, asyncpg.InterfaceError):
        text = str(exc).lower()
        return "connection" in text and ("closed" in text or "lost" in text)
    if isinstance(exc, asyncpg.InternalClientError):
        # A server shutdown notice that reaches an idle pooled connection leaves its
        # protocol mid-operation; the next query fails like this. The pool drops the
        # connection, so a retry gets a fresh one.
        return "cannot switch to state" in str(exc)
    return False


def retrying(
    *, max_wait_s: float = 5.0, stop_after_s: float | None = None
) -> tenacity.AsyncRetrying:
    """The one retry policy for database calls: transient errors only, exponential
    backoff with jitter, forever unless ``stop_after_s``."""
    stop: Any = (
        tenacity.stop_never if stop_after_s is None else tenacity.stop_after_delay(stop_after_s)
    )
    return tenacity.AsyncRetrying(
        retry=tenacity.retry_if_exception(is_transient),
        wait=tenacity.wait_exponential_jitter(multiplier=0.05, max=max_wait_s),
        stop=stop,
        reraise=True,
        before_sleep=lambda rs: log.warning(
            "db.retry attempt=%s error=%s", rs.attempt_number, rs.outcome and rs.outcome.exception()
        ),
    )


async def with_retry(fn: Callable[[], Awaitable[T]], *, stop_after_s: float | None = None) -> T:
    async for attempt in retrying(stop_after_s=stop_after_s):
        with attempt:
            return await fn()
    raise AssertionError("unreachable")  # pragma: no cover


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Pool release without asyncpg's reset query (an extra round trip after every
    query): pool connections never change session state. No SET (only SET LOCAL),
    no LISTEN (that has its own connection), no cursors, and only transaction-scoped
    advisory locks."""


class Database:
    """A pool plus the named queries. Every method wraps transient failures."""

    def __init__(self, pool: asyncpg.Pool, schema: str, on_error: Callable[[str], None]) -> None:
        self.pool = pool
        self.schema = schema
        self.queries = sqlfile.load_queries(schema)
        self._on_error = on_error

    @classmethod
    async def connect(
        cls,
        cfg: Config,
        dsn: str,
        on_error: Callable[[str], None] = lambda op: None,
        max_size: int | None = None,
    ) -> Database:
        pool = await asyncpg.create_pool(
            dsn,
            min_size=0,
            max_size=max_size or cfg.database.pool_max,
            statement_cache_size=cfg.database.statement_cache_size,
            command_timeout=60,
            timeout=5,
            max_inactive_connection_lifetime=60,
            reset=_keep_session,
        )
        return cls(pool, cfg.database.schema, on_error)

    async def close(self) -> None:
        with contextlib.suppress(Exception):  # closing a pool whose server is gone must not raise
            await self.pool.close()

    def sql(self, name: str) -> str:
        return self.queries[name]

    @contextlib.asynccontextmanager
    async def _guard(self, op: str) -> AsyncIterator[None]:
        try:
            yield
        except Exception as exc:
            if is_transient(exc):
                self._on_error(op)
                raise DatabaseUnavailable(f"{op}: {type(exc).__name__}: {exc}") from exc
            if isinstance(exc, _MISCONFIGURED):
                raise ConfigError(
                    [
                        f"database.url: the server refused the connection: {exc} (check the "
                        "role, password and database name in database.url or "
                        "BATCH_SUPERVISOR_DATABASE_URL)"
                    ]
                ) from exc
            raise

    async def fetch(self, name: str, *args: Any) -> list[Record]:
        async with self._guard(name):
            return await self.pool.fetch(self.queries[name], *args)

    async def fetchrow(self, name: str, *args: Any) -> Record | None:
        async with self._guard(name):
            return await self.pool.fetchrow(self.queries[name], *args)

    async def fetchval(self, name: str, *args: Any) -> Any:
        async with self._guard(name):
            return await self.pool.fetchval(self.queries[name], *args)

    async def execute(self, name: str, *args: Any) -> str:
        async with self._guard(name):
            return await self.pool.execute(self.queries[name], *args)

    @contextlib.asynccontextmanager
    async def transaction(self, op: str, *, snapshot: bool = False) -> AsyncIterator[Tx]:
        """One transaction on one connection; transient errors wrapped as above.
        ``snapshot``: read-only, every query sees the same snapshot (REPEATABLE READ)."""
        async with (
            self._guard(op),
            self.pool.acquire() as conn,
            conn.transaction(isolation="repeatable_read" if snapshot else None, readonly=snapshot),
        ):
            yield Tx(conn, self.queries)  # type: ignore[arg-type]  # pool proxy of a Connection

    async def listen_connection(self, dsn: str) -> asyncpg.Connection:
        async with self._guard("listen"):
            conn: asyncpg.Connection = await asyncpg.connect(dsn, timeout=5, statement_cache_size=0)
            return conn


class Tx:
    """Named-query execution inside one transaction."""

    def __init__(self, conn: asyncpg.Connection, queries: dict[str, str]) -> None:
        self.conn = conn
        self._q = queries

    async def fetch(self, name: str, *args: Any) -> list[Record]:
        return await self.conn.fetch(self._q[name], *args)

    async def fetchrow(self, name: str, *args: Any) -> Record | None:
        return await self.conn.fetchrow(self._q[name], *args)

    async def fetchval(self, name: str, *args: Any) -> Any:
        return await self.conn.fetchval(self._q[name], *args)

    async def execute(self, name: str, *args: Any) -> str:
        return await self.conn.execute(self._q[name], *args)

    async def copy_items(
        self, schema: str, columns: Sequence[str], records: Sequence[tuple[Any, ...]]
    ) -> None:
        await self.conn.copy_records_to_table(
            "items", schema_name=schema, columns=list(columns), records=records
        )


async def migrate(db: Database) -> list[int]:
    """Apply pending migrations, all in one transaction under a transaction-scoped
    advisory lock (PostgreSQL DDL is transactional: a failed upgrade changes
    nothing, and it works through a transaction pooler); refuse a newer schema.

    Returns the versions applied now (empty when already current)."""
    known = sqlfile.load_migrations(db.schema)
    latest = known[-1].version
    applied_now: list[int] = []
    async with db._guard("migrate"), db.pool.acquire() as conn, conn.transaction():
        await conn.execute(db.queries["lock_migrations"])
        await conn.execute(db.queries["create_schema"])
        applied = {r["version"] for r in await conn.fetch(db.queries["applied_versions"])}
        if applied and max(applied) > latest:
            raise SchemaTooNew(
                f"database schema {db.schema!r} is at version {max(applied)}, but this "
                f"batch-supervisor only knows versions up to {latest}: upgrade it "
                "(refusing to run against a schema it does not understand)"
            )
        for mig in known:
            if mig.version in applied:
                continue
            if mig.has_statements:
                await conn.execute(mig.sql)
            await conn.execute(db.queries["record_migration"], mig.version, mig.name)
            applied_now.append(mig.version)
            log.info("db.migrated version=%s name=%s", mig.version, mig.name)
        # Every time, under the same lock: each function has one current definition
        # (sqlfile), and an upgraded binary brings its bodies even when no table
        # changed. Bodies only change with the schema version (sql/functions/DIGEST),
        # so daemons of one version never overwrite each other's.
        for fn in sqlfile.load_functions(db.schema):
            await conn.execute(fn.sql)
    return applied_now


async def schema_status(db: Database) -> tuple[int, int]:
    """(applied version, latest known version) for readiness and `check`."""
    latest = sqlfile.load_migrations(db.schema)[-1].version
    present = await db.fetchval("schema_exists")
    if not present:
        return 0, latest
    versions = [r["version"] for r in await db.fetch("applied_versions")]
    return (max(versions) if versions else 0), latest
