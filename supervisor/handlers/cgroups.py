"""Per-attempt cgroups for exec commands: nothing an attempt starts outlives it.

Killing the attempt's process group misses what calls ``setsid``; the attempt's
token in the environment finds those, unless they also clear their environment.
A cgroup (v2) holds every descendant whatever it does: each attempt gets its own,
``bsv-<daemon pid>-<token>`` under the daemon's cgroup, the command joins it
before it runs, and the attempt ends by writing ``cgroup.kill`` and removing it.

This needs a cgroup the daemon may create children in: a daemon started as root
(outside a unit that protects the cgroup tree), or a systemd unit with
``Delegate=yes`` and ``ProtectControlGroups=no``. Elsewhere :func:`detect` returns
None, says why once in the log, and the process group and token still apply.

The command joins its cgroup through ``/bin/sh -c 'echo 0 > cgroup.procs; exec
...'`` (a Python child cannot join one between fork and exec without
``preexec_fn``, which is unsafe with threads); a root daemon that switches the
command's account does it with util-linux's ``setpriv`` after joining, because
the unprivileged account may not move itself out of the daemon's cgroup.
"""

from __future__ import annotations

import functools
import logging
import os
import pathlib
import shutil
import signal
import time
from collections.abc import Mapping

log = logging.getLogger(__name__)

PREFIX = "bsv-"
SETTLE_S = 5.0  # after cgroup.kill: processes stuck in the kernel; give up waiting
# sh exports PWD, which is not the command's to see unless its environment had it.
_JOIN = 'echo 0 > "$0" && exec "$@"'
_JOIN_AS = (
    'echo 0 > "$0" && s=$1 u=$2 g=$3 && shift 3 && '
    'exec "$s" --reuid="$u" --regid="$g" --clear-groups -- "$@"'
)
_NO_PWD = "unset PWD; "


def _own_cgroup() -> pathlib.Path:
    """The daemon's cgroup v2 directory; OSError when there is none."""
    rel = None
    for line in pathlib.Path("/proc/self/cgroup").read_text().splitlines():
        hier, _, rest = line.partition(":")
        if hier == "0":
            rel = rest.partition(":")[2]
    if rel is None:
        raise OSError("no cgroup v2 hierarchy (this process is in cgroup v1 only)")
    for line in pathlib.Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        sep = fields.index("-")
        if fields[sep + 1] == "cgroup2" and fields[3] == "/":
            return pathlib.Path(fields[4]) / rel.lstrip("/")
    raise OSError("cgroup2 is not mounted")


def _pids(cg: pathlib.Path) -> list[int]:
    try:
        return [int(p) for p in (cg / "cgroup.procs").read_text().split()]
    except OSError:
        return []


def _outside_group(pids: list[int], pgid: int | None) -> int:
    """How many of ``pids`` left process group ``pgid`` (all of them when None)."""
    n = 0
    for pid in pids:
        try:
            n += pgid is None or os.getpgid(pid) != pgid
        except OSError:
            pass  # gone meanwhile
    return n


def _kill_and_remove(cg: pathlib.Path, pgid: int | None = None) -> int:
    """SIGKILL everything in ``cg``, wait until it is empty, remove it; how many
    of its processes had left process group ``pgid`` (the escapees). Blocks for
    milliseconds (run in a worker thread)."""
    left = _pids(cg)
    escaped = _outside_group(left, pgid)
    if left:
        try:
            (cg / "cgroup.kill").write_text("1")
        except OSError:
            for pid in left:  # a kernel without cgroup.kill (before 5.14)
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
    deadline = time.monotonic() + SETTLE_S
    while True:
        try:
            cg.rmdir()
            return escaped
        except FileNotFoundError:
            return escaped
        except OSError:
            if time.monotonic() > deadline:
                log.warning("exec.cgroup_busy path=%s (not empty after SIGKILL)", cg)
                return escaped
            time.sleep(0.01)


class AttemptCgroup:
    """One attempt's cgroup: its command runs in it, and ending it ends them all."""

    def __init__(self, path: pathlib.Path, setpriv: str | None) -> None:
        self.path = path
        self._setpriv = setpriv

    def wrap(
        self, argv: list[str], account: tuple[int, int] | None, env: Mapping[str, str]
    ) -> list[str]:
        """``argv`` run inside this cgroup (as ``account`` (uid, gid), if given:
        only with setpriv), with environment ``env``."""
        procs = str(self.path / "cgroup.procs")
        pre = "" if "PWD" in env else _NO_PWD
        if account is None:
            return ["/bin/sh", "-c", pre + _JOIN, procs, *argv]
        assert self._setpriv is not None
        uid, gid = account
        script = pre + _JOIN_AS
        return ["/bin/sh", "-c", script, procs, self._setpriv, str(uid), str(gid), *argv]

    def end(self, pgid: int | None) -> int:
        """Kill what is in it and remove it: how many of its processes had left
        process group ``pgid`` (the escapees). Blocks briefly (worker thread)."""
        return _kill_and_remove(self.path, pgid)

    def discard(self) -> None:
        """Remove it unused (its command never started)."""
        try:
            self.path.rmdir()
        except OSError:
            pass


class Cgroups:
    """The daemon's cgroup, in which each attempt gets a child cgroup."""

    def __init__(self, base: pathlib.Path, setpriv: str | None) -> None:
        self.base = base
        self.setpriv = setpriv

    def create(self, token: str) -> AttemptCgroup | None:
        """A new attempt cgroup, or None (logged) when the kernel refuses one
        (cgroup.max.descendants, say): the attempt then runs without."""
        path = self.base / f"{PREFIX}{os.getpid()}-{token}"
        try:
            path.mkdir()
        except OSError as exc:
            log.warning("exec.cgroup_refused path=%s error=%s", path, exc)
            return None
        return AttemptCgroup(path, self.setpriv)

    def remove_stale(self) -> int:
        """Kill and remove the attempt cgroups of daemons that are gone (killed
        with -9: their commands would run on); how many processes that stopped."""
        stopped = 0
        for cg in self.base.glob(f"{PREFIX}*-*"):
            pid = cg.name[len(PREFIX) :].partition("-")[0]
            if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
                stopped += _kill_and_remove(cg)
        return stopped


@functools.cache
def detect() -> Cgroups | None:
    """The daemon's cgroup when it may make attempt cgroups in it, else None
    (the reason logged once)."""
    if not os.access("/bin/sh", os.X_OK):
        return None
    try:
        base = _own_cgroup()
        probe = base / f"{PREFIX}{os.getpid()}-probe"
        probe.mkdir()
        try:
            if not (probe / "cgroup.procs").exists():
                raise OSError(f"{probe} has no cgroup.procs")
        finally:
            probe.rmdir()
    except OSError as exc:
        log.info(
            "exec.cgroups unavailable (%s): a command's descendants are stopped by "
            "process group and attempt token",
            exc,
        )
        return None
    found = Cgroups(base, shutil.which("setpriv"))
    stopped = found.remove_stale()
    log.info("exec.cgroups base=%s stale_processes_stopped=%s", base, stopped)
    return found
