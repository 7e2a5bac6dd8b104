"""Real daemons for system tests: each is a ``batch-supervisor run`` subprocess
with its own config file, talking to the suite's PostgreSQL, plus a tiny HTTP
client and condition waits with deadlines (no sleep-and-hope)."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

from tests.pgharness import free_port

ROOT = pathlib.Path(__file__).resolve().parent.parent
T = TypeVar("T")


def wait_for(
    predicate: Callable[[], T | None],
    timeout: float = 10.0,
    interval: float = 0.02,
    what: str = "condition",
) -> T:
    """Poll ``predicate`` until it returns something truthy, or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while True:
        last = predicate()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")
        time.sleep(interval)


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(v)


def trusted_as_root(h: Mapping[str, Any]) -> Mapping[str, Any]:
    """The suite's python handlers are its own code. A daemon started as root (CI
    runs as root) refuses an operator's python handler unless its ``user`` says
    "root", so the suite says so, as an operator would; ``"user": ""`` keeps the
    default for the tests of that refusal."""
    if os.geteuid() == 0 and h.get("type") == "python" and "user" not in h:
        return {**h, "user": "root"}
    return h


def render_toml(cfg: Mapping[str, Any]) -> str:
    lines: list[str] = []
    for section, body in cfg.items():
        if section == "handlers":
            for name, h in body.items():
                h = trusted_as_root(h)
                lines.append(f"[handlers.{name}]")
                lines += [f"{k} = {toml_value(v)}" for k, v in h.items()]
        elif section == "schedules":
            for name, sc in body.items():
                lines.append(f"[schedules.{name}]")
                lines += [f"{k} = {toml_value(v)}" for k, v in sc.items()]
        elif section == "auth":
            for t in body.get("tokens", []):
                lines.append("[[auth.tokens]]")
                lines += [f"{k} = {toml_value(v)}" for k, v in t.items()]
        else:
            lines.append(f"[{section}]")
            lines += [f"{k} = {toml_value(v)}" for k, v in body.items()]
    return "\n".join(lines) + "\n"


DEFAULT_HANDLERS: dict[str, dict[str, Any]] = {
    "echo": {"type": "python", "target": "tests.handlers:echo", "timeout": "30s"},
    "fails": {
        "type": "python",
        "target": "tests.handlers:always_fails",
        "timeout": "5s",
        "max_attempts": 3,
        "retry_backoff": {"initial": "10ms", "max": "50ms", "multiplier": 2.0, "jitter": 0.0},
    },
    "permanent": {"type": "python", "target": "tests.handlers:permanent", "timeout": "5s"},
    "slow_first": {"type": "python", "target": "tests.handlers:slow_first", "timeout": "1h"},
    "sleeper": {"type": "python", "target": "tests.handlers:sleeper", "timeout": "1h"},
    "cb_raises": {
        "type": "python",
        "target": "tests.handlers:callback_raises",
        "timeout": "5s",
        "max_attempts": 2,
        "retry_backoff": {"initial": "10ms", "max": "10ms", "jitter": 0.0},
    },
    "cb_records": {"type": "python", "target": "tests.handlers:callback_records", "timeout": "5s"},
}


