"""Database.transaction(snapshot=True): the metrics sampler's reads see one
snapshot. Read apart, an item claimed between two reads was counted as queued
and as running in the same sample (CI saw queued 5 + running 1 of 5 items)."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from supervisor import config
from supervisor import db as dbm


def test_reads_in_a_snapshot_do_not_see_a_concurrent_commit(db_url: str) -> None:
    async def go() -> None:
        d = await dbm.Database.connect(config.from_mapping({}), db_url)
        other = await asyncpg.connect(db_url)
        try:
            count = "SELECT count(*) FROM supervisor.rate_buckets"
            async with d.transaction("test", snapshot=True) as tx:
                assert await tx.conn.fetchval(count) == 0
                await other.execute("INSERT INTO supervisor.rate_buckets VALUES ('h', 1, now())")
                assert await tx.conn.fetchval(count) == 0  # the same snapshot
            async with d.transaction("test") as tx:
                assert await tx.conn.fetchval(count) == 1
            async with d.transaction("test", snapshot=True) as tx:
                with pytest.raises(asyncpg.ReadOnlySQLTransactionError):
                    await tx.execute("record_migration", 999, "nope")
        finally:
            await other.close()
            await d.close()

    asyncio.run(go())
