"""The embedded server's credentials file and pg_hba check (supervisor.embedded_auth)."""

from __future__ import annotations

import pathlib
import stat

import pytest

from supervisor import embedded_auth


def test_credentials_are_private_random_and_read_back(tmp_path: pathlib.Path) -> None:
    path = embedded_auth.credentials_path(tmp_path / "pgdata")
    assert path == tmp_path / ".pgdata.credentials"
    assert embedded_auth.load(path) is None
    made = embedded_auth.create(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert embedded_auth.load(path) == made
    assert made.role == "batch_supervisor" and made.password != made.superuser_password
    assert len(made.password) >= 32
    assert embedded_auth.create(tmp_path / "other").password != made.password


def test_a_foreign_file_is_refused_naming_it(tmp_path: pathlib.Path) -> None:
    path = tmp_path / ".x.credentials"
    path.write_text("not json")
    with pytest.raises(embedded_auth.CredentialsError, match=str(path)):
        embedded_auth.load(path)


def test_trust_lines_are_found_and_comments_ignored(tmp_path: pathlib.Path) -> None:
    hba = tmp_path / "pg_hba.conf"
    hba.write_text("# local all all trust\nlocal all all scram-sha-256\n")
    assert not embedded_auth.hba_trusts(tmp_path)
    hba.write_text("local all all scram-sha-256\nhost all all 127.0.0.1/32 trust # old\n")
    assert embedded_auth.hba_trusts(tmp_path)
    embedded_auth.write_scram_hba(tmp_path)
    assert not embedded_auth.hba_trusts(tmp_path)
    assert not embedded_auth.hba_trusts(tmp_path / "missing")
