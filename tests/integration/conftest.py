"""Fixtures of the integration tier: the suite's PostgreSQL, one fresh migrated
database per test (``db_url``), a pool on it and a direct connection for what
no named query does (backdating a timestamp, holding a lock)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest

from supervisor import config
from supervisor import db as dbm


@pytest.fixture
async def db(db_url: str) -> AsyncIterator[dbm.Database]:
    d = await dbm.Database.connect(config.from_mapping({}), db_url)
    try:
        yield d
    finally:
        await d.close()


@pytest.fixture
async def conn(db_url: str) -> AsyncIterator[asyncpg.Connection]:
    c: asyncpg.Connection = await asyncpg.connect(db_url)
    try:
        yield c
    finally:
        await c.close()
