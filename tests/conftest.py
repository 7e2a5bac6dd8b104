"""Shared fixtures: one PostgreSQL server per session, one fresh database per test."""

from __future__ import annotations

import pathlib
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests import pgharness
from tests.daemon import Daemon

DaemonFactory = Callable[..., Daemon]


@pytest.fixture(scope="session", autouse=True)
def _adopt_orphaned_servers() -> None:
    """Stopped servers are reaped by this process, not left as zombies (see pgharness)."""
    pgharness.become_subreaper()


@pytest.fixture(scope="session")
def pg_server() -> Iterator[pgharness.TestServer]:
    """One embedded server (TCP, fsync off) for the whole session; always stopped."""
    server = pgharness.TestServer()
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture
def fresh_db_url(pg_server: pgharness.TestServer) -> Iterator[str]:
    """DSN of a new empty database, dropped after the test."""
    name = f"t_{uuid.uuid4().hex}"
    url = pg_server.create_database(name)
    try:
        yield url
    finally:
        pg_server.drop_database(name)


@pytest.fixture(scope="session")
def migrated_template(pg_server: pgharness.TestServer) -> str:
    """A database with the schema applied, used as the template of ``db_url``."""
    import asyncio

    from supervisor import config
    from supervisor import db as dbm

    name = "bsv_template"
    url = pg_server.create_database(name)

    async def go() -> None:
        d = await dbm.Database.connect(config.from_mapping({}), url)
        try:
            await dbm.migrate(d)
        finally:
            await d.close()

    asyncio.run(go())
    return name


@pytest.fixture
def db_url(pg_server: pgharness.TestServer, migrated_template: str) -> Iterator[str]:
    """DSN of a new, migrated database, dropped after the test."""
    name = f"t_{uuid.uuid4().hex}"
    url = pg_server.create_database(name, template=migrated_template)
    try:
        yield url
    finally:
        pg_server.drop_database(name)


@pytest.fixture
def started_daemons() -> Iterator[list[Daemon]]:
    """Every daemon the test started; all killed (SIGKILL) at the end. Fixtures whose
    cleanup must come after the daemons are gone (an embedded data directory a live
    daemon would restart its server in) kill them first themselves."""
    started: list[Daemon] = []
    try:
        yield started
    finally:
        for d in started:
            d.kill()


@pytest.fixture
def daemons(tmp_path: pathlib.Path, db_url: str, started_daemons: list[Daemon]) -> DaemonFactory:
    """Start real daemons on the test database (see ``started_daemons``)."""

    def make(name: str = "d1", *, start: bool = True, **kw: Any) -> Daemon:
        d = Daemon(tmp_path, db_url, name=name, **kw)
        started_daemons.append(d)
        return d.start() if start else d

    return make
