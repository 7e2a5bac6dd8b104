"""The server itself: one private cluster in a data directory, created, started,
adopted, shared between processes and stopped (see the package docstring).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import pathlib
import pwd
import re
import shlex
import shutil
import stat
import subprocess
import tempfile
import time
import urllib.parse
from collections.abc import Iterator, Mapping, Sequence
from types import TracebackType
from typing import Final

from supervisor import embedded_auth
from supervisor.embedded.accounts import (
    _Account,
    _can_reach,
    _current_account,
    ensure_server_account,
)
from supervisor.embedded.base import (
    _LOG_ROTATE_BYTES,
    _SOCKET_PATH_MAX,
    BINARY_COPY_ROOT,
    EmbeddedPostgresError,
    logger,
)
from supervisor.embedded.binaries import _copy_wheel_binaries, _wheel_layout, find_bin_dir
from supervisor.embedded.procs import (
    _flock,
    _open_lock,
    _postmaster_pid_in,
    _process_serves,
    _processes_in,
    _server_env,
    _socket_dir_in,
    _tail,
    reap_orphaned_servers,
)

# --------------------------------------------------------------------------- data dir

STATE_DATA_ROOT: Final = BINARY_COPY_ROOT / "data"


def _reachable_data_dir(requested: pathlib.Path) -> pathlib.Path:
    """Where the cluster for ``requested`` lives: ``requested`` itself, unless we are
    root and it sits under a directory only root can enter (a clone in /root, a
    ``mktemp -d``). The server account could not reach it there, and we never
    chmod a user's directories: the cluster then lives in a state directory of
    its own under STATE_DATA_ROOT, the same one for the same requested path."""
    if os.geteuid() != 0 or (requested / "PG_VERSION").exists():
        return requested
    if not any(_closed_to_others(p) for p in requested.parents):
        return requested
    digest = hashlib.sha256(os.fsencode(requested)).hexdigest()[:12]
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", str(requested.parent)).strip("-")[-40:]
    return STATE_DATA_ROOT / f"{slug}-{digest}" / requested.name


def _closed_to_others(path: pathlib.Path) -> bool:
    try:
        return not path.stat().st_mode & stat.S_IXOTH
    except OSError:
        return False  # not there yet: we create it (0755 under our umask at worst)


def _prepare_state_parent(data_dir: pathlib.Path) -> None:
    """Make the state directories above a relocated cluster enterable by the server
    account (mkdir's mode is masked by the umask)."""
    for path in (BINARY_COPY_ROOT, STATE_DATA_ROOT, data_dir.parent):
        path.mkdir(mode=0o755, exist_ok=True)
        os.chmod(path, 0o755)


# --------------------------------------------------------------------------- server


class EmbeddedPostgres:
    """One private PostgreSQL cluster in ``data_dir``: created, started, adopted, stopped."""

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        *,
        port: int = 5432,
        listen_tcp: bool = False,
        bin_dir: str | None = None,
        fsync: bool = True,
        user: str = "postgres",
        auth: str = "scram-sha-256",
        schema: str = "supervisor",
        server_settings: Mapping[str, str] | None = None,
        start_timeout_s: float = 60.0,
        stop_timeout_s: float = 60.0,
    ) -> None:
        self.requested_data_dir = pathlib.Path(os.path.abspath(os.fspath(data_dir)))
        self._data_dir = _reachable_data_dir(self.requested_data_dir)
        self._port = port
        self._listen_tcp = listen_tcp
        self._configured_bin_dir = bin_dir
        self._fsync = fsync
        if auth not in ("scram-sha-256", "trust"):
            raise ValueError(f"auth must be 'scram-sha-256' or 'trust', not {auth!r}")
        self._user = user
        # "scram-sha-256" (the daemon): passwords required, and start() returns the
        # DSN of a non-superuser role owning ``schema`` (see embedded_auth).
        # "trust": the superuser without a password (the test suite's throwaway server).
        self._auth = auth
        self._schema = schema
        self._server_settings = dict(server_settings or {})
        self._start_timeout_s = start_timeout_s
        self._stop_timeout_s = stop_timeout_s
        self._bin_dir: pathlib.Path | None = None
        self._account: _Account | None = None
        self._dsn: str | None = None
        self._users_fd: int | None = None  # our shared lock on users_file while we use it
        self._socket_override: pathlib.Path | None = None  # set if the /tmp name was squatted
        self.adopted = False  # True when start() found the server already running

    # -- properties

    @property
    def data_dir(self) -> pathlib.Path:
        return self._data_dir

    @property
    def port(self) -> int:
        return self._port

    @property
    def log_file(self) -> pathlib.Path:
        return self._data_dir / "server.log"

    @property
    def lock_file(self) -> pathlib.Path:
        return self._data_dir.parent / f".{self._data_dir.name}.lock"

    @property
    def credentials_file(self) -> pathlib.Path:
        return embedded_auth.credentials_path(self._data_dir)

    @property
    def users_file(self) -> pathlib.Path:
        """Every process using the server holds a shared flock on this file; the server
        is stopped only by one that can take it exclusively (nobody else uses it)."""
        return self._data_dir.parent / f".{self._data_dir.name}.users"

    @property
    def socket_dir(self) -> pathlib.Path:
        """The server's private socket directory: inside the data directory, or, when
        that path is too long for a socket name, a short one under /tmp. The /tmp name
        is predictable, so anyone could create it first: a running server's actual
        directory is read from its postmaster.pid, and a squatted name is replaced by
        a fresh random directory at start (see _prepare_socket_dir)."""
        preferred = self._data_dir / ".s"
        if len(os.fsencode(preferred / f".s.PGSQL.{self._port}")) <= _SOCKET_PATH_MAX:
            return preferred
        if self._socket_override is not None:
            return self._socket_override
        running = _socket_dir_in(self._data_dir / "postmaster.pid")
        if running is not None and self._live_postmaster() is not None:
            return running
        digest = hashlib.sha256(os.fsencode(self._data_dir)).hexdigest()[:16]
        return pathlib.Path(f"/tmp/bsv-{digest}")

    @property
    def dsn(self) -> str:
        """The DSN of the running server; raises if ``start()`` has not succeeded."""
        if self._dsn is None:
            raise EmbeddedPostgresError(f"embedded server for {self._data_dir} is not started")
        return self._dsn

    # -- lifecycle

    def start(self) -> str:
        """Create the cluster if needed, start (or adopt) the server, return its DSN."""
        account = self._resolve_account()
        bin_dir = self._resolve_bin_dir(account)
        if self._data_dir != self.requested_data_dir:
            logger.info(
                "embedded.start: the server account cannot enter %s (a directory only root "
                "may enter); the cluster lives in %s instead",
                self.requested_data_dir,
                self._data_dir,
            )
            _prepare_state_parent(self._data_dir)
        self._data_dir.parent.mkdir(parents=True, exist_ok=True)
        self._check_reachable(account, self._data_dir.parent, os.X_OK)
        with _flock(self.lock_file):
            self._use()
            self._prepare_data_dir(account)
            creds = self._credentials()
            if not (self._data_dir / "PG_VERSION").exists():
                self._initdb(account, bin_dir, creds)
            self._prepare_socket_dir(account)
            if self._live_postmaster() is not None:
                self._adopt_port()
                self.adopted = True
                logger.info("embedded.start: adopted running server for %s", self._data_dir)
            else:
                self.adopted = False
                self._clear_stale_pid_file()
                self._pg_ctl_start(account, bin_dir)
            if creds is None:
                self._dsn = self._build_dsn(self._user, None)
            else:
                self._provision(creds)
                self._dsn = self._build_dsn(creds.role, creds.password)
        logger.info("embedded.start: server ready for %s", self._data_dir)
        return self._dsn

    def stop(self, mode: str = "fast") -> bool:
        """Stop the server (``pg_ctl -m <mode> stop -w``); harmless if it is not running.

        A server another process still uses (a second daemon or a CLI command on the
        same data directory) is left running: we only give up our use of it and
        return False.
        """
        if mode not in ("smart", "fast", "immediate"):
            raise ValueError(f"unknown stop mode {mode!r}")
        if not self._data_dir.is_dir():
            return True
        with _flock(self.lock_file):
            self._dsn = None
            try:
                if not self._sole_user():
                    logger.info(
                        "embedded.stop: left running for %s: another process uses it",
                        self._data_dir,
                    )
                    return False
                pid = self._live_postmaster()
                if pid is None:
                    return True
                self._stop_server(pid, mode)
            finally:
                self._release_use()
        logger.info("embedded.stop: stopped server for %s (mode %s)", self._data_dir, mode)
        return True

    def _stop_server(self, pid: int, mode: str) -> None:
        account = self._account or self._resolve_account()
        bin_dir = self._bin_dir or self._resolve_bin_dir(account)
        timeout = self._stop_timeout_s + 10
        stop = ["stop", "-D", str(self._data_dir), "-m", mode, "-w"]
        result = self._run(
            account,
            bin_dir,
            "pg_ctl",
            [*stop, "-t", str(int(self._stop_timeout_s))],
            timeout=timeout,
        )
        if result.returncode != 0 and mode != "immediate":
            logger.warning(
                "embedded.stop: %s stop failed (%s); stopping immediately",
                mode,
                result.stdout.strip() or result.stderr.strip(),
            )
            stop[-2] = "immediate"
            result = self._run(account, bin_dir, "pg_ctl", stop, timeout=timeout)
        self._wait_no_processes(self._stop_timeout_s)
        reap_orphaned_servers()
        if self._live_postmaster() is not None:
            raise EmbeddedPostgresError(
                f"cannot stop PostgreSQL server {pid} for {self._data_dir}: "
                f"{(result.stdout + result.stderr).strip()}"
            )

    def is_running(self) -> bool:
        """True if a live postmaster serves this data directory."""
        return self._live_postmaster() is not None

    def __enter__(self) -> EmbeddedPostgres:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- users (callers hold the start lock)

    def _use(self) -> None:
        """Take our shared lock on ``users_file`` (kept until we stop or are killed)."""
        if self._users_fd is None:
            fd = _open_lock(self.users_file)
            fcntl.flock(fd, fcntl.LOCK_SH)  # never waits long: stoppers hold the start lock
            self._users_fd = fd

    def _sole_user(self) -> bool:
        """True if no other process uses the server; gives up our own use otherwise.

        An exclusive lock succeeds only when no one else holds a shared one (a process
        killed with SIGKILL drops its lock with its file descriptors)."""
        fd = self._users_fd if self._users_fd is not None else _open_lock(self.users_file)
        self._users_fd = fd
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._release_use()
            return False
        return True

    def _release_use(self) -> None:
        if self._users_fd is not None:
            os.close(self._users_fd)
            self._users_fd = None

    # -- steps

    def _resolve_account(self) -> _Account:
        if self._account is None:
            if os.geteuid() != 0:
                self._account = _current_account()
            else:
                owner = self._existing_owner()
                if owner is not None and owner != 0:
                    # An existing cluster owned by someone else: run as its owner.
                    entry = pwd.getpwuid(owner)
                    self._account = _Account(entry.pw_name, entry.pw_uid, entry.pw_gid)
                else:
                    self._account = ensure_server_account()
        return self._account

    def _existing_owner(self) -> int | None:
        try:
            if (self._data_dir / "PG_VERSION").exists():
                return self._data_dir.stat().st_uid
        except OSError:
            return None
        return None

    def _resolve_bin_dir(self, account: _Account) -> pathlib.Path:
        if self._bin_dir is None:
            bin_dir = find_bin_dir(self._configured_bin_dir)
            if not account.is_current and _can_reach(account, bin_dir / "postgres", os.X_OK):
                if _wheel_layout(bin_dir) is None:
                    blocked = _can_reach(account, bin_dir / "postgres", os.X_OK)
                    raise EmbeddedPostgresError(
                        f"server account {account.name} cannot execute {bin_dir}/postgres "
                        f"({blocked} is not accessible to it); use binaries in a "
                        "world-readable place ([embedded] bin_dir)"
                    )
                bin_dir = _copy_wheel_binaries(bin_dir, BINARY_COPY_ROOT)
                self._check_reachable(account, bin_dir / "postgres", os.X_OK)
            self._bin_dir = bin_dir
        return self._bin_dir

    def _check_reachable(self, account: _Account, path: pathlib.Path, need: int = 0) -> None:
        blocked = _can_reach(account, path, need)
        if blocked is not None and not account.is_current:
            raise EmbeddedPostgresError(
                f"the PostgreSQL server account {account.name} cannot reach {path}: "
                f"{blocked} is not accessible to it. Choose a data_dir outside private "
                f"directories (e.g. /var/lib/batch-supervisor/data); parent directories "
                f"are never chmod-ed for you"
            )

    def _prepare_data_dir(self, account: _Account) -> None:
        if not self._data_dir.exists():
            self._data_dir.mkdir(mode=0o700)
        self._own_private_dir(account, self._data_dir)

    def _own_private_dir(self, account: _Account, path: pathlib.Path) -> None:
        """Make ``path`` a 0700 directory owned by ``account`` (taking over only what root made)."""
        st = path.lstat()
        if not stat.S_ISDIR(st.st_mode):
            raise EmbeddedPostgresError(f"{path} exists and is not a directory")
        if st.st_uid != account.uid:
            if os.geteuid() != 0 or st.st_uid != 0 or any(path.iterdir()):
                raise EmbeddedPostgresError(
                    f"{path} is owned by uid {st.st_uid}, not by {account.name}; "
                    "refusing to take it over"
                )
            os.chown(path, account.uid, account.gid)
        if stat.S_IMODE(st.st_mode) != 0o700:
            os.chmod(path, 0o700)

    def _prepare_socket_dir(self, account: _Account) -> None:
        sock = self.socket_dir
        with contextlib.suppress(FileExistsError):
            sock.mkdir(mode=0o700)
        try:
            self._own_private_dir(account, sock)
        except EmbeddedPostgresError as exc:
            if sock.parent != pathlib.Path("/tmp"):
                raise
            # Someone else made our predictable name first: never use it, never fail.
            fresh = pathlib.Path(tempfile.mkdtemp(prefix=f"{sock.name}-", dir="/tmp"))
            logger.warning("embedded.socket_dir: %s; using %s instead", exc, fresh)
            self._own_private_dir(account, fresh)
            self._socket_override = fresh

    def _credentials(self) -> embedded_auth.Credentials | None:
        """The passwords of a scram cluster: read, or made for a new cluster (or one
        an older release made with trust, converted by _provision)."""
        if self._auth == "trust":
            return None
        path = self.credentials_file
        try:
            creds = embedded_auth.load(path)
        except embedded_auth.CredentialsError as exc:
            raise EmbeddedPostgresError(str(exc)) from None
        if creds is not None:
            return creds
        cluster = (self._data_dir / "PG_VERSION").exists()
        if cluster and not embedded_auth.hba_trusts(self._data_dir):
            raise EmbeddedPostgresError(
                f"the embedded cluster in {self._data_dir} requires passwords, and its "
                f"credentials file {path} is missing: restore it, or remove the data "
                "directory to start over"
            )
        logger.info("embedded.credentials: generated %s (mode 0600)", path)
        return embedded_auth.create(path)

    def _provision(self, creds: embedded_auth.Credentials) -> None:
        """The daemon's role and schema (every start); a trust cluster converted."""
        superuser = self._build_dsn(self._user, creds.superuser_password)
        converted = embedded_auth.run_async(
            lambda: embedded_auth.provision(superuser, creds, self._schema, self._data_dir)
        )
        if converted:
            logger.info(
                "embedded.secured: %s now requires passwords; the daemon connects as %s",
                self._data_dir,
                creds.role,
            )

    def _initdb(
        self, account: _Account, bin_dir: pathlib.Path, creds: embedded_auth.Credentials | None
    ) -> None:
        logger.info("embedded.initdb: creating cluster in %s", self._data_dir)
        args = [
            "-D",
            str(self._data_dir),
            "-U",
            self._user,
            f"--auth={self._auth}",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-instructions",
        ]
        if not self._fsync:
            args.append("--no-sync")
        with self._password_file(account, creds) as pwfile:
            if pwfile is not None:
                args.append(f"--pwfile={pwfile}")
            result = self._run(account, bin_dir, "initdb", args, timeout=300)
        if result.returncode != 0:
            raise EmbeddedPostgresError(
                f"initdb failed for {self._data_dir} (exit {result.returncode}):\n"
                f"{(result.stdout + result.stderr).strip()}"
            )

    @contextlib.contextmanager
    def _password_file(
        self, account: _Account, creds: embedded_auth.Credentials | None
    ) -> Iterator[pathlib.Path | None]:
        """The superuser password in a file only the server account can read, for
        ``initdb --pwfile``; removed right after."""
        if creds is None:
            yield None
            return
        tmp = pathlib.Path(tempfile.mkdtemp(prefix="bsv-pw-"))
        try:
            path = tmp / "pw"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(creds.superuser_password + "\n")
            if not account.is_current:
                os.chown(tmp, account.uid, account.gid)
                os.chown(path, account.uid, account.gid)
            yield path
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _live_postmaster(self) -> int | None:
        pid = _postmaster_pid_in(self._data_dir / "postmaster.pid")
        return pid if pid is not None and self._serves(pid) else None

    def _clear_stale_pid_file(self) -> None:
        """Remove lock files left by a killed server (their pids may be reused or zombies).

        PostgreSQL trusts ``kill(pid, 0)``, which succeeds for a zombie or an unrelated
        process that reused the pid; we check /proc instead, under the start lock.
        """
        socket_lock = self.socket_dir / f".s.PGSQL.{self._port}.lock"
        stale = [
            path
            for path in (self._data_dir / "postmaster.pid", socket_lock)
            if path.exists() and not self._serves(_postmaster_pid_in(path))
        ]
        if not stale:
            return
        # Children of a killed postmaster exit on their own shortly; the server refuses
        # to start while they still hold the old shared memory.
        self._wait_no_processes(self._start_timeout_s)
        reap_orphaned_servers()
        for path in stale:
            logger.warning(
                "embedded.start: removing stale %s (pid %s)", path, _postmaster_pid_in(path)
            )
            path.unlink(missing_ok=True)
            if path == socket_lock:
                (self.socket_dir / f".s.PGSQL.{self._port}").unlink(missing_ok=True)

    def _adopt_port(self) -> None:
        """Use the port the running server really has (postmaster.pid line 4)."""
        try:
            lines = (self._data_dir / "postmaster.pid").read_text().splitlines()
            running = int(lines[3])
        except (OSError, ValueError, IndexError):
            return  # unreadable: keep the configured port; the DSN check will tell
        if running != self._port:
            logger.warning(
                "embedded.start: running server for %s uses port %d, not %d",
                self._data_dir,
                running,
                self._port,
            )
            self._port = running

    def _serves(self, pid: int | None) -> bool:
        return pid is not None and pid > 0 and _process_serves(pid, self._data_dir.resolve())

    def _wait_no_processes(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        data_dir = self._data_dir.resolve()
        while True:
            left = _processes_in(data_dir)
            if not left:
                return
            if time.monotonic() > deadline:
                raise EmbeddedPostgresError(
                    f"PostgreSQL processes {left} still run in {self._data_dir}"
                )
            time.sleep(0.05)

    def _server_options(self) -> list[str]:
        settings: dict[str, str] = {
            "port": str(self._port),
            "unix_socket_directories": f'"{self.socket_dir}"',
            "listen_addresses": "127.0.0.1" if self._listen_tcp else "",
        }
        if not self._fsync:
            settings.update(
                {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}
            )
        settings.update(self._server_settings)
        options: list[str] = []
        for key, value in settings.items():
            options += ["-c", f"{key}={value}"]
        return options

    def _pg_ctl_start(self, account: _Account, bin_dir: pathlib.Path) -> None:
        self._rotate_log()
        logger.info("embedded.start: starting server for %s", self._data_dir)
        args = [
            "start",
            "-D",
            str(self._data_dir),
            "-l",
            str(self.log_file),
            "-w",
            "-t",
            str(int(self._start_timeout_s)),
            # pg_ctl hands -o to /bin/sh: quote every word.
            "-o",
            shlex.join(self._server_options()),
        ]
        result = self._run(account, bin_dir, "pg_ctl", args, timeout=self._start_timeout_s + 30)
        socket_file = self.socket_dir / f".s.PGSQL.{self._port}"
        if result.returncode != 0 or self._live_postmaster() is None or not socket_file.exists():
            raise EmbeddedPostgresError(
                f"PostgreSQL server for {self._data_dir} did not start "
                f"(pg_ctl exit {result.returncode}: {(result.stdout + result.stderr).strip()}). "
                f"Tail of {self.log_file}:\n{_tail(self.log_file)}"
            )

    def _rotate_log(self) -> None:
        try:
            if self.log_file.stat().st_size > _LOG_ROTATE_BYTES:
                os.replace(self.log_file, self.log_file.with_suffix(".log.1"))
        except FileNotFoundError:
            pass  # first start: nothing to rotate

    def _build_dsn(self, user: str, password: str | None) -> str:
        who = urllib.parse.quote(user, safe="")
        if password is not None:
            who += ":" + urllib.parse.quote(password, safe="")
        if self._listen_tcp:
            return f"postgresql://{who}@127.0.0.1:{self._port}/postgres"
        host = urllib.parse.quote(str(self.socket_dir), safe="/")
        return f"postgresql://{who}@/postgres?host={host}&port={self._port}"

    def _run(
        self,
        account: _Account,
        bin_dir: pathlib.Path,
        program: str,
        args: Sequence[str],
        *,
        timeout: float,
    ) -> subprocess.CompletedProcess[str]:
        argv = [str(bin_dir / program), *args]
        logger.debug("embedded.run: %s as %s", shlex.join(argv), account.name)
        try:
            return subprocess.run(
                argv,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
                cwd="/",
                env=_server_env(),
                stdin=subprocess.DEVNULL,
                **account.subprocess_kwargs(),
            )
        except (OSError, subprocess.SubprocessError) as exc:
            raise EmbeddedPostgresError(f"cannot run {program}: {exc}") from exc
