"""Configuration: frozen dataclasses per TOML section, loaded and validated once.

Every unknown key, wrong type or bad duration is collected with its dotted path
(and a "did you mean" for near-misses) and reported together; the CLI exits 78
(EX_CONFIG) before anything starts. Durations are parsed here, once, into
seconds (fields named ``*_s``).
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import os
import re
import socket
import ssl
import tomllib
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from supervisor.errors import ConfigError

ENV_CONFIG = "BATCH_SUPERVISOR_CONFIG"
ENV_DATABASE_URL = "BATCH_SUPERVISOR_DATABASE_URL"
DEFAULT_CONFIG = "config.toml"

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(s|m|h)\s*$")
_SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,40}$")
HANDLER_TYPES = ("python", "http", "exec")
SCOPES = ("read", "write", "admin")


def parse_duration(value: object) -> float:
    """'500ms', '30s', '5m', '2h', '30d' (or a bare number of seconds) -> seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration like '500ms', '30s' or '5m'")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("must not be negative")
        return float(value)
    if isinstance(value, str):
        m = _DURATION.match(value)
        if m:
            return float(m.group(1)) * _UNITS[m.group(2)]
    raise ValueError(f"{value!r} is not a duration like '500ms', '30s', '5m', '2h' or '30d'")


def parse_rate(value: str) -> float:
    """'10/s', '600/m', '100/h' -> starts per second."""
    m = _RATE.match(value)
    if not m:
        raise ValueError(f"{value!r} is not a rate like '10/s' or '600/m'")
    per = {"s": 1.0, "m": 60.0, "h": 3600.0}[m.group(2)]
    rate = float(m.group(1)) / per
    if rate <= 0:
        raise ValueError("must be positive")
    return rate


@dataclasses.dataclass(frozen=True)
class DatabaseConfig:
    url: str = ""
    listen_url: str = ""
    schema: str = "supervisor"
    pool_min: int = 2
    pool_max: int = 10
    # The API's own pool (requests and SSE streams): API load never takes the
    # connections the claim loop, outbox and heartbeats need.
    api_pool_max: int = 5
    statement_cache_size: int = 100


@dataclasses.dataclass(frozen=True)
class EmbeddedConfig:
    data_dir: str = ".data/postgres"
    port: int = 54329
    bin_dir: str = ""


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    max_body_bytes: int = 64 * 1024 * 1024
    max_items_per_batch: int = 100_000
    metrics_sample_interval_s: float = 5.0  # queue depth/lag gauges are read this often
    # Browser origins besides the dashboard's own that may send requests (CSRF guard).
    allowed_origins: tuple[str, ...] = ()
    # Host header values accepted besides the served address (DNS-rebinding guard).
    allowed_hosts: tuple[str, ...] = ()
    tls_cert: str = ""  # PEM certificate chain; with tls_key the API speaks HTTPS only
    tls_key: str = ""
    # Tokens over plain HTTP on a non-loopback address (a TLS-terminating proxy in front)
    allow_plain_http: bool = False
    metrics_auth: bool = False  # /metrics needs a read token (when tokens are configured)
    max_streams: int = 256  # SSE streams open at once on this daemon (429 beyond)
    max_streams_per_token: int = 32
    # Open client connections at once (beyond: answered 503 and closed), lowered at
    # start to fit the open-file limit (see api.server.connection_cap).
    max_connections: int = 1000
    # How long a client has to send a request's head (a new or idle keep-alive
    # connection) and, separately, its body: slow senders must not hold sockets.
    read_timeout_s: float = 30.0


