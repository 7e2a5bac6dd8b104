"""``type = "exec"``: runs ``command`` (argv list, never a shell) once per attempt.

The item's payload is written to stdin as JSON; ``BSV_*`` environment variables
describe the attempt, in a minimal environment (see :meth:`ExecHandler._env`).
Exit 0 succeeds (stdout as JSON, else text, is the result; lines starting
``::bsv-`` report progress or extend the deadline instead, see :class:`_Stdout`),
exit 75 (EX_TEMPFAIL) is retried, any other exit fails the item with the tail of
stderr.
The child runs in its own process group, and an attempt that is cancelled
(timeout, batch cancel, drain deadline) kills the whole group and reaps it
before returning. Where the daemon may make cgroups (see
:mod:`supervisor.handlers.cgroups`), each attempt runs in a cgroup of its own,
killed and removed when it ends, so nothing it started outlives it whatever it
did. Elsewhere a process that left the group (``setsid``, a double fork into a
new session) is found by the attempt's token in its environment
(BSV_ATTEMPT_TOKEN) and killed, unless it also wiped its environment (systemd's
cgroup still stops those with the service).

A daemon started as root runs its commands as the unprivileged account
RUN_ACCOUNT (created if missing), not as root: a command fed a hostile payload
must not own the machine. ``user`` names another account, and ``user = "root"``
is the explicit way back.
"""

from __future__ import annotations

import json
import logging
import os
import pwd
import secrets
import shutil
import signal
import subprocess
from typing import Any

import anyio
import anyio.abc
import anyio.to_thread

from supervisor import embedded
from supervisor.config import HandlerConfig
from supervisor.errors import HandlerLoadError, PermanentError
from supervisor.handlers import cgroups
from supervisor.models import Item

log = logging.getLogger(__name__)

EX_TEMPFAIL = 75
STDOUT_LIMIT = 1024 * 1024  # the result; more is a misbehaving command, not a result
STDERR_TAIL = 64 * 1024  # kept from the end: the cause is usually last
MESSAGE_TAIL = 1500  # stderr shown in the error message (the executor keeps 2000 chars)
KILL_GRACE_S = 2.0  # between SIGTERM and SIGKILL of the process group
REAP_TIMEOUT_S = 5.0  # a process stuck in the kernel after SIGKILL: give up waiting
RUN_ACCOUNT = "batch-supervisor-run"  # what commands run as when the daemon is root
CONTROL_PREFIX = b"::bsv-"  # a stdout line the attempt says to the daemon (see _Stdout)
CONTROL_LINE_MAX = 64 * 1024  # longer: output, whatever it starts with


class ExecTempFail(Exception):
    """The command exited 75 (EX_TEMPFAIL): retried with backoff."""


class ExecFailed(PermanentError):
    """The command exited with a code other than 0 and 75, or was killed by a signal."""


class ExecOutputTooLarge(PermanentError):
    """The command wrote more than :data:`STDOUT_LIMIT` bytes to stdout."""


def _resolve(hcfg: HandlerConfig) -> str:
    """The executable ``command[0]`` names, or HandlerLoadError naming the handler."""
    where = f"handler {hcfg.name!r}"
    if not hcfg.command or not hcfg.command[0]:
        raise HandlerLoadError(f"{where}: command is empty")
    exe = hcfg.command[0]
    if os.sep in exe:
        if not os.path.isfile(exe):
            raise HandlerLoadError(f"{where}: command {exe!r} does not exist")
        if not os.access(exe, os.X_OK):
            raise HandlerLoadError(f"{where}: command {exe!r} is not executable")
        return exe
    found = shutil.which(exe)
    if found is None:
        raise HandlerLoadError(f"{where}: command {exe!r} not found on PATH")
    return found


class _Capture:
    """Bounded capture of one output stream: the head (stdout) or the tail (stderr)."""

    def __init__(self, limit: int, *, tail: bool) -> None:
        self.data = bytearray()
        self.limit = limit
        self.tail = tail
        self.overflowed = False

    async def drain(
        self, stream: anyio.abc.ByteReceiveStream, stop: anyio.CancelScope | None
    ) -> None:
        async for chunk in stream:
            self.data += chunk
            if len(self.data) <= self.limit:
                continue
            if self.tail:
                del self.data[: len(self.data) - self.limit]
            else:
                self.overflowed = True
                del self.data[self.limit :]
                if stop is not None:
                    stop.cancel()
                return

    def text(self) -> str:
        return self.data.decode("utf-8", errors="replace")


