"""Who may connect to the embedded server, and as whom the daemon does.

A cluster made with ``initdb --auth=trust`` lets every local process in as the
superuser: an exec handler fed a hostile payload could run ``COPY … TO PROGRAM``
or read every tenant's data. The embedded server therefore requires
scram-sha-256 passwords, and the daemon connects as ``batch_supervisor``, a role
that is not a superuser and owns only its schema. Both passwords are generated on
first start and kept in a credentials file beside the data directory, mode 0600,
owned by the account that runs the daemon. A cluster made by an earlier release
(trust) is converted at its next start: passwords set, the schema and its
objects handed to the role, ``pg_hba.conf`` rewritten and reloaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pathlib
import secrets
import threading
from collections.abc import Callable, Coroutine
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

import asyncpg

ROLE = "batch_supervisor"
SUPERUSER = "postgres"
SCRAM_HBA = """\
# Written by batch-supervisor: every connection needs its password (scram-sha-256).
local   all   all                 scram-sha-256
host    all   all   127.0.0.1/32  scram-sha-256
host    all   all   ::1/128       scram-sha-256
"""
T = TypeVar("T")


class CredentialsError(Exception):
    """The credentials file is missing, unreadable or malformed (the message says which)."""


@dataclass(frozen=True)
class Credentials:
    superuser_password: str
    role: str
    password: str


def credentials_path(data_dir: pathlib.Path) -> pathlib.Path:
    return data_dir.parent / f".{data_dir.name}.credentials"


def load(path: pathlib.Path) -> Credentials | None:
    """The stored credentials, or None when there is no file yet."""
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise CredentialsError(
            f"cannot read the embedded server's credentials {path}: {exc.strerror or exc} "
            "(run the daemon as the account that created them)"
        ) from None
    try:
        data = json.loads(raw)
        return Credentials(
            str(data["superuser_password"]), str(data["role"]), str(data["password"])
        )
    except (ValueError, KeyError, TypeError):
        raise CredentialsError(f"{path} is not a credentials file batch-supervisor wrote") from None


def create(path: pathlib.Path) -> Credentials:
    """New random passwords, written atomically to a file only its owner can read."""
    creds = Credentials(secrets.token_urlsafe(32), ROLE, secrets.token_urlsafe(32))
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(asdict(creds), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return creds


def hba_trusts(data_dir: pathlib.Path) -> bool:
    """True if ``pg_hba.conf`` lets anyone in without a password (an older cluster)."""
    try:
        lines = (data_dir / "pg_hba.conf").read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return False
    return any(
        (fields := line.split("#", 1)[0].split()) and fields[-1] == "trust" for line in lines
    )


def write_scram_hba(data_dir: pathlib.Path) -> None:
    """Replace ``pg_hba.conf`` in place (its owner, the server account, stays)."""
    with open(data_dir / "pg_hba.conf", "w", encoding="utf-8") as f:
        f.write(SCRAM_HBA)


async def provision(
    superuser_dsn: str, creds: Credentials, schema: str, data_dir: pathlib.Path
) -> bool:
    """Make the daemon's role and schema what they must be; idempotent, run at
    every start. A cluster that still trusts everyone is converted: the superuser
    gets its password first, then ``pg_hba.conf`` is rewritten and reloaded.
    Returns whether it was converted."""
    convert = hba_trusts(data_dir)
    conn = await asyncpg.connect(superuser_dsn)
    try:

        async def run(template: str, *args: str) -> None:
            # format() quotes identifiers (%I) and literals (%L) on the server side.
            await conn.execute(
                await conn.fetchval(f"SELECT format('{template}', $1::text, $2::text)", *args)
            )

        async with conn.transaction():
            if convert:
                await run("ALTER ROLE %I PASSWORD %L", SUPERUSER, creds.superuser_password)
            exists = await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", creds.role)
            verb = "ALTER" if exists else "CREATE"
            await run(
                verb + " ROLE %I LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION "
                "NOBYPASSRLS PASSWORD %L",
                creds.role,
                creds.password,
            )
            # CREATE SCHEMA IF NOT EXISTS (migrate) checks CREATE before existence.
            await run("GRANT CREATE ON DATABASE %I TO %I", "postgres", creds.role)
            owner = await conn.fetchval(
                "SELECT nspowner::regrole::text FROM pg_namespace WHERE nspname = $1", schema
            )
            if owner is None:
                await run("CREATE SCHEMA %I AUTHORIZATION %I", schema, creds.role)
            else:
                await _hand_over(conn, schema, creds.role)
        if convert:
            write_scram_hba(data_dir)
            await conn.execute("SELECT pg_reload_conf()")
    finally:
        await conn.close()
    return convert


async def _hand_over(conn: asyncpg.Connection, schema: str, role: str) -> None:
    """Give ``role`` the schema and everything in it (a cluster from a release that
    connected as the superuser). Tables first: their indexes and owned sequences
    follow them."""
    statements = [
        "SELECT format('ALTER SCHEMA %I OWNER TO %I', nspname, $2::text) FROM pg_namespace "
        "WHERE nspname = $1::text AND nspowner <> $2::text::regrole",
        "SELECT format('ALTER TABLE %I.%I OWNER TO %I', n.nspname, c.relname, $2::text) "
        "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = $1::text AND c.relkind IN ('r', 'p', 'v', 'm', 'f') "
        "AND c.relowner <> $2::text::regrole",
        "SELECT format('ALTER SEQUENCE %I.%I OWNER TO %I', n.nspname, c.relname, $2::text) "
        "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = $1::text AND c.relkind = 'S' AND c.relowner <> $2::text::regrole",
        "SELECT format('ALTER ROUTINE %s OWNER TO %I', p.oid::regprocedure, $2::text) "
        "FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
        "WHERE n.nspname = $1::text AND p.proowner <> $2::text::regrole",
    ]
    for query in statements:
        for (stmt,) in await conn.fetch(query, schema, role):
            await conn.execute(stmt)


def run_async(fn: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine to completion from synchronous code, in a thread of its own
    (the caller may itself be running in an event loop's worker thread or not)."""
    out: list[T] = []
    err: list[BaseException] = []

    def target() -> None:
        try:
            out.append(asyncio.run(fn()))
        except BaseException as exc:  # handed to the caller
            err.append(exc)

    t = threading.Thread(target=target, name="embedded-auth")
    t.start()
    t.join()
    if err:
        raise err[0]
    return out[0]
