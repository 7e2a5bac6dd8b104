"""Shared fixtures: one PostgreSQL server per session, one fresh database per test."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from tests import pgharness


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