class _Stdout(_Capture):
    """stdout: the result, less the attempt's control lines, which are acted on.

    ``::bsv-progress {"done": 3, "total": 10, "note": "page 3"}`` reports progress
    (``item.progress``), ``::bsv-extend 600`` asks for more time (``item.extend``),
    ``::bsv-add-items [...]`` adds items to the batch (``item.add_items``, a
    JSON array of entries) and ``::bsv-cost 1234`` reports what the attempt
    actually cost its key's budget (``item.report_cost``): one per line, at the
    start of a line. They are not
    part of the result. A malformed one is logged and dropped."""

    def __init__(self, item: Item) -> None:
        super().__init__(STDOUT_LIMIT, tail=False)
        self._item = item
        self._line = bytearray()  # a line that may be a control line, so far
        self._at_start = True  # the next byte starts a line

    async def drain(
        self, stream: anyio.abc.ByteReceiveStream, stop: anyio.CancelScope | None
    ) -> None:
        async for chunk in stream:
            self._take(chunk)
            if len(self.data) > self.limit:
                self.overflowed = True
                del self.data[self.limit :]
                if stop is not None:
                    stop.cancel()
                return
        self.data += self._line  # a last line without its newline is output

    def _take(self, chunk: bytes) -> None:
        i, n = 0, len(chunk)
        while i < n:
            j = chunk.find(b"\n", i)
            stop = n if j < 0 else j + 1
            if self._line or (self._at_start and chunk[i] == CONTROL_PREFIX[0]):
                self._line += chunk[i:stop]
                k = min(len(self._line), len(CONTROL_PREFIX))
                if self._line[:k] != CONTROL_PREFIX[:k] or len(self._line) > CONTROL_LINE_MAX:
                    self.data += self._line  # ordinary output after all
                    self._line.clear()
                    self._at_start = j >= 0
                elif j >= 0:
                    self._control(bytes(self._line))
                    self._line.clear()
                    self._at_start = True
            else:
                self.data += chunk[i:stop]
                self._at_start = j >= 0
            i = stop

    def _control(self, line: bytes) -> None:
        text = line[len(CONTROL_PREFIX) :].decode("utf-8", errors="replace").strip()
        verb, _, arg = text.partition(" ")
        try:
            if verb == "progress":
                report = json.loads(arg)
                if not isinstance(report, dict):
                    raise TypeError("expected a JSON object")
                done: Any = report.get("done")  # checked by progress(), which names it
                self._item.progress(done, report.get("total"), report.get("note"))
            elif verb == "extend":
                self._item.extend(float(arg))
            elif verb == "add-items":
                entries = json.loads(arg)
                if not isinstance(entries, list):
                    raise TypeError("expected a JSON array of items")
                self._item.add_items(entries)
            elif verb == "cost":
                self._item.report_cost(float(arg))
            else:
                raise ValueError(
                    "unknown control line (expected ::bsv-progress, ::bsv-extend, "
                    "::bsv-add-items or ::bsv-cost)"
                )
        except (ValueError, TypeError, RuntimeError) as exc:
            log.warning(
                "exec.control_line_ignored handler=%s item=%s line=%r: %s",
                self._item.handler,
                self._item.id,
                line[:200],
                exc,
            )


async def _feed(stream: anyio.abc.ByteSendStream, data: bytes) -> None:
    try:
        await stream.send(data)
    except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
        pass  # the command exited or closed stdin without reading it all: its exit code decides
    finally:
        await stream.aclose()


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass  # the group is already gone: nothing left to stop