def tls_context(server: ServerConfig) -> ssl.SSLContext:
    """The API's server-side TLS context (TLS 1.2 or newer)."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(server.tls_cert, server.tls_key)
    return ctx


def default_worker_name(port: int) -> str:
    """``<host>:<API port>``: unique per daemon on a host (two cannot serve one port)
    and stable across restarts, so a restart reclaims its predecessor's items at
    once. Without a fixed port, ``<host>:pid<pid>``."""
    host = socket.gethostname()
    return f"{host}:{port}" if port else f"{host}:pid{os.getpid()}"


@dataclasses.dataclass(frozen=True)
class WorkerConfig:
    name: str = dataclasses.field(default_factory=lambda: default_worker_name(0))
    concurrency: int = 64
    # claimed items that may wait for a worker; None = "auto" (see Dispatcher.window)
    prefetch: int | None = None
    claim_batch_size: int = 500
    poll_interval_s: float = 1.0
    heartbeat_interval_s: float = 5.0
    dead_after_s: float = 30.0
    drain_timeout_s: float = 30.0


@dataclasses.dataclass(frozen=True)
class LoggingConfig:
    level: str = "info"
    format: str = "text"


@dataclasses.dataclass(frozen=True)
class RetentionConfig:
    finished_after_s: float = 30 * 86400.0
    interval_s: float = 3600.0


@dataclasses.dataclass(frozen=True)
class TokenConfig:
    name: str
    tenant: str
    sha256: str
    scopes: tuple[str, ...]
    # Handlers this token may submit to or name as on_complete; None = every handler.
    handlers: tuple[str, ...] | None = None


@dataclasses.dataclass(frozen=True)
class BackoffConfig:
    initial_s: float = 1.0
    max_s: float = 300.0
    multiplier: float = 2.0
    jitter: float = 0.1

    def delay(self, attempt: int, rand: float) -> float:
        """Delay before the attempt after ``attempt`` (1-based); ``rand`` in [0, 1)."""
        base = min(self.max_s, self.initial_s * self.multiplier ** max(0, attempt - 1))
        return max(0.0, base * (1 + self.jitter * (2 * rand - 1)))


@dataclasses.dataclass(frozen=True)
class HandlerConfig:
    name: str
    type: str
    target: str = ""
    url: str = ""
    command: tuple[str, ...] = ()
    timeout_s: float = 300.0
    max_attempts: int = 3
    retry_backoff: BackoffConfig = dataclasses.field(default_factory=BackoffConfig)
    concurrency: int | None = None
    global_concurrency: int | None = None
    rate_limit: str | None = None
    rate_per_s: float | None = None
    on_complete: str | None = None
    headers: Mapping[str, str] = dataclasses.field(default_factory=dict)
    signing_secret: str | None = None
    # exec: the child's environment beyond the minimal one (PATH, LANG, TZ, HOME)
    env: Mapping[str, str] = dataclasses.field(default_factory=dict)
    pass_env: tuple[str, ...] = ()  # names copied from the daemon's environment
    # exec: the account the command runs as ("": the daemon's own, or
    # batch-supervisor-run when the daemon is root; "root" must be said explicitly).
    # python: runs in the daemon, so only the daemon's own account; a daemon started
    # as root refuses a handler of the operator's own unless "root" is said explicitly.
    user: str = ""


@dataclasses.dataclass(frozen=True)
class Config:
    database: DatabaseConfig = dataclasses.field(default_factory=DatabaseConfig)
    embedded: EmbeddedConfig = dataclasses.field(default_factory=EmbeddedConfig)
    server: ServerConfig = dataclasses.field(default_factory=ServerConfig)
    worker: WorkerConfig = dataclasses.field(default_factory=WorkerConfig)
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)
    retention: RetentionConfig = dataclasses.field(default_factory=RetentionConfig)
    tokens: tuple[TokenConfig, ...] = ()
    handlers: Mapping[str, HandlerConfig] = dataclasses.field(default_factory=dict)
    path: str = ""

    @property
    def database_url(self) -> str:
        """The configured URL; empty means the embedded default."""
        return os.environ.get(ENV_DATABASE_URL) or self.database.url

    @property
    def embedded_data_dir(self) -> Path:
        d = Path(self.embedded.data_dir)
        if not d.is_absolute() and self.path:
            d = Path(self.path).resolve().parent / d
        return d


class _Checker:
    """Collects problems with their dotted paths while reading one TOML tree."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def unknown(self, path: str, table: Mapping[str, Any], known: list[str]) -> None:
        for key in table:
            if key not in known:
                hint = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
                more = f" (did you mean {hint[0]!r}?)" if hint else ""
                self.problems.append(f"{path}.{key}: unknown key{more}".lstrip("."))

    def get(
        self,
        table: Mapping[str, Any],
        path: str,
        key: str,
        kind: type | tuple[type, ...],
        default: Any,
    ) -> Any:
        if key not in table:
            return default
        value = table[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
        if not ok:
            names = " or ".join(k.__name__ for k in kinds)
            self.problems.append(
                f"{path}.{key}: expected {names}, got {type(value).__name__} {value!r}"
            )
            return default
        return value

    def duration(
        self, table: Mapping[str, Any], path: str, key: str, default: float, positive: bool = True
    ) -> float:
        if key not in table:
            return default
        try:
            seconds = parse_duration(table[key])
        except ValueError as exc:
            self.problems.append(f"{path}.{key}: {exc}")
            return default
        if positive and seconds <= 0:
            self.problems.append(f"{path}.{key}: must be greater than zero")
            return default
        return seconds

    def positive_int(
        self, table: Mapping[str, Any], path: str, key: str, default: int | None, minimum: int = 1
    ) -> int | None:
        value = self.get(table, path, key, int, default)
        if value is not None and key in table and isinstance(value, int) and value < minimum:
            self.problems.append(f"{path}.{key}: must be at least {minimum}, got {value}")
            return default
        return value  # type: ignore[no-any-return]

    def section(self, root: Mapping[str, Any], key: str) -> Mapping[str, Any]:
        value = root.get(key, {})
        if not isinstance(value, dict):
            self.problems.append(f"{key}: expected a table, got {type(value).__name__}")
            return {}
        return value


def _prefetch(ck: _Checker, t: Mapping[str, Any]) -> int | None:
    """``[worker] prefetch``: an integer >= 0 (fixed) or "auto" (the default, None)."""
    value = t.get("prefetch", "auto")
    if value == "auto":
        return None
    if isinstance(value, str):
        ck.problems.append(f'worker.prefetch: expected an integer or "auto", got {value!r}')
        return None
    return ck.positive_int(t, "worker", "prefetch", None, minimum=0)


def _fields(cls: type) -> list[str]:
    return [f.name.removesuffix("_s") for f in dataclasses.fields(cls)]


def from_mapping(raw: Mapping[str, Any], path: str = "") -> Config:
    """Build and validate a Config from parsed TOML; raises ConfigError listing every problem."""
    ck = _Checker()
    top = ["database", "embedded", "server", "worker", "logging", "retention", "auth", "handlers"]
    ck.unknown("", raw, top)

    t = ck.section(raw, "database")
    ck.unknown("database", t, _fields(DatabaseConfig))
    schema = ck.get(t, "database", "schema", str, "supervisor")
    if not _SCHEMA_NAME.match(schema):
        ck.problems.append(
            f"database.schema: {schema!r} must be a lower-case identifier (letters, digits, _)"
        )
    url = ck.get(t, "database", "url", str, "")
    listen_url = ck.get(t, "database", "listen_url", str, "")
    for where, value in (
        ("database.url", url),
        ("database.listen_url", listen_url),
        (ENV_DATABASE_URL, os.environ.get(ENV_DATABASE_URL, "")),
    ):
        why = _dsn_problem(value)
        if why:
            ck.problems.append(f"{where}: {why}")
    database = DatabaseConfig(
        url=url,
        listen_url=listen_url,
        schema=schema,
        pool_min=ck.positive_int(t, "database", "pool_min", 2, minimum=1) or 2,
        pool_max=ck.positive_int(t, "database", "pool_max", 10, minimum=2) or 10,
        api_pool_max=ck.positive_int(t, "database", "api_pool_max", 5, minimum=1) or 5,
        statement_cache_size=ck.positive_int(t, "database", "statement_cache_size", 100, 0) or 0,
    )
    if database.pool_min > database.pool_max:
        ck.problems.append("database.pool_min: must not exceed database.pool_max")

    t = ck.section(raw, "embedded")
    ck.unknown("embedded", t, _fields(EmbeddedConfig))
    embedded = EmbeddedConfig(
        data_dir=ck.get(t, "embedded", "data_dir", str, ".data/postgres"),
        port=ck.positive_int(t, "embedded", "port", 54329) or 54329,
        bin_dir=ck.get(t, "embedded", "bin_dir", str, ""),
    )

    t = ck.section(raw, "server")
    ck.unknown("server", t, _fields(ServerConfig))
    server = ServerConfig(
        host=ck.get(t, "server", "host", str, "127.0.0.1"),
        port=ck.positive_int(t, "server", "port", 8080, minimum=0) or 0,
        max_body_bytes=ck.positive_int(t, "server", "max_body_bytes", 64 * 1024 * 1024) or 1,
        max_items_per_batch=ck.positive_int(t, "server", "max_items_per_batch", 100_000) or 1,
        metrics_sample_interval_s=ck.duration(t, "server", "metrics_sample_interval", 5.0),
        allowed_origins=_strings(ck, t, "server", "allowed_origins"),
        allowed_hosts=_strings(ck, t, "server", "allowed_hosts"),
        tls_cert=ck.get(t, "server", "tls_cert", str, ""),
        tls_key=ck.get(t, "server", "tls_key", str, ""),
        allow_plain_http=ck.get(t, "server", "allow_plain_http", bool, False),
        metrics_auth=ck.get(t, "server", "metrics_auth", bool, False),
        max_streams=ck.positive_int(t, "server", "max_streams", 256) or 256,
        max_streams_per_token=ck.positive_int(t, "server", "max_streams_per_token", 32) or 32,
        max_connections=ck.positive_int(t, "server", "max_connections", 1000) or 1000,
        read_timeout_s=ck.duration(t, "server", "read_timeout", 30.0),
    )
    if bool(server.tls_cert) != bool(server.tls_key):
        missing = "tls_key" if server.tls_cert else "tls_cert"
        ck.problems.append(f"server.{missing}: required with server.tls_cert/tls_key")
    elif server.tls_cert:
        try:
            tls_context(server)
        except (OSError, ssl.SSLError) as exc:
            ck.problems.append(f"server.tls_cert: cannot load the certificate and key: {exc}")

    t = ck.section(raw, "worker")
    ck.unknown("worker", t, _fields(WorkerConfig))
    worker = WorkerConfig(
        name=ck.get(t, "worker", "name", str, "") or default_worker_name(server.port),
        concurrency=ck.positive_int(t, "worker", "concurrency", 64) or 64,
        prefetch=_prefetch(ck, t),
        claim_batch_size=ck.positive_int(t, "worker", "claim_batch_size", 500) or 500,
        poll_interval_s=ck.duration(t, "worker", "poll_interval", 1.0),
        heartbeat_interval_s=ck.duration(t, "worker", "heartbeat_interval", 5.0),
        dead_after_s=ck.duration(t, "worker", "dead_after", 30.0),
        drain_timeout_s=ck.duration(t, "worker", "drain_timeout", 30.0, positive=False),
    )
    if worker.dead_after_s <= worker.heartbeat_interval_s:
        ck.problems.append("worker.dead_after: must be longer than worker.heartbeat_interval")

    t = ck.section(raw, "logging")
    ck.unknown("logging", t, _fields(LoggingConfig))
    logging_cfg = LoggingConfig(
        level=ck.get(t, "logging", "level", str, "info").lower(),
        format=ck.get(t, "logging", "format", str, "text"),
    )
    if logging_cfg.level not in ("debug", "info", "warning", "error"):
        ck.problems.append("logging.level: must be one of debug, info, warning, error")
    if logging_cfg.format not in ("text", "json"):
        ck.problems.append(f"logging.format: must be 'text' or 'json', got {logging_cfg.format!r}")

    t = ck.section(raw, "retention")
    ck.unknown("retention", t, _fields(RetentionConfig))
    retention = RetentionConfig(
        finished_after_s=ck.duration(t, "retention", "finished_after", 30 * 86400.0),
        interval_s=ck.duration(t, "retention", "interval", 3600.0),
    )

    tokens = _tokens(ck, ck.section(raw, "auth"))
    handlers = _handlers(ck, ck.section(raw, "handlers"))
    for i, tok in enumerate(tokens):
        for h in tok.handlers or ():
            if h not in handlers:
                ck.problems.append(f"auth.tokens[{i}].handlers: no handler {h!r}")

    if not tokens and not _is_loopback(server.host):
        ck.problems.append(
            f"server.host: {server.host!r} is not a loopback address and no [[auth.tokens]] are "
            "configured; refusing to serve an open API on the network"
        )
    elif not server.tls_cert and not server.allow_plain_http and not _is_loopback(server.host):
        ck.problems.append(
            f"server.tls_cert: on {server.host!r} (not a loopback address) bearer tokens would "
            "cross the network in cleartext; set server.tls_cert and server.tls_key, or "
            "server.allow_plain_http = true behind a TLS-terminating proxy"
        )
    if ck.problems:
        raise ConfigError(ck.problems)
    return Config(
        database, embedded, server, worker, logging_cfg, retention, tokens, handlers, path
    )


def _dsn_problem(url: str) -> str | None:
    """Why ``url`` is not a usable PostgreSQL URL (None if it is, or is empty)."""
    if not url:
        return None
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("postgres", "postgresql"):
        return "expected a postgresql://user:password@host:port/dbname URL"
    try:
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError as exc:
        return f"bad port in the URL ({exc})"
    return None


def _strings(ck: _Checker, t: Mapping[str, Any], path: str, key: str) -> tuple[str, ...]:
    """A list of non-empty strings (empty by default)."""
    raw = ck.get(t, path, key, list, [])
    bad = [v for v in raw if not isinstance(v, str) or not v]
    if bad:
        ck.problems.append(f"{path}.{key}: expected a list of non-empty strings, got {bad[0]!r}")
        return ()
    return tuple(raw)


def _tokens(ck: _Checker, auth: Mapping[str, Any]) -> tuple[TokenConfig, ...]:
    ck.unknown("auth", auth, ["tokens"])
    raw = auth.get("tokens", [])
    if not isinstance(raw, list):
        ck.problems.append("auth.tokens: expected an array of tables ([[auth.tokens]])")
        return ()
    out: list[TokenConfig] = []
    seen: dict[str, int] = {}  # digest -> index of the first token with it
    for i, t in enumerate(raw):
        p = f"auth.tokens[{i}]"
        if not isinstance(t, dict):
            ck.problems.append(f"{p}: expected a table")
            continue
        ck.unknown(p, t, ["name", "tenant", "sha256", "scopes", "handlers"])
        allowed = ck.get(t, p, "handlers", list, None) if "handlers" in t else None
        if allowed is not None and not all(isinstance(h, str) for h in allowed):
            ck.problems.append(f"{p}.handlers: expected a list of handler names")
            allowed = None
        digest = ck.get(t, p, "sha256", str, "")
        if not re.fullmatch(r"[0-9a-fA-F]{64}", digest):
            ck.problems.append(f"{p}.sha256: expected the 64-hex-digit SHA-256 of the token")
        elif digest.lower() in seen:
            ck.problems.append(
                f"{p}.sha256: the same token as auth.tokens[{seen[digest.lower()]}] "
                "(each token must be distinct)"
            )
        else:
            seen[digest.lower()] = i
        scopes = ck.get(t, p, "scopes", list, ["read"])
        for s in scopes:
            if s not in SCOPES:
                ck.problems.append(f"{p}.scopes: unknown scope {s!r} (use read, write, admin)")
        name = ck.get(t, p, "name", str, "")
        if not name:
            ck.problems.append(f"{p}.name: required")
        out.append(
            TokenConfig(
                name=name,
                tenant=ck.get(t, p, "tenant", str, "default") or "default",
                sha256=digest.lower(),
                scopes=tuple(str(s) for s in scopes),
                handlers=tuple(allowed) if allowed is not None else None,
            )
        )
    return tuple(out)


_HANDLER_KEYS = [
    "type",
    "target",
    "url",
    "command",
    "timeout",
    "max_attempts",
    "retry_backoff",
    "concurrency",
    "global_concurrency",
    "rate_limit",
    "on_complete",
    "headers",
    "signing_secret",
    "env",
    "pass_env",
    "user",
]


def _handlers(ck: _Checker, raw: Mapping[str, Any]) -> dict[str, HandlerConfig]:
    out: dict[str, HandlerConfig] = {}
    for name, t in raw.items():
        p = f"handlers.{name}"
        if not isinstance(t, dict):
            ck.problems.append(f"{p}: expected a table")
            continue
        ck.unknown(p, t, _HANDLER_KEYS)
        htype = ck.get(t, p, "type", str, "")
        if htype not in HANDLER_TYPES:
            ck.problems.append(
                f"{p}.type: must be one of {', '.join(HANDLER_TYPES)}, got {htype!r}"
            )
        target = ck.get(t, p, "target", str, "")
        url = ck.get(t, p, "url", str, "")
        command = ck.get(t, p, "command", list, [])
        if htype == "python" and not re.fullmatch(r"[\w.]+:[\w.]+", target):
            ck.problems.append(f"{p}.target: expected 'package.module:function', got {target!r}")
        if htype == "http" and not url:
            ck.problems.append(f'{p}.url: required for type = "http"')
        if htype == "exec":
            if not command or not all(isinstance(c, str) for c in command):
                ck.problems.append(f"{p}.command: expected a non-empty list of strings")
        b = t.get("retry_backoff", {})
        if not isinstance(b, dict):
            ck.problems.append(f"{p}.retry_backoff: expected a table")
            b = {}
        bp = f"{p}.retry_backoff"
        ck.unknown(bp, b, ["initial", "max", "multiplier", "jitter"])
        jitter = float(ck.get(b, bp, "jitter", (int, float), 0.1))
        if not 0 <= jitter <= 1:
            ck.problems.append(f"{bp}.jitter: must be a fraction between 0 and 1")
        multiplier = float(ck.get(b, bp, "multiplier", (int, float), 2.0))
        if multiplier < 1:
            ck.problems.append(f"{bp}.multiplier: must be at least 1")
        backoff = BackoffConfig(
            initial_s=ck.duration(b, bp, "initial", 1.0),
            max_s=ck.duration(b, bp, "max", 300.0),
            multiplier=multiplier,
            jitter=jitter,
        )
        rate_limit = ck.get(t, p, "rate_limit", str, None)
        rate_per_s = None
        if rate_limit is not None:
            try:
                rate_per_s = parse_rate(rate_limit)
            except ValueError as exc:
                ck.problems.append(f"{p}.rate_limit: {exc}")
        env = ck.get(t, p, "env", dict, {})
        for ek, ev in env.items():
            if not isinstance(ev, str):
                ck.problems.append(f"{p}.env.{ek}: expected str, got {type(ev).__name__}")
        pass_env = _strings(ck, t, p, "pass_env")
        if (env or pass_env) and htype != "exec":
            ck.problems.append(f"{p}: env and pass_env apply to exec handlers only")
        user = ck.get(t, p, "user", str, "")
        if user and htype not in ("exec", "python"):
            ck.problems.append(f"{p}.user: applies to exec and python handlers only")
        headers = ck.get(t, p, "headers", dict, {})
        for hk, hv in headers.items():
            if not isinstance(hv, str):
                ck.problems.append(f"{p}.headers.{hk}: expected str, got {type(hv).__name__}")
        out[name] = HandlerConfig(
            name=name,
            type=htype,
            target=target,
            url=url,
            command=tuple(str(c) for c in command),
            timeout_s=ck.duration(t, p, "timeout", 300.0),
            max_attempts=ck.positive_int(t, p, "max_attempts", 3) or 3,
            retry_backoff=backoff,
            concurrency=ck.positive_int(t, p, "concurrency", None),
            global_concurrency=ck.positive_int(t, p, "global_concurrency", None),
            rate_limit=rate_limit,
            rate_per_s=rate_per_s,
            on_complete=ck.get(t, p, "on_complete", str, None),
            headers={str(k): str(v) for k, v in headers.items()},
            env={str(k): str(v) for k, v in env.items()},
            pass_env=pass_env,
            user=user,
            signing_secret=ck.get(t, p, "signing_secret", str, None),
        )
    for name, h in out.items():
        if h.on_complete is not None and h.on_complete not in out:
            hint = difflib.get_close_matches(h.on_complete, list(out), n=1)
            more = f" (did you mean {hint[0]!r}?)" if hint else ""
            ck.problems.append(f"handlers.{name}.on_complete: no handler {h.on_complete!r}{more}")
    return out


def _is_loopback(host: str) -> bool:
    """True if every address ``host`` names is a loopback address (a name is
    resolved: "127.example.com" is not loopback just because of its prefix)."""
    if not host:
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return False  # a name that does not resolve is not known to be loopback
    return bool(infos) and all(
        ipaddress.ip_address(str(info[4][0]).split("%")[0]).is_loopback for info in infos
    )


def config_path(explicit: str | None) -> str:
    return explicit or os.environ.get(ENV_CONFIG) or DEFAULT_CONFIG


def load(path: str | None = None) -> Config:
    """Read and validate the TOML file (default ./config.toml, env BATCH_SUPERVISOR_CONFIG)."""
    p = config_path(path)
    try:
        with open(p, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError([f"{p}: no such configuration file"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{p}: not valid TOML: {exc}"]) from None
    return from_mapping(raw, p)
