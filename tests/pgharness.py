"""A throwaway PostgreSQL server for the test suite, built on supervisor.embedded.

``TestServer`` runs one ``EmbeddedPostgres`` on 127.0.0.1 at a free port with fsync off,
in a data directory under its own temporary directory, and hands out databases.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import pathlib
import re
import shutil
import socket
import tempfile
import urllib.parse

import asyncpg

from supervisor import embedded

_DB_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def make_base_dir(prefix: str = "bsv-pg-") -> pathlib.Path:
    """A fresh temporary directory the server account can traverse.

    ``tempfile``/pytest make 0700 directories; when we run as root the server runs as
    another account, which must be able to reach the data directory inside. This is a
    directory we just created, so opening it up harms nobody.
    """
    base = pathlib.Path(tempfile.mkdtemp(prefix=prefix))
    os.chmod(base, 0o755)
    return base


_PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> bool:
    """Make this process adopt orphaned descendants (Linux), so that stopped servers can
    be reaped here: ``pg_ctl`` detaches the postmaster, and an init that does not reap
    (some VMs and containers) would otherwise leave ``<defunct>`` postgres entries.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


def postgres_pids(data_dir: pathlib.Path) -> list[int]:
    """Live (non-zombie) processes working in ``data_dir``: a server and its children."""
    target = data_dir.resolve()
    pids = []
    for entry in pathlib.Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat_text = (entry / "stat").read_text()
            if stat_text[stat_text.rfind(")") + 2] in "ZX":
                continue
            if pathlib.Path(os.readlink(entry / "cwd")) == target:
                pids.append(int(entry.name))
        except (OSError, IndexError):
            continue  # process vanished or is not ours to inspect
    return pids


def _quote_ident(name: str) -> str:
    if not _DB_NAME.match(name):
        raise ValueError(f"unsafe database name {name!r}")
    return f'"{name}"'


def with_database(dsn: str, database: str) -> str:
    """``dsn`` pointing at ``database`` instead."""
    parts = urllib.parse.urlsplit(dsn)
    return urllib.parse.urlunsplit(parts._replace(path=f"/{database}"))


class TestServer:
    """One embedded PostgreSQL server for tests: TCP on a free port, fsync off."""

    __test__ = False  # not a pytest test class

    def __init__(self, base_dir: pathlib.Path | None = None, *, port: int | None = None) -> None:
        self._owns_base = base_dir is None
        self.base_dir = base_dir if base_dir is not None else make_base_dir()
        self.data_dir = self.base_dir / "data"
        self.server = embedded.EmbeddedPostgres(
            self.data_dir,
            port=port if port is not None else free_port(),
            listen_tcp=True,
            fsync=False,
            auth="trust",  # a throwaway server: the suite creates databases as superuser
        )

    @property
    def admin_dsn(self) -> str:
        return self.server.dsn

    @property
    def port(self) -> int:
        return self.server.port

    # -- lifecycle (fault tests use crash/restart)

    def start(self) -> str:
        return self.server.start()

    def stop(self) -> None:
        self.server.stop("fast")

    def crash(self) -> None:
        """Stop the server the way a power cut would look to the clients (immediate)."""
        self.server.stop("immediate")

    def restart(self) -> str:
        self.server.stop("fast")
        return self.server.start()

    def close(self) -> None:
        """Stop the server and remove its files (if this harness made the directory)."""
        try:
            self.server.stop("immediate")
        finally:
            if self._owns_base:
                shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self) -> TestServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- databases

    async def acreate_database(self, name: str, template: str | None = None) -> str:
        sql = f"CREATE DATABASE {_quote_ident(name)}"
        if template is not None:
            sql += f" TEMPLATE {_quote_ident(template)}"
        conn = await asyncpg.connect(self.admin_dsn)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()
        return with_database(self.admin_dsn, name)

    async def adrop_database(self, name: str) -> None:
        conn = await asyncpg.connect(self.admin_dsn)
        try:
            await conn.execute(f"DROP DATABASE IF EXISTS {_quote_ident(name)} WITH (FORCE)")
        finally:
            await conn.close()

    def create_database(self, name: str, template: str | None = None) -> str:
        """Create database ``name`` (optionally from ``template``); return its DSN."""
        return asyncio.run(self.acreate_database(name, template))

    def drop_database(self, name: str) -> None:
        """Drop database ``name``, disconnecting its sessions."""
        asyncio.run(self.adrop_database(name))