async def _kill_group(process: anyio.abc.Process) -> None:
    """SIGTERM the process group, SIGKILL it after a grace period, reap the leader.

    Runs shielded: the caller is usually being cancelled. The group is killed
    even when the leader has exited, because its children may still be running.
    """
    with anyio.CancelScope(shield=True):
        if process.returncode is None:
            _signal_group(process.pid, signal.SIGTERM)
            with anyio.move_on_after(KILL_GRACE_S):
                await process.wait()
        _signal_group(process.pid, signal.SIGKILL)
        with anyio.move_on_after(REAP_TIMEOUT_S) as scope:
            await process.wait()
        if scope.cancelled_caught:
            log.warning("exec.unreaped pid=%s (did not exit after SIGKILL)", process.pid)


def _kill_escaped(token: str, uid: int) -> int:
    """SIGKILL every process of account ``uid`` whose environment carries this
    attempt's token: what left the process group. Returns how many. Reads /proc
    (a few milliseconds; run in a worker thread)."""
    mark = f"\0BSV_ATTEMPT_TOKEN={token}\0".encode()
    me = os.getpid()
    killed = 0
    with os.scandir("/proc") as entries:
        for entry in entries:
            if not entry.name.isdigit() or int(entry.name) == me:
                continue
            try:
                if entry.stat().st_uid != uid:
                    continue
                with open(f"/proc/{entry.name}/environ", "rb") as f:
                    env = b"\0" + f.read()
            except OSError:
                continue  # gone meanwhile, or not ours to read
            if mark in env:
                try:
                    os.kill(int(entry.name), signal.SIGKILL)
                    killed += 1
                except (ProcessLookupError, PermissionError):
                    pass
    return killed


def _result(stdout: bytes) -> Any:
    text = stdout.decode("utf-8", errors="replace")
    if not text.strip():
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text.rstrip("\r\n")  # plain text output is a result too


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return str(signum)  # a real-time signal has no name


def _tail(stderr: str) -> str:
    stderr = stderr.strip()
    if not stderr:
        return "(no output on stderr)"
    return stderr if len(stderr) <= MESSAGE_TAIL else "…" + stderr[-MESSAGE_TAIL:]


