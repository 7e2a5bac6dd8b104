"""The daemon behind PgBouncer in transaction mode (pooler compatibility):
``statement_cache_size = 0`` for the pooled connections, LISTEN on a direct session
(``listen_url``), or polling when there is none. A batch completes and its SSE stream
still delivers progress (snapshot ... end).

PgBouncer is started by the test (a config in a fresh directory, a free port on
127.0.0.1, trust auth, transaction pooling). It refuses to run as root, so as root
it runs as an unprivileged account. Skipped when pgbouncer is not installed.
"""

from __future__ import annotations

import json
import os
import pathlib
import pwd
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from tests.chaos.common import assert_no_drift
from tests.daemon import Daemon, check_invariants, wait_for
from tests.pgharness import TestServer, free_port, make_base_dir, with_database

ITEMS = 24
HANDLERS = {"echo": {"type": "python", "target": "tests.handlers:echo", "timeout": "30s"}}
WORKER = {"concurrency": 4, "poll_interval": "200ms", "heartbeat_interval": "500ms"}


def pgbouncer_binary() -> str | None:
    found = shutil.which("pgbouncer")
    if found:
        return found
    return "/usr/sbin/pgbouncer" if os.access("/usr/sbin/pgbouncer", os.X_OK) else None


def unprivileged_account() -> pwd.struct_passwd | None:
    """The account to run pgbouncer as when we are root (it refuses to run as root)."""
    if os.geteuid() != 0:
        return None
    for name in ("batch-supervisor-pg", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    pytest.skip("running as root and no unprivileged account to run pgbouncer as")


class Bouncer:
    """One pgbouncer process in transaction mode in front of one test database."""

    def __init__(self, binary: str, server: TestServer, database: str) -> None:
        self.port = free_port()
        self.database = database
        self.dir = make_base_dir("bsv-pgbouncer-")
        self.log_path = self.dir / "pgbouncer.log"
        self.account = unprivileged_account()
        user = "postgres"  # the suite server's superuser (see supervisor.embedded)
        (self.dir / "userlist.txt").write_text(f'"{user}" ""\n')
        (self.dir / "pgbouncer.ini").write_text(
            "\n".join(
                [
                    "[databases]",
                    f"{database} = host=127.0.0.1 port={server.port} dbname={database}",
                    "[pgbouncer]",
                    "listen_addr = 127.0.0.1",
                    f"listen_port = {self.port}",
                    "unix_socket_dir =",
                    "auth_type = trust",
                    f"auth_file = {self.dir / 'userlist.txt'}",
                    "pool_mode = transaction",
                    "default_pool_size = 20",
                    "max_client_conn = 200",
                    # asyncpg may send these at start-up; PgBouncer cannot track them.
                    "ignore_startup_parameters = extra_float_digits,search_path",
                    f"logfile = {self.log_path}",
                    "",
                ]
            )
        )
        if self.account is not None:
            for p in [self.dir, *self.dir.iterdir()]:
                os.chown(p, self.account.pw_uid, self.account.pw_gid)
        self.proc = subprocess.Popen(
            [binary, str(self.dir / "pgbouncer.ini")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            user=self.account.pw_uid if self.account else None,
            group=self.account.pw_gid if self.account else None,
        )
        wait_for(self._listening, 15, 0.05, "pgbouncer listening")

    def _listening(self) -> bool:
        if self.proc.poll() is not None:
            err = self.proc.stderr.read().decode() if self.proc.stderr else ""
            raise AssertionError(f"pgbouncer exited {self.proc.returncode}: {err}{self.log()}")
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{self.database}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.proc.stderr:
            self.proc.stderr.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def bouncer(pg_server: TestServer, db_url: str) -> Iterator[Bouncer]:
    binary = pgbouncer_binary()
    if binary is None:
        pytest.skip("pgbouncer is not installed (apt-get install pgbouncer; .ci/run does)")
    b = Bouncer(binary, pg_server, db_url.rsplit("/", 1)[1])
    try:
        yield b
    finally:
        b.close()


def sse_events(url: str, timeout: float = 30.0) -> list[tuple[str, Any]]:
    """Read an SSE stream to its end: [(event, data), ...]."""
    events: list[tuple[str, Any]] = []
    deadline = time.monotonic() + timeout
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        event, data = "", ""
        for raw in resp:
            assert time.monotonic() < deadline, f"stream still open after {timeout}s: {events}"
            line = raw.decode().rstrip("\n")
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                data = line[6:]
            elif not line and event:
                events.append((event, json.loads(data)))
                event, data = "", ""
    return events


def run_batch_through_pooler(d: Daemon, bouncer: Bouncer) -> None:
    b = d.submit("echo", [{"sleep": 0.15} for _ in range(ITEMS)])
    events = sse_events(f"{d.url}/v1/batches/{b['id']}/events")
    kinds = [e for e, _ in events]
    assert kinds[0] == "snapshot" and kinds[-1] == "end", kinds
    assert events[-1][1]["status"] == "completed", events[-1]
    snapshots = [data for e, data in events if e == "snapshot"]
    assert snapshots[-1]["status"] == "completed", snapshots[-1]
    assert snapshots[-1]["counts"]["succeeded"] == ITEMS, snapshots[-1]
    # Progress, not only the first and the last word: the stream saw the batch move.
    assert len(snapshots) >= 3, kinds
    assert "item" in kinds, kinds
    final = d.batch(b["id"])
    check_invariants(final)
    assert final["status"] == "completed", final
    assert [i["status"] for i in d.items(b["id"])] == ["succeeded"] * ITEMS
    # The daemon's pool really went through the pooler.
    assert f"db={bouncer.database} user=postgres" in bouncer.log(), bouncer.log()[-2000:]
    assert_no_drift(d)


def daemon_behind(
    tmp_path: pathlib.Path, bouncer: Bouncer, name: str, listen_url: str | None
) -> Daemon:
    database: dict[str, Any] = {"statement_cache_size": 0}
    if listen_url is not None:
        database["listen_url"] = listen_url
    return Daemon(
        tmp_path,
        bouncer.url,
        name=name,
        handlers=HANDLERS,
        worker=WORKER,
        extra={"database": database},
    )


def test_daemon_behind_pgbouncer_with_direct_listen(
    tmp_path: pathlib.Path, bouncer: Bouncer, pg_server: TestServer, db_url: str
) -> None:
    d = daemon_behind(
        tmp_path, bouncer, "pooled", with_database(pg_server.admin_dsn, bouncer.database)
    )
    try:
        d.start()
        run_batch_through_pooler(d, bouncer)
        assert "events.listening" in d.log() and "events.no_notifications" not in d.log()
    finally:
        d.kill()


def test_daemon_behind_pgbouncer_without_listen_url_polls(
    tmp_path: pathlib.Path, bouncer: Bouncer
) -> None:
    d = daemon_behind(tmp_path, bouncer, "polling", None)
    try:
        d.start()
        # LISTEN through the pooler "works" but delivers nothing: the daemon must notice
        # and poll, or streams would wait out their long idle timeout between snapshots.
        wait_for(lambda: "events.no_notifications" in d.log(), 10, what="polling fallback")
        run_batch_through_pooler(d, bouncer)
    finally:
        d.kill()
