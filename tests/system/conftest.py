"""Fixtures of the system tests."""

from __future__ import annotations

import contextlib
import pathlib
import shutil
from collections.abc import Iterator

import pytest

from supervisor import embedded
from tests.pgharness import make_base_dir


@pytest.fixture
def data_dir() -> Iterator[pathlib.Path]:
    """An embedded data directory of the test's own (a short path: socket names)."""
    base = make_base_dir("bsv-shared-")
    path = base / "pgdata"
    try:
        yield path
    finally:
        # Daemons killed by the fixture leave the (detached) server behind.
        with contextlib.suppress(embedded.EmbeddedPostgresError):
            embedded.EmbeddedPostgres(path).stop("immediate")
        shutil.rmtree(base, ignore_errors=True)
