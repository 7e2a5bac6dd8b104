"""An embedded-server failure in a CLI verb is one line and exit 1, not a traceback.
EmbeddedPostgresError sat outside the SupervisorError tree, so `migrate` on a
cluster whose credentials file is gone printed a 30-line traceback."""

from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys

from supervisor import embedded, embedded_auth
from tests.daemon import ROOT, render_toml
from tests.pgharness import free_port, make_base_dir


def test_a_missing_credentials_file_is_one_line(tmp_path: pathlib.Path) -> None:
    base = make_base_dir("bsv-cred-")
    data_dir = base / "pgdata"
    port = free_port()
    pg = embedded.EmbeddedPostgres(data_dir, port=port, fsync=False)
    try:
        pg.start()
    finally:
        pg.stop()
    embedded_auth.credentials_path(data_dir).unlink()
    cfg = tmp_path / "config.toml"
    cfg.write_text(render_toml({"embedded": {"data_dir": str(data_dir), "port": port}}))
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-m", "supervisor", "migrate", "--config", str(cfg)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    try:
        assert out.returncode == 1, out
        assert "Traceback" not in out.stderr, out.stderr
        lines = [ln for ln in out.stderr.splitlines() if ln.startswith("batch-supervisor:")]
        assert len(lines) == 1 and "credentials file" in lines[0], out.stderr
    finally:
        embedded.EmbeddedPostgres(data_dir, port=port).stop("immediate")
        shutil.rmtree(base, ignore_errors=True)
