"""Shared machinery: the durable benchmark PostgreSQL, daemon subprocesses with
generated configs, an HTTP client, process probes (/proc) and statistics."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import json
import os
import pathlib
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from typing import Any

import aiohttp
import asyncpg

from supervisor import embedded
from tests.daemon import trusted_as_root

ROOT = pathlib.Path(__file__).resolve().parent.parent

# Durable on purpose: fsync and synchronous_commit stay on (the embedded default);
# only sizes are raised so that a million-row table and the peers' pools fit.
PG_SETTINGS: dict[str, str] = {
    "synchronous_commit": "on",
    "max_connections": "200",
    "shared_buffers": "512MB",
    "max_wal_size": "4GB",
}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def make_base_dir(prefix: str = "bsv-bench-") -> pathlib.Path:
    """A fresh 0755 temp dir: as root, the server account must traverse it."""
    base = pathlib.Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    os.chmod(base, 0o755)
    return base


def with_database(dsn: str, database: str) -> str:
    parts = urllib.parse.urlsplit(dsn)
    return urllib.parse.urlunsplit(parts._replace(path=f"/{database}"))


class BenchServer:
    """One embedded PostgreSQL with fsync on, reached over its unix socket like the
    embedded default, or over TCP on 127.0.0.1 (``tcp``; every peer uses the same
    DSN); a database per scenario."""

    def __init__(self, tcp: bool = False) -> None:
        self.base_dir = make_base_dir()
        self.server = embedded.EmbeddedPostgres(
            self.base_dir / "data",
            port=free_port(),
            listen_tcp=tcp,
            fsync=True,
            server_settings=PG_SETTINGS,
            auth="trust",  # a throwaway server: databases are created as superuser
        )
        self._n = 0

    def start(self) -> None:
        self.server.start()

    def close(self) -> None:
        try:
            self.server.stop("fast")
        finally:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    async def version(self) -> str:
        conn = await asyncpg.connect(self.server.dsn)
        try:
            v: str = await conn.fetchval("SHOW server_version")
            fs = await conn.fetchval("SHOW fsync")
            sc = await conn.fetchval("SHOW synchronous_commit")
            return f"PostgreSQL {v} (fsync={fs}, synchronous_commit={sc})"
        finally:
            await conn.close()

    async def new_database(self, label: str) -> str:
        """A fresh empty database; returns its DSN."""
        self._n += 1
        name = f"bench_{label}_{self._n}"
        conn = await asyncpg.connect(self.server.dsn)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        return with_database(self.server.dsn, name)

    async def drop_database(self, dsn: str) -> None:
        name = urllib.parse.urlsplit(dsn).path.lstrip("/")
        conn = await asyncpg.connect(self.server.dsn)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            await conn.execute("CHECKPOINT")
        finally:
            await conn.close()

    async def wal_bytes(self) -> int:
        """The server's WAL position in bytes: the difference over a run is the WAL
        it wrote (every database's; a benchmark runs one at a time)."""
        conn = await asyncpg.connect(self.server.dsn)
        try:
            return int(await conn.fetchval("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn"))
        finally:
            await conn.close()

    def postgres_cpu_s(self) -> float:
        """User+system CPU seconds of every server process so far (live ones)."""
        total = 0.0
        target = self.server.data_dir.resolve()
        for entry in pathlib.Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if pathlib.Path(os.readlink(entry / "cwd")) != target:
                    continue
                total += cpu_seconds(int(entry.name))
            except OSError:
                continue  # the process ended or is not ours to read
        return total


# --------------------------------------------------------------------------- daemon

BENCH_HANDLERS: dict[str, dict[str, Any]] = {
    "noop": {"type": "python", "target": "supervisor.examples:noop", "timeout": "30s"},
    "stamp": {"type": "python", "target": "bench.handlers:stamp", "timeout": "30s"},
    "hold": {"type": "python", "target": "bench.handlers:hold", "timeout": "2h"},
}
# Only where a scenario asks for it (``handlers=``): every configured handler is
# one more claim round trip per poll for the others' daemons.
SLEEP_HANDLER: dict[str, dict[str, Any]] = {
    "sleep": {"type": "python", "target": "bench.handlers:sleep", "timeout": "30s"},
}


def _toml(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, dict):  # an inline table (a handler's key_limit)
        return "{" + ", ".join(f"{k} = {_toml(x)}" for k, x in v.items()) + "}"
    return json.dumps(v)


def render_config(sections: Mapping[str, Mapping[str, Any]]) -> str:
    lines: list[str] = []
    for section, body in sections.items():
        if section == "handlers":
            for name, h in body.items():
                h = trusted_as_root(h)  # the benchmark's own code; a root daemon asks
                lines.append(f"[handlers.{name}]")
                lines += [f"{k} = {_toml(v)}" for k, v in h.items()]
        else:
            lines.append(f"[{section}]")
            lines += [f"{k} = {_toml(v)}" for k, v in body.items()]
    return "\n".join(lines) + "\n"


class Daemon:
    """One ``batch-supervisor run`` subprocess with a generated config.toml."""

    def __init__(
        self,
        work_dir: pathlib.Path,
        dsn: str,
        *,
        name: str,
        worker: Mapping[str, Any] | None = None,
        server: Mapping[str, Any] | None = None,
        handlers: Mapping[str, dict[str, Any]] | None = None,
        database: Mapping[str, Any] | None = None,
    ) -> None:
        self.port = free_port()
        self.dir = work_dir / f"daemon-{name}"
        self.dir.mkdir(parents=True, exist_ok=True)
        cfg: dict[str, Mapping[str, Any]] = {
            "server": {"host": "127.0.0.1", "port": self.port} | dict(server or {}),
            "worker": {"name": name, "concurrency": 64, "drain_timeout": "5s"} | dict(worker or {}),
            "logging": {"level": "info"},
            **({"database": dict(database)} if database else {}),
            "handlers": dict(handlers) if handlers is not None else BENCH_HANDLERS,
        }
        self.config_path = self.dir / "config.toml"
        self.config_path.write_text(render_config(cfg))
        self.log_path = self.dir / "daemon.log"
        self.env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "BATCH_SUPERVISOR_DATABASE_URL": dsn,
        }
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def start(self, session: aiohttp.ClientSession, limit_s: float = 60.0) -> None:
        with open(self.log_path, "ab") as log:  # noqa: ASYNC230 - a local file, once
            self.proc = subprocess.Popen(  # noqa: ASYNC220 - the daemon outlives this call
                [sys.executable, "-m", "supervisor", "run", "--config", str(self.config_path)],
                cwd=ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + limit_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"daemon exited {self.proc.returncode}:\n{self.log_path.read_text()[-3000:]}"
                )
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with session.get(self.url + "/readyz") as r:
                    if r.status == 200:
                        return
            if time.monotonic() > deadline:
                raise RuntimeError(f"daemon not ready after {limit_s}s")
            await asyncio.sleep(0.05)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    # -- HTTP

    async def post_batch(
        self, session: aiohttp.ClientSession, body: bytes
    ) -> tuple[dict[str, Any], float, float]:
        """POST a pre-encoded batch; returns (batch, wall time sent, seconds to 201)."""
        sent = time.time()
        t0 = time.perf_counter()
        async with session.post(
            self.url + "/v1/batches", data=body, headers={"Content-Type": "application/json"}
        ) as r:
            payload = await r.json()
            elapsed = time.perf_counter() - t0
            if r.status != 201:
                raise RuntimeError(f"POST /v1/batches -> {r.status}: {str(payload)[:500]}")
        return dict(payload), sent, elapsed

    async def get_batch(self, session: aiohttp.ClientSession, batch_id: str) -> dict[str, Any]:
        async with session.get(f"{self.url}/v1/batches/{batch_id}") as r:
            if r.status != 200:
                raise RuntimeError(f"GET batch -> {r.status}")
            return dict(await r.json())

    async def wait_terminal(
        self,
        session: aiohttp.ClientSession,
        batch_id: str,
        limit_s: float,
        interval: float = 0.05,
    ) -> dict[str, Any]:
        deadline = time.monotonic() + limit_s
        while True:
            b = await self.get_batch(session, batch_id)
            if b["status"] in ("completed", "completed_with_errors", "failed", "cancelled"):
                return b
            if time.monotonic() > deadline:
                raise RuntimeError(f"batch {batch_id} not terminal after {limit_s}s: {b}")
            await asyncio.sleep(interval)


