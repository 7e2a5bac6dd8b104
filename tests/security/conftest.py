"""Fixtures shared with the system tests."""

from tests.system.conftest import data_dir  # noqa: F401  (an embedded data directory)
