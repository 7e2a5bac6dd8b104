"""Accounts: the system account the server runs as when the daemon is root, and
whether an account can reach a path (without ever chmod-ing the user's directories).
"""

from __future__ import annotations

import contextlib
import grp
import os
import pathlib
import pwd
import shlex
import stat
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from supervisor.embedded.base import (
    SERVER_ACCOUNT,
    EmbeddedPostgresError,
    logger,
)


@dataclass(frozen=True)
class _Account:
    """Who the server processes run as."""

    name: str
    uid: int
    gid: int

    @property
    def is_current(self) -> bool:
        return self.uid == os.geteuid()

    def subprocess_kwargs(self) -> dict[str, Any]:
        """Keyword arguments that make ``subprocess`` run a command as this account."""
        if self.is_current:
            return {}
        return {"user": self.uid, "group": self.gid, "extra_groups": []}


def _nologin_shell() -> str:
    for shell in ("/usr/sbin/nologin", "/sbin/nologin", "/bin/false"):
        if os.path.exists(shell):
            return shell
    return "/bin/false"


def _run_admin(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=60, check=False)


def ensure_server_account(name: str = SERVER_ACCOUNT) -> _Account:
    """Return the system account ``name``, creating it (idempotently) if missing."""
    with contextlib.suppress(KeyError):
        entry = pwd.getpwnam(name)
        return _Account(name, entry.pw_uid, entry.pw_gid)

    shell = _nologin_shell()
    common = ["--system", "--no-create-home", "--home-dir", "/nonexistent", "--shell", shell]
    attempts: list[list[str]] = []
    try:
        grp.getgrnam(name)
        group_exists = True
    except KeyError:
        group_exists = False
    if group_exists:
        attempts.append(["useradd", *common, "--gid", name, name])
    else:
        attempts.append(["useradd", *common, "--user-group", name])
        attempts.append(["groupadd", "--system", name])
        attempts.append(["useradd", *common, "--gid", name, name])

    errors: list[str] = []
    for argv in attempts:
        with contextlib.suppress(KeyError):
            entry = pwd.getpwnam(name)  # another process may have won the race
            break
        if argv[0] == "groupadd":
            with contextlib.suppress(KeyError):
                grp.getgrnam(name)
                continue
        try:
            result = _run_admin(argv)
        except (OSError, subprocess.TimeoutExpired) as exc:
            errors.append(f"{argv[0]}: {exc}")
            continue
        if result.returncode != 0:
            errors.append(f"{shlex.join(argv)} -> {result.returncode}: {result.stderr.strip()}")
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise EmbeddedPostgresError(
            f"cannot create system account {name!r} for the PostgreSQL server "
            f"(PostgreSQL refuses to run as root): {'; '.join(errors)}"
        ) from None
    logger.info("embedded.account: created system account %s (uid %d)", name, entry.pw_uid)
    return _Account(name, entry.pw_uid, entry.pw_gid)


def _current_account() -> _Account:
    uid = os.geteuid()
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = str(uid)
    return _Account(name, uid, os.getegid())


def _can_reach(account: _Account, path: pathlib.Path, need: int) -> pathlib.Path | None:
    """The first component of ``path`` that ``account`` cannot traverse/use, else None.

    ``need`` is the permission class required on ``path`` itself (as ``os.R_OK`` etc.);
    every ancestor needs search (execute) permission.
    """
    if account.uid == 0:
        return None
    path = path.absolute()
    chain = [*reversed(path.parents), path]
    for index, component in enumerate(chain):
        try:
            st = component.stat()
        except OSError:
            return component
        want = need if index == len(chain) - 1 else os.X_OK
        if st.st_uid == account.uid:
            shift = 6
        elif st.st_gid == account.gid:
            shift = 3
        else:
            shift = 0
        bits = 0
        if want & os.R_OK:
            bits |= stat.S_IROTH << shift
        if want & os.W_OK:
            bits |= stat.S_IWOTH << shift
        if want & os.X_OK:
            bits |= stat.S_IXOTH << shift
        if st.st_mode & bits != bits:
            return component
    return None


def blocked_for(uid: int, gid: int, path: str | os.PathLike[str], need: int) -> pathlib.Path | None:
    """The first component of ``path`` the account ``uid``/``gid`` cannot use, else None."""
    return _can_reach(_Account(str(uid), uid, gid), pathlib.Path(path), need)