class Daemon:
    """One ``batch-supervisor run`` process."""

    def __init__(
        self,
        tmp: pathlib.Path,
        db_url: str,
        *,
        name: str = "d1",
        handlers: Mapping[str, Any] | None = None,
        worker: Mapping[str, Any] | None = None,
        extra: Mapping[str, Any] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.name = name
        self.port = free_port()
        self.dir = tmp / f"daemon-{name}"
        self.dir.mkdir(parents=True, exist_ok=True)
        # worker={"name": None} leaves the name out: the daemon picks its default.
        cfg: dict[str, Any] = {
            "server": {"host": "127.0.0.1", "port": self.port},
            "worker": {
                "name": name,
                "concurrency": 16,
                "poll_interval": "200ms",
                "heartbeat_interval": "500ms",
                "dead_after": "3s",
                "drain_timeout": "10s",
            }
            | dict(worker or {}),
            "logging": {"level": "info"},
            "handlers": dict(handlers if handlers is not None else DEFAULT_HANDLERS),
        }
        cfg["worker"] = {k: v for k, v in cfg["worker"].items() if v is not None}
        for k, v in (extra or {}).items():
            cfg[k] = cfg.get(k, {}) | v if isinstance(v, dict) and k != "handlers" else v
        self.config_path = self.dir / "config.toml"
        self.config_path.write_text(render_toml(cfg))
        self.log_path = self.dir / "daemon.log"
        self.env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "BATCH_SUPERVISOR_DATABASE_URL": db_url,
            **(env or {}),
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = f"http://127.0.0.1:{self.port}"

    def command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "supervisor", *args, "--config", str(self.config_path)]

    def start(self, wait: bool = True) -> Daemon:
        log = open(self.log_path, "ab")  # handed to the child process
        self.proc = subprocess.Popen(
            self.command("run"), cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(
                    f"daemon {self.name} exited {self.proc.returncode}:\n" + self.log()
                )
            try:
                return request("GET", self.url + "/readyz")[0] == 200
            except OSError:
                return False

        wait_for(ready, timeout, 0.05, f"daemon {self.name} ready")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def wait_exit(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM and wait; SIGKILL if it does not exit in time."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise AssertionError(
                f"daemon {self.name} ignored SIGTERM for {timeout}s:\n" + self.log()
            ) from None

    # -- API shortcuts

    def api(
        self, method: str, path: str, body: Any = None, headers: Mapping[str, str] | None = None
    ) -> tuple[int, Any, dict[str, str]]:
        return request(method, self.url + path, body, headers)

    def submit(self, handler: str, items: list[Any], **fields: Any) -> dict[str, Any]:
        status, body, _ = self.api(
            "POST", "/v1/batches", {"handler": handler, "items": items, **fields}
        )
        assert status == 201, (status, body)
        return dict(body)

    def batch(self, batch_id: str) -> dict[str, Any]:
        status, body, _ = self.api("GET", f"/v1/batches/{batch_id}")
        assert status == 200, (status, body)
        return dict(body)

    def items(self, batch_id: str, status: str | None = None) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        cursor = None
        while True:
            q = "?limit=500" + (f"&status={status}" if status else "")
            q += f"&cursor={cursor}" if cursor else ""
            code, body, _ = self.api("GET", f"/v1/batches/{batch_id}/items{q}")
            assert code == 200, (code, body)
            out += body["items"]
            cursor = body["next_cursor"]
            if not cursor:
                return out

    def wait_status(
        self, batch_id: str, statuses: str | tuple[str, ...], timeout: float = 20.0
    ) -> dict[str, Any]:
        wanted = (statuses,) if isinstance(statuses, str) else statuses

        def reached() -> dict[str, Any] | None:
            b = self.batch(batch_id)
            return b if b["status"] in wanted else None

        return wait_for(
            reached,
            timeout,
            0.05,
            f"batch {batch_id} in {wanted}",
        )

    def cli(
        self, *args: str, input: str | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        env = {**self.env, "BATCH_SUPERVISOR_URL": self.url}
        return subprocess.run(
            [sys.executable, "-m", "supervisor", *args],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            input=input,
            timeout=timeout,
            check=False,
        )


def request(
    method: str,
    url: str,
    body: Any = None,
    headers: Mapping[str, str] | None = None,
    timeout: float = 30.0,
) -> tuple[int, Any, dict[str, str]]:
    data = None
    hdrs = dict(headers or {})
    if body is not None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        hdrs.setdefault("Content-Type", "application/json")
    elif method not in ("GET", "HEAD"):
        hdrs.setdefault("Content-Type", "application/json")  # the API's CSRF guard
    req = urllib.request.Request(url, data=data, method=method, headers=hdrs)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
            status, rh = resp.status, dict(resp.headers)
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        status, rh = exc.code, dict(exc.headers)
    try:
        parsed = json.loads(raw) if raw else None
    except ValueError:
        parsed = raw.decode(errors="replace")
    return status, parsed, rh


def sse_events(
    url: str, headers: Mapping[str, str] | None = None, timeout: float = 30.0
) -> Iterator[tuple[str, Any, str | None]]:
    """(event, data, id) of each event of an SSE stream, until the server closes it
    (or the caller stops iterating)."""
    req = urllib.request.Request(url, headers=dict(headers or {}))
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        assert resp.headers["Content-Type"].startswith("text/event-stream"), resp.headers
        event, data, eid = "", "", None
        for raw in resp:
            line = raw.decode().rstrip("\n")
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                data = line[5:].strip()
            elif line.startswith("id:"):
                eid = line[3:].strip()
            elif not line and event:
                yield event, json.loads(data), eid
                event, eid = "", None


def check_invariants(b: Mapping[str, Any]) -> None:
    """The batch invariants as seen through the API."""
    c = b["counts"]
    assert (
        c["total"] == c["queued"] + c["running"] + c["succeeded"] + c["failed"] + c["cancelled"]
    ), b
    terminal = b["status"] in ("completed", "completed_with_errors", "failed", "cancelled")
    assert terminal == (c["queued"] + c["running"] == 0), b
