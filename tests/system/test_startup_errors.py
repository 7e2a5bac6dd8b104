"""Start-up problems the configuration can fix print one line and exit 78.
Failed before the fix: a busy port gave a 40-line exception-group traceback and
exit 1, and ``check`` called a malformed database URL "configuration ok"."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import urllib.parse
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


def _run(d: Any, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "supervisor", *args, "--config", str(d.config_path)],
        cwd=ROOT,
        env=d.env | (env or {}),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize(
    ("part", "value", "said"),
    [
        ("user", "nosuchrole", 'role "nosuchrole" does not exist'),
        ("path", "/nosuchdb", 'database "nosuchdb" does not exist'),
    ],
    ids=["role", "database"],
)
def test_a_role_or_database_that_does_not_exist_is_one_line_and_exit_78(
    daemons: Any, db_url: str, part: str, value: str, said: str
) -> None:
    u = urllib.parse.urlsplit(db_url)
    if part == "user":
        u = u._replace(netloc=f"{value}@{u.hostname}:{u.port}")
    else:
        u = u._replace(path=value)
    d = daemons(start=False)
    out = _run(d, "run", env={"BATCH_SUPERVISOR_DATABASE_URL": urllib.parse.urlunsplit(u)})
    assert out.returncode == 78, out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    assert "database.url: the server refused the connection:" in out.stderr, out.stderr
    assert said in out.stderr, out.stderr


def test_a_bad_embedded_bin_dir_is_one_line_and_exit_78(daemons: Any, tmp_path: Any) -> None:
    extra = {"embedded": {"bin_dir": str(tmp_path / "nothing-here"), "data_dir": str(tmp_path)}}
    d = daemons(start=False, extra=extra, env={"BATCH_SUPERVISOR_DATABASE_URL": ""})
    for command in ("check", "run"):
        out = _run(d, command)
        assert out.returncode == 78, (command, out.stderr)
        assert "Traceback" not in out.stderr, out.stderr
        assert "embedded.bin_dir: configured PostgreSQL bin_dir" in out.stderr, out.stderr