@contextlib.asynccontextmanager
async def running_daemon(
    work_dir: pathlib.Path, dsn: str, name: str, **kw: Any
) -> AsyncIterator[tuple[Daemon, aiohttp.ClientSession]]:
    d = Daemon(work_dir, dsn, name=name, **kw)
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        try:
            await d.start(session)
            yield d, session
        finally:
            d.stop()


@contextlib.asynccontextmanager
async def py_spy(pid: int, path: str | None) -> AsyncIterator[None]:
    """Record ``pid`` with py-spy (raw collapsed stacks in ``path``) for the body's
    duration; nothing when ``path`` is None."""
    if path is None:
        yield
        return
    spy = subprocess.Popen(  # noqa: ASYNC220 - runs beside the measured work
        [
            *("py-spy", "record", "--pid", str(pid), "--rate", "1000"),
            *("--format", "raw", "-o", path, "--nonblocking"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    await asyncio.sleep(1.0)  # py-spy attaches
    try:
        yield
    finally:
        spy.send_signal(signal.SIGINT)  # py-spy writes its output and exits
        spy.wait(60)


def batch_body(handler: str, n: int, payload: Any = None) -> bytes:
    """A POST /v1/batches body of ``n`` items (payload: the index when None)."""
    items = list(range(n)) if payload is None else [payload] * n
    return json.dumps({"handler": handler, "items": items}).encode()


def parse_ts(text: str) -> float:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


# --------------------------------------------------------------------------- /proc


def cpu_seconds(pid: int) -> float:
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def proc_status_kb(pid: int, key: str) -> int:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


# --------------------------------------------------------------------------- stats


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100)."""
    s = sorted(values)
    if not s:
        return float("nan")
    k = max(0, min(len(s) - 1, round(p / 100 * len(s) + 0.5) - 1))
    return s[k]


@dataclasses.dataclass
class Metric:
    """One reported number, collected over runs."""

    name: str
    unit: str
    values: list[float] = dataclasses.field(default_factory=list)
    higher_is_better: bool = True

    @property
    def median(self) -> float:
        return statistics.median(self.values) if self.values else float("nan")


class Results:
    """Metrics by key, in the order first reported."""

    def __init__(self) -> None:
        self.metrics: dict[str, Metric] = {}
        self.notes: list[str] = []

    def add(self, key: str, name: str, unit: str, value: float, higher: bool = True) -> None:
        m = self.metrics.setdefault(key, Metric(name, unit, higher_is_better=higher))
        m.values.append(value)

    def cpu_per_1k(
        self, key: str, who: str, label: str, cpu_s: float, items: int, note: str = ""
    ) -> None:
        """``key.cpu_<who>``: CPU milliseconds ``label`` spent per 1,000 items."""
        self.add(
            f"{key}.cpu_{who}",
            f"{key}: {label} CPU per 1k items{note}",
            "ms",
            1000 * cpu_s / items * 1000,
            higher=False,
        )

    def wal_per_1k(self, key: str, wal_bytes: int, items: int) -> None:
        """``key.wal``: kilobytes of WAL PostgreSQL wrote per 1,000 items."""
        self.add(f"{key}.wal", f"{key}: WAL per 1k items", "KB", wal_bytes / items, higher=False)

    def median(self, key: str) -> float | None:
        m = self.metrics.get(key)
        return m.median if m and m.values else None


@contextlib.contextmanager
def timer() -> Iterator[list[float]]:
    out: list[float] = []
    t0 = time.perf_counter()
    try:
        yield out
    finally:
        out.append(time.perf_counter() - t0)
