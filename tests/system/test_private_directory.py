"""Root runs the embedded default from a directory only root may enter.

A clone in /root (mode 0700) or under ``mktemp -d``: the PostgreSQL server runs
as an unprivileged account that cannot enter it. Before the fix, start-up failed
and told the user to choose another data_dir; now the cluster lives in a state
directory of its own (logged at start-up), found again on every start, and the
user's directories are never chmod-ed.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import stat
import tempfile

import pytest

from supervisor import embedded
from tests.conftest import DaemonFactory
from tests.system.embedded_daemons import start_embedded

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="only root's server runs as another account (needs root)"
)


def test_root_runs_the_embedded_default_from_a_private_directory(
    daemons: DaemonFactory,
) -> None:
    base = pathlib.Path(tempfile.mkdtemp(prefix="bsv-private-"))  # 0700, root's
    requested = base / ".data" / "postgres"
    actual = embedded.EmbeddedPostgres(requested).data_dir
    try:
        assert actual != requested and actual.parent.parent == embedded.STATE_DATA_ROOT
        d = start_embedded(daemons, "private", requested)
        d.wait_ready(120)
        batch = d.submit("echo", [1, 2, 3])
        assert d.wait_status(batch["id"], "completed", 60)["counts"]["succeeded"] == 3
        assert f"the cluster lives in {actual} instead" in d.log(), d.log()
        assert stat.S_IMODE(base.stat().st_mode) == 0o700  # never chmod-ed
        assert d.stop() == 0

        # The same requested directory finds the same cluster again.
        again = start_embedded(daemons, "again", requested)
        again.wait_ready(120)
        assert again.batch(batch["id"])["status"] == "completed"
        assert again.stop() == 0
    finally:
        with contextlib.suppress(embedded.EmbeddedPostgresError):
            embedded.EmbeddedPostgres(requested).stop("immediate")
        shutil.rmtree(actual.parent, ignore_errors=True)
        shutil.rmtree(base, ignore_errors=True)
