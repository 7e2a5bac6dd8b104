"""The embedded server in CLI verbs: a failure is one line and exit 1, not a traceback;
the CLI starts and stops it by the daemon's rules.
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

ENV = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}


def cli(verb: str, cfg: pathlib.Path) -> subprocess.CompletedProcess[str]:
    """``batch-supervisor <verb> --config cfg`` with a bare environment."""
    return subprocess.run(
        [sys.executable, "-m", "supervisor", verb, "--config", str(cfg)],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


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
    out = cli("migrate", cfg)
    try:
        assert out.returncode == 1, out
        assert "Traceback" not in out.stderr, out.stderr
        lines = [ln for ln in out.stderr.splitlines() if ln.startswith("batch-supervisor:")]
        assert len(lines) == 1 and "credentials file" in lines[0], out.stderr
    finally:
        embedded.EmbeddedPostgres(data_dir, port=port).stop("immediate")
        shutil.rmtree(base, ignore_errors=True)


def test_a_cli_verb_treats_a_bad_bin_dir_as_configuration_like_the_daemon(
    tmp_path: pathlib.Path,
) -> None:
    """The CLI started the embedded server by rules of its own: a wrong
    embedded.bin_dir was exit 1 for `migrate` but exit 78 (configuration) for `run`."""
    cfg = tmp_path / "config.toml"
    data_dir = tmp_path / "pgdata"
    cfg.write_text(
        render_toml({"embedded": {"data_dir": str(data_dir), "bin_dir": str(tmp_path / "none")}})
    )
    for verb in ("run", "migrate"):
        out = cli(verb, cfg)
        assert out.returncode == 78, (verb, out)
        assert "embedded.bin_dir" in out.stderr, (verb, out.stderr)
        assert "Traceback" not in out.stderr, (verb, out.stderr)


def test_a_cli_verb_stops_a_server_it_adopted_when_no_one_else_uses_it(
    tmp_path: pathlib.Path,
) -> None:
    """The CLI left an adopted server running (a daemon stops one it is the last
    user of): the rule is now one, the last process out stops it."""
    base = make_base_dir("bsv-adopt-")
    data_dir = base / "pgdata"
    port = free_port()
    try:
        # A process that starts the server and exits without stopping it (killed, say).
        starter = (
            "from supervisor import embedded; "
            f"embedded.EmbeddedPostgres({str(data_dir)!r}, port={port}, fsync=False).start()"
        )
        subprocess.run([sys.executable, "-c", starter], cwd=ROOT, env=ENV, check=True, timeout=120)
        assert embedded.EmbeddedPostgres(data_dir, port=port).is_running()
        cfg = tmp_path / "config.toml"
        cfg.write_text(render_toml({"embedded": {"data_dir": str(data_dir), "port": port}}))
        out = cli("migrate", cfg)
        assert out.returncode == 0, out
        assert not embedded.EmbeddedPostgres(data_dir, port=port).is_running()
    finally:
        embedded.EmbeddedPostgres(data_dir, port=port).stop("immediate")
        shutil.rmtree(base, ignore_errors=True)
