"""Fixtures of the system tests."""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import socket
import tempfile
from collections.abc import Iterator

import pytest

from supervisor import embedded
from tests.daemon import Daemon
from tests.pgharness import make_base_dir


@pytest.fixture
def data_dir(started_daemons: list[Daemon]) -> Iterator[pathlib.Path]:
    """An embedded data directory of the test's own (a short path: socket names)."""
    base = make_base_dir("bsv-shared-")
    path = base / "pgdata"
    try:
        yield path
    finally:
        # The daemons go first: a live one would start its server again (its
        # embedded watch) in the directory being removed.
        for d in started_daemons:
            d.kill()
        # Killed daemons leave the (detached) server behind.
        with contextlib.suppress(embedded.EmbeddedPostgresError):
            embedded.EmbeddedPostgres(path).stop("immediate")
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def notify_socket() -> Iterator[tuple[str, socket.socket]]:
    """A datagram socket standing in for systemd's (short path: sun_path is 108 bytes)."""
    d = tempfile.mkdtemp(prefix="bsv-n-")
    path = os.path.join(d, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(0.1)
    try:
        yield path, sock
    finally:
        sock.close()
        shutil.rmtree(d, ignore_errors=True)
