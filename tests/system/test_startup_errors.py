"""Start-up problems the configuration can fix print one line and exit 78.
Failed before the fix: a busy port gave a 40-line exception-group traceback and
exit 1, and ``check`` called a malformed database URL "configuration ok"."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from typing import Any

import pytest

from supervisor import config
from supervisor.errors import ConfigError
from tests.daemon import ROOT


def test_port_in_use_is_one_line_and_exit_78(daemons: Any) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        d = daemons(start=False, extra={"server": {"port": port}})
        out = subprocess.run(
            [sys.executable, "-m", "supervisor", "run", "--config", str(d.config_path)],
            cwd=ROOT,
            env=d.env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert out.returncode == 78, out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    assert f"server.port: cannot listen on 127.0.0.1:{port}" in out.stderr


@pytest.mark.parametrize("url", ["localhost:5432/db", "postgresql://u@h:port/db", "mysql://h/db"])
def test_malformed_database_url_is_a_config_error(url: str) -> None:
    with pytest.raises(ConfigError) as exc:
        config.from_mapping({"database": {"url": url}})
    assert exc.value.problems[0].startswith("database.url: ")


def test_check_reports_a_malformed_database_url(tmp_path: Any) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text('[database]\nurl = "localhost:5432/db"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("BATCH_SUPERVISOR_")}
    out = subprocess.run(
        [sys.executable, "-m", "supervisor", "check", "--config", str(cfg)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 78, out
    assert "database.url: expected a postgresql://" in out.stderr
