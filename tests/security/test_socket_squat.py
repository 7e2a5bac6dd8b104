"""A predictable socket directory under /tmp cannot be used to stop the server.

When the data directory's path is too long for a unix socket name, the server's
socket lives under /tmp/bsv-<hash>. Before the fix, a local user who created that
directory first made every start fail ("owned by uid …, refusing to take it over").
Now the squatted name is never used: the server gets a fresh random directory, and
a second process on the same data directory finds it through postmaster.pid.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pathlib
import shutil

import asyncpg
import pytest

from supervisor import embedded
from tests.pgharness import make_base_dir

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="squatting as another user needs root to create its directory"
)


async def _select_one(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        value: int = await conn.fetchval("SELECT 1")
        return value
    finally:
        await conn.close()


def test_a_squatted_socket_directory_does_not_stop_the_server() -> None:
    base = make_base_dir("bsv-squat-")
    data_dir = base / ("d" * 90) / "pgdata"  # too long for a socket name inside it
    pg = embedded.EmbeddedPostgres(data_dir, port=54391)
    squatted = pg.socket_dir
    assert squatted.parent == pathlib.Path("/tmp"), squatted
    squatted.mkdir(mode=0o755)
    os.chown(squatted, 4242, 4242)  # another local user got there first
    other: embedded.EmbeddedPostgres | None = None
    try:
        dsn = pg.start()
        assert pg.socket_dir != squatted and str(pg.socket_dir).startswith(str(squatted) + "-")
        assert asyncio.run(_select_one(dsn)) == 1
        # Another process on the same data directory finds the real socket.
        other = embedded.EmbeddedPostgres(data_dir, port=54391)
        assert other.socket_dir == pg.socket_dir
        assert asyncio.run(_select_one(other.start())) == 1
    finally:
        for p in (other, pg):
            if p is not None:
                with contextlib.suppress(embedded.EmbeddedPostgresError):
                    p.stop("immediate")
        shutil.rmtree(squatted, ignore_errors=True)
        shutil.rmtree(pg.socket_dir, ignore_errors=True)
        shutil.rmtree(base, ignore_errors=True)
