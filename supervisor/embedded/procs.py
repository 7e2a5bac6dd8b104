"""Processes and files of a running server: which processes serve a data directory
(/proc), postmaster.pid, reaping re-parented servers, file locks, the log tail.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pathlib
from collections.abc import Iterator

from supervisor.embedded.base import (
    _LOG_TAIL_LINES,
    EmbeddedPostgresError,
)


def _proc_state(pid: int) -> str | None:
    """The one-letter state of ``pid`` from /proc, or None if there is no such process."""
    try:
        raw = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # "pid (comm) S ...": comm may contain spaces and parentheses.
    return raw[raw.rfind(")") + 2 :][:1] or None


def _process_serves(pid: int, data_dir: pathlib.Path) -> bool:
    """True if ``pid`` is a live (not zombie) postgres process working in ``data_dir``.

    The postmaster and its children chdir into the data directory, so ``/proc/<pid>/cwd``
    identifies them even after a pid from a stale ``postmaster.pid`` is reused.
    """
    state = _proc_state(pid)
    if state is None or state in ("Z", "X"):
        return False
    try:
        return pathlib.Path(os.readlink(f"/proc/{pid}/cwd")) == data_dir
    except OSError:
        pass
    # cwd unreadable (another user's process without privileges): fall back to argv.
    try:
        argv = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return bool(argv) and argv[0].endswith(b"postgres") and os.fsencode(data_dir) in argv


def _processes_in(data_dir: pathlib.Path) -> list[int]:
    """Live processes whose working directory is ``data_dir`` (server and its children)."""
    pids: list[int] = []
    for entry in pathlib.Path("/proc").iterdir():
        if entry.name.isdigit() and _process_serves(int(entry.name), data_dir):
            try:
                exe = os.readlink(entry / "exe")
            except OSError:
                exe = ""
            if not exe or os.path.basename(exe.removesuffix(" (deleted)")) == "postgres":
                pids.append(int(entry.name))
    return pids


def _postmaster_pid_in(lock_file: pathlib.Path) -> int | None:
    """The pid on the first line of a PostgreSQL lock file (postmaster.pid, socket lock)."""
    try:
        first = lock_file.read_text().split("\n", 1)[0].strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(first) if first.lstrip("-").isdigit() else None


def _socket_dir_in(pid_file: pathlib.Path) -> pathlib.Path | None:
    """The socket directory a running server recorded (line 5 of postmaster.pid)."""
    try:
        lines = pid_file.read_text().split("\n")
    except (OSError, UnicodeDecodeError):
        return None
    return pathlib.Path(lines[4].strip()) if len(lines) > 4 and lines[4].strip() else None


def reap_orphaned_servers() -> list[int]:
    """Reap zombie postgres processes that were re-parented to this process.

    ``pg_ctl start`` detaches the postmaster; when this process is PID 1 (a container
    without an init) or a child subreaper, the exited server becomes our zombie. Only
    those specific pids are waited for, so other children's statuses are untouched.
    """
    me = os.getpid()
    reaped: list[int] = []
    for entry in pathlib.Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "stat").read_text()
        except OSError:
            continue  # vanished meanwhile
        comm = raw[raw.find("(") + 1 : raw.rfind(")")]
        fields = raw[raw.rfind(")") + 2 :].split()
        if len(fields) < 2 or fields[0] != "Z" or int(fields[1]) != me or comm != "postgres":
            continue
        with contextlib.suppress(ChildProcessError):
            os.waitpid(int(entry.name), os.WNOHANG)
            reaped.append(int(entry.name))
    return reaped


def _open_lock(path: pathlib.Path) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise EmbeddedPostgresError(f"cannot open lock file {path}: {exc}") from exc


@contextlib.contextmanager
def _flock(path: pathlib.Path) -> Iterator[None]:
    fd = _open_lock(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _tail(path: pathlib.Path, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 16384))
            text = fh.read().decode("utf-8", "replace")
    except OSError as exc:
        return f"(cannot read {path}: {exc})"
    return "\n".join(text.splitlines()[-lines:])


def _server_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update({"LC_ALL": "C", "LANG": "C"})
    return env
