"""Names shared by the embedded server's modules: its account, where copies live,
the version floor, and the one error type.
"""

from __future__ import annotations

import logging
import pathlib
from typing import Final

from supervisor.errors import SupervisorError

logger = logging.getLogger("supervisor.embedded")  # one logger for the package

SERVER_ACCOUNT: Final = "batch-supervisor-pg"
"""System account the server runs as when the daemon runs as root."""

BINARY_COPY_ROOT: Final = pathlib.Path("/var/lib/batch-supervisor")
"""Root-owned, world-readable home of binary copies for the server account."""

MIN_SERVER_VERSION: Final = 14
REQUIRED_BINARIES: Final = ("initdb", "pg_ctl", "postgres")
_SOCKET_PATH_MAX: Final = 107  # sun_path is 108 bytes including the terminating NUL
_LOG_ROTATE_BYTES: Final = 10 * 1024 * 1024
_LOG_TAIL_LINES: Final = 30


class EmbeddedPostgresError(SupervisorError):
    """The embedded PostgreSQL server could not be found, created, started or stopped."""
