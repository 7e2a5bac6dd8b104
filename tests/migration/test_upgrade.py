"""An upgraded install is the same database as a fresh one.

``schema_v4.sql`` is what release 0.1.0 left behind (schema version 4, the
transition functions still defined inside the migrations). Upgrading it with
today's ``migrate`` must give exactly the catalog a fresh install gets: same
columns, constraints, indexes and function bodies, same migration history.
"""

from __future__ import annotations

import asyncio
import pathlib

import asyncpg

from supervisor import config, sqlfile
from supervisor import db as dbm
from tests.migration.catalog import describe

SNAPSHOT = pathlib.Path(__file__).with_name("schema_v4.sql")


async def _migrate(dsn: str) -> list[int]:
    d = await dbm.Database.connect(config.from_mapping({}), dsn)
    try:
        return await dbm.migrate(d)
    finally:
        await d.close()


async def _execute(dsn: str, sql: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def _assert_same(upgraded: dict[str, list[str]], fresh: dict[str, list[str]]) -> None:
    for kind in fresh:
        only_fresh = sorted(set(fresh[kind]) - set(upgraded[kind]))
        only_upgraded = sorted(set(upgraded[kind]) - set(fresh[kind]))
        assert not only_fresh and not only_upgraded, (kind, only_fresh, only_upgraded)


def test_a_version_4_install_upgrades_to_what_a_fresh_install_is(
    fresh_db_url: str, db_url: str
) -> None:
    """Also with a function body that differs from the shipped one: migrate brings
    the current definition of every function, not only new migrations."""
    asyncio.run(_execute(fresh_db_url, SNAPSHOT.read_text()))
    stale = (
        "CREATE OR REPLACE FUNCTION supervisor.repair_batch(p_batch uuid, p_actor text) "
        "RETURNS text LANGUAGE plpgsql AS $$ BEGIN RETURN 'stale'; END $$"
    )
    asyncio.run(_execute(fresh_db_url, stale))
    latest = sqlfile.load_migrations("supervisor")[-1].version
    applied = asyncio.run(_migrate(fresh_db_url))
    assert applied == list(range(5, latest + 1))
    _assert_same(asyncio.run(describe(fresh_db_url)), asyncio.run(describe(db_url)))


def test_a_version_1_install_upgrades_too(fresh_db_url: str, db_url: str) -> None:
    """What 0001 alone left: the running-items index on (lease) only."""
    asyncio.run(_execute(fresh_db_url, SNAPSHOT.read_text()))
    asyncio.run(
        _execute(
            fresh_db_url,
            "DELETE FROM supervisor.schema_migrations WHERE version > 1;"
            "DROP INDEX supervisor.items_running;"
            "CREATE INDEX items_running ON supervisor.items (lease) WHERE status = 'running';",
        )
    )
    latest = sqlfile.load_migrations("supervisor")[-1].version
    assert asyncio.run(_migrate(fresh_db_url)) == list(range(2, latest + 1))
    upgraded = asyncio.run(describe(fresh_db_url))
    fresh = asyncio.run(describe(db_url))
    # Migration names are the same; their applied_at differs and is not compared.
    _assert_same(upgraded, fresh)
