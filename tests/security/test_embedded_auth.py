"""The embedded server is not an open door to a database superuser. Before the
fix it was made with ``initdb --auth=trust`` and the daemon connected as the
superuser ``postgres``: any process of the daemon's account (an exec handler fed
a hostile payload) could connect without a password and run ``COPY … TO PROGRAM``
or read every tenant's data. Both tests failed on that code: the password-less
superuser connection succeeded."""

from __future__ import annotations

import pathlib
import stat
import urllib.parse

import asyncpg
import pytest

from supervisor import embedded, embedded_auth
from tests.conftest import DaemonFactory
from tests.pgharness import free_port
from tests.system.embedded_daemons import completes_a_batch, start_embedded
from tests.test_embedded import fetchval


def socket_dsn(pgdata: pathlib.Path, who: str) -> str:
    port = int((pgdata / "postmaster.pid").read_text().split("\n")[3])
    host = urllib.parse.quote(str(pgdata / ".s"), safe="/")
    return f"postgresql://{who}@/postgres?host={host}&port={port}"


def assert_locked(data_dir: pathlib.Path) -> None:
    """No password, no connection; the daemon's role is no superuser."""
    with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError)) as exc:
        fetchval(socket_dsn(data_dir, "postgres"), "SELECT 1")
    assert "password" in str(exc.value).lower(), exc.value
    creds = embedded_auth.load(embedded_auth.credentials_path(data_dir))
    assert creds is not None and creds.role == "batch_supervisor"
    path = embedded_auth.credentials_path(data_dir)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    role = socket_dsn(data_dir, f"{creds.role}:{urllib.parse.quote(creds.password, safe='')}")
    assert fetchval(role, "SELECT rolsuper FROM pg_roles WHERE rolname = current_user") is False
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        fetchval(role, "COPY (SELECT 1) TO PROGRAM 'true'")
    assert not embedded_auth.hba_trusts(data_dir)


def test_a_new_embedded_server_needs_passwords_and_the_daemon_is_no_superuser(
    daemons: DaemonFactory,
    data_dir: pathlib.Path,
) -> None:
    d = start_embedded(daemons, "a", data_dir)
    d.wait_ready(60)
    completes_a_batch(d)
    assert_locked(data_dir)


def test_a_trusting_server_from_an_earlier_release_is_converted(
    daemons: DaemonFactory,
    data_dir: pathlib.Path,
) -> None:
    """A cluster made with trust, its schema and data owned by the superuser (what
    an earlier release left): the next start secures it and keeps the data."""
    port = free_port()
    old = embedded.EmbeddedPostgres(data_dir, port=port, auth="trust", fsync=False)
    dsn = old.start()
    try:
        before = daemons("old", env={"BATCH_SUPERVISOR_DATABASE_URL": dsn})
        kept = before.submit("echo", [1, 2])
        before.wait_status(kept["id"], "completed")
        before.stop()
    finally:
        old.stop()
    d = start_embedded(
        daemons, "new", data_dir, extra={"embedded": {"data_dir": str(data_dir), "port": port}}
    )
    d.wait_ready(60)
    assert "embedded.secured" in d.log()
    assert d.batch(kept["id"])["status"] == "completed"  # the old data, now the role's
    completes_a_batch(d)
    assert_locked(data_dir)