def _home(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_dir
    except KeyError:
        return "/"


def run_account(hcfg: HandlerConfig, executable: str) -> pwd.struct_passwd | None:
    """The account ``hcfg``'s command runs as, or None for the daemon's own.
    HandlerLoadError (naming the field) when it cannot be used."""
    field = f"handlers.{hcfg.name}.user"
    me = os.geteuid()
    if not hcfg.user:
        if me != 0:
            return None
        acct = embedded.ensure_server_account(RUN_ACCOUNT)
        entry = pwd.getpwuid(acct.uid)
    else:
        try:
            entry = pwd.getpwnam(hcfg.user)
        except KeyError:
            raise HandlerLoadError(f"{field}: no account named {hcfg.user!r}") from None
        if entry.pw_uid == me:
            return None
        if me != 0:
            raise HandlerLoadError(
                f"{field}: {hcfg.user!r} is not this daemon's account, and only a daemon "
                "started as root can run commands as another one"
            )
    blocked = embedded.blocked_for(entry.pw_uid, entry.pw_gid, executable, os.X_OK)
    if blocked is not None:
        raise HandlerLoadError(
            f"handlers.{hcfg.name}.command: account {entry.pw_name} cannot execute "
            f"{executable} ({blocked} is not accessible to it); move the command, or set "
            f'{field} to an account that can ("root" to run it as root)'
        )
    return entry


class ExecHandler:
    def __init__(self, hcfg: HandlerConfig) -> None:
        self.config = hcfg
        self._argv = list(hcfg.command)
        account = run_account(hcfg, _resolve(hcfg))
        self._as: dict[str, Any] = {}  # open_process's account switch, if any
        self._account: tuple[int, int] | None = None  # (uid, gid) to switch to, if any
        if account is None:
            self._uid = os.geteuid()
            self._home = _home(self._uid)
        else:
            self._uid, self._home = account.pw_uid, account.pw_dir
            self._account = (account.pw_uid, account.pw_gid)
            self._as = {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}
            log.info("exec.run_as handler=%s account=%s", hcfg.name, account.pw_name)
        self._cgroups = cgroups.detect()
        if self._cgroups is not None and account is not None and self._cgroups.setpriv is None:
            log.warning(
                "exec.no_cgroup handler=%s (setpriv, from util-linux, is needed to join a "
                "cgroup and then switch accounts; descendants are stopped by process "
                "group and attempt token)",
                hcfg.name,
            )
            self._cgroups = None

    def _env(self, item: Item, token: str) -> dict[str, str]:
        """A minimal environment, never the daemon's own (it may hold cloud keys,
        the database URL with its password, tokens): PATH, LANG, TZ, HOME of the
        run account, what the handler's ``pass_env`` names, its ``env``, and the
        ``BSV_*`` variables of the attempt (BSV_ATTEMPT_TOKEN finds what it leaves)."""
        base = {
            "PATH": os.environ.get("PATH") or os.defpath,
            "LANG": os.environ.get("LANG", "C.UTF-8"),
            "HOME": self._home,
        }
        if "TZ" in os.environ:
            base["TZ"] = os.environ["TZ"]
        passed = {k: os.environ[k] for k in self.config.pass_env if k in os.environ}
        env = {
            **base,
            **passed,
            **self.config.env,
            "BSV_ITEM_ID": item.id,
            "BSV_BATCH_ID": item.batch_id,
            "BSV_ATTEMPT": str(item.attempt),
            "BSV_MAX_ATTEMPTS": str(item.max_attempts),
            "BSV_ITEM_KEY": item.key or "",
            "BSV_HANDLER": item.handler,
            "BSV_ATTEMPT_TOKEN": token,
        }
        if item.trace is not None:
            # Tracing on: the attempt's span, in OpenTelemetry's environment carrier
            # (the variables its SDKs read as a process's parent context).
            env["TRACEPARENT"] = item.trace.traceparent
            if item.trace.tracestate:
                env["TRACESTATE"] = item.trace.tracestate
        return env

    async def run(self, item: Item) -> Any:
        stdin = json.dumps(item.payload, separators=(",", ":")).encode()
        token = secrets.token_hex(16)
        env = self._env(item, token)
        cg = self._cgroups.create(token) if self._cgroups is not None else None
        argv, switch = self._argv, self._as
        if cg is not None:
            argv = cg.wrap(self._argv, self._account, env)
            switch = {}  # setpriv switches, after the command joined its cgroup
        try:
            process = await anyio.open_process(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
                start_new_session=True,  # its own process group, killed as a whole
                **switch,
            )
        except BaseException:
            if cg is not None:
                cg.discard()
            raise
        out = _Stdout(item)
        err = _Capture(STDERR_TAIL, tail=True)
        try:
            assert process.stdin and process.stdout and process.stderr
            async with anyio.create_task_group() as tg:
                tg.start_soon(_feed, process.stdin, stdin)
                tg.start_soon(out.drain, process.stdout, tg.cancel_scope)
                tg.start_soon(err.drain, process.stderr, None)
            if out.overflowed:
                raise ExecOutputTooLarge(
                    f"{self._argv[0]} wrote more than {STDOUT_LIMIT} bytes to stdout"
                )
            code = await process.wait()
            # Whatever the exit status, nothing the attempt started outlives it: a
            # background child left in the group (`cmd &`) goes with the leader.
            _signal_group(process.pid, signal.SIGKILL)
        except BaseException:
            await _kill_group(process)  # cancelled or failed: leave no process behind
            raise
        finally:
            with anyio.CancelScope(shield=True):
                await process.aclose()
                if cg is not None:
                    escaped = await anyio.to_thread.run_sync(cg.end, process.pid)
                else:
                    escaped = await anyio.to_thread.run_sync(_kill_escaped, token, self._uid)
            if escaped:
                log.warning(
                    "exec.escaped_killed handler=%s item=%s processes=%s (left the process "
                    "group; killed with the attempt)",
                    self.config.name,
                    item.id,
                    escaped,
                )
        if code == 0:
            return _result(bytes(out.data))
        if code == EX_TEMPFAIL:
            raise ExecTempFail(f"exit code {code} (EX_TEMPFAIL): {_tail(err.text())}")
        if code < 0:
            raise ExecFailed(f"killed by signal {_signal_name(-code)}: {_tail(err.text())}")
        raise ExecFailed(f"exit code {code}: {_tail(err.text())}")

    async def aclose(self) -> None:
        return None  # every process is reaped by the attempt that started it
