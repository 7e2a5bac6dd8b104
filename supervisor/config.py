"""Configuration: frozen dataclasses per TOML section, loaded and validated once.

Every unknown key, wrong type or bad duration is collected with its dotted path
(and a "did you mean" for near-misses) and reported together; the CLI exits 78
(EX_CONFIG) before anything starts. Durations are parsed here, once, into
seconds (fields named ``*_s``).
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import ipaddress
import math
import os
import re
import socket
import ssl
import tomllib
import urllib.parse
import zoneinfo
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import cronsim

from supervisor import key_limits
from supervisor.errors import ConfigError

T = TypeVar("T")

ENV_CONFIG = "BATCH_SUPERVISOR_CONFIG"
ENV_DATABASE_URL = "BATCH_SUPERVISOR_DATABASE_URL"
DEFAULT_CONFIG = "config.toml"

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(s|m|h)\s*$")
_SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,40}$")
HANDLER_TYPES = ("python", "http", "exec")
OVERLAP_POLICIES = ("skip", "queue", "cancel")
CATCH_UP_POLICIES = ("skip", "latest")
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
class Key:
    """How one TOML key of a section is read: its kind and bounds. Declared once,
    on its dataclass field, with the default; :func:`_read_section` reads every
    field of a section from it (the TOML name is the field's without ``_s``)."""

    kind: str  # "str", "int", "bool", "duration", "strings" (a list of non-empty str)
    minimum: int = 1  # "int": the smallest value accepted
    positive: bool = True  # "duration": zero is refused
    choices: tuple[str, ...] = ()  # "str": the values accepted
    lower: bool = False  # "str": read case-insensitively (stored lower-case)


def key(default: Any, kind: str, **bounds: Any) -> Any:
    """A section field with its default and :class:`Key`."""
    return dataclasses.field(default=default, metadata={"key": Key(kind, **bounds)})


@dataclasses.dataclass(frozen=True)
class DatabaseConfig:
    url: str = key("", "str")
    listen_url: str = key("", "str")
    schema: str = key("supervisor", "str")
    # Deprecated and ignored (README): the pools open connections on demand, so a
    # daemon started while its database is down starts and waits for it.
    pool_min: int = key(2, "int")
    pool_max: int = key(10, "int", minimum=2)
    # The API's own pool (requests and SSE streams): API load never takes the
    # connections the claim loop, outbox and heartbeats need.
    api_pool_max: int = key(5, "int")
    statement_cache_size: int = key(100, "int", minimum=0)


@dataclasses.dataclass(frozen=True)
class EmbeddedConfig:
    data_dir: str = key(".data/postgres", "str")
    port: int = key(54329, "int")
    bin_dir: str = key("", "str")


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    host: str = key("127.0.0.1", "str")
    port: int = key(8080, "int", minimum=0)
    max_body_bytes: int = key(64 * 1024 * 1024, "int")
    max_items_per_batch: int = key(100_000, "int")
    # queue depth/lag gauges are read this often
    metrics_sample_interval_s: float = key(5.0, "duration")
    # Browser origins besides the dashboard's own that may send requests (CSRF guard).
    allowed_origins: tuple[str, ...] = key((), "strings")
    # Host header values accepted besides the served address (DNS-rebinding guard).
    allowed_hosts: tuple[str, ...] = key((), "strings")
    tls_cert: str = key("", "str")  # PEM certificate chain; with tls_key the API is HTTPS only
    tls_key: str = key("", "str")
    # Tokens over plain HTTP on a non-loopback address (a TLS-terminating proxy in front)
    allow_plain_http: bool = key(False, "bool")
    # /metrics needs a read token (when tokens are configured)
    metrics_auth: bool = key(False, "bool")
    max_streams: int = key(256, "int")  # SSE streams open at once on this daemon (429 beyond)
    max_streams_per_token: int = key(32, "int")
    # Open client connections at once (beyond: answered 503 and closed), lowered at
    # start to fit the open-file limit (see api.server.connection_cap).
    max_connections: int = key(1000, "int")
    # How long a client has to send a request's head (a new or idle keep-alive
    # connection) and, separately, its body: slow senders must not hold sockets.
    read_timeout_s: float = key(30.0, "duration")


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
    # "" in the file: default_worker_name of the API port (filled in by from_mapping)
    name: str = dataclasses.field(
        default_factory=lambda: default_worker_name(0), metadata={"key": Key("str")}
    )
    concurrency: int = key(64, "int")
    # claimed items that may wait for a worker; None = "auto" (see supervisor.prefetch);
    # read by _prefetch (an integer or "auto")
    prefetch: int | None = None
    claim_batch_size: int = key(500, "int")
    poll_interval_s: float = key(1.0, "duration")
    heartbeat_interval_s: float = key(5.0, "duration")
    dead_after_s: float = key(30.0, "duration")
    drain_timeout_s: float = key(30.0, "duration", positive=False)


@dataclasses.dataclass(frozen=True)
class LoggingConfig:
    level: str = key("info", "str", choices=("debug", "info", "warning", "error"), lower=True)
    format: str = key("text", "str", choices=("text", "json"))


@dataclasses.dataclass(frozen=True)
class RetentionConfig:
    finished_after_s: float = key(30 * 86400.0, "duration")
    interval_s: float = key(3600.0, "duration")


TRACE_EXPORTERS = ("otlp", "console", "none")


@dataclasses.dataclass(frozen=True)
class TelemetryConfig:
    """``[telemetry]``: OpenTelemetry tracing (the otel extra). Each empty string
    leaves the setting to the SDK's standard environment variable."""

    tracing: bool = key(False, "bool")
    # "" = OTEL_TRACES_EXPORTER, else "otlp"; "otlp" sends OTLP over HTTP (protobuf)
    exporter: str = key("", "str", lower=True)  # checked by tracing_problems
    # base URL of the collector ("/v1/traces" is appended), as OTEL_EXPORTER_OTLP_ENDPOINT
    otlp_endpoint: str = key("", "str")
    service_name: str = key("", "str")  # "" = OTEL_SERVICE_NAME, else "batch-supervisor"


def tracing_problems(t: TelemetryConfig) -> list[str]:
    """What is wrong with ``t``; with tracing on also an unusable OTEL_* variable
    or the otel extra not installed. Checked with the rest of the
    configuration, so a daemon that cannot trace never starts half-way."""
    problems = []
    if t.exporter and t.exporter not in TRACE_EXPORTERS:
        problems.append(
            f"telemetry.exporter: must be one of {', '.join(TRACE_EXPORTERS)}, got {t.exporter!r}"
        )
    if t.otlp_endpoint:
        u = urllib.parse.urlsplit(t.otlp_endpoint)
        if u.scheme not in ("http", "https") or not u.hostname:
            problems.append(
                f"telemetry.otlp_endpoint: {t.otlp_endpoint!r} is not an http:// or https:// URL"
            )
    if not t.tracing:
        return problems  # the environment and the packages matter only when tracing
    env_exporter = os.environ.get("OTEL_TRACES_EXPORTER", "")
    if not t.exporter and env_exporter:
        for name in (n.strip().lower() for n in env_exporter.split(",")):
            if name not in TRACE_EXPORTERS:
                problems.append(
                    f"OTEL_TRACES_EXPORTER: {name!r} is not one of {', '.join(TRACE_EXPORTERS)}"
                )
    for var in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
        protocol = os.environ.get(var, "")
        if protocol and protocol != "http/protobuf":
            problems.append(
                f"{var}: {protocol!r} is not supported; the otel extra exports OTLP over "
                "HTTP (http/protobuf)"
            )
            break
    missing = [m for m in OTEL_MODULES if not _importable(m)]
    if missing:
        problems.append(
            "telemetry.tracing: tracing is on but OpenTelemetry is not installed (no module "
            f"{missing[0]!r}); install the extra: pip install 'batch-supervisor[otel]'"
        )
    return problems


# What tracing imports (supervisor/otel.py): the SDK and the OTLP/HTTP exporter.
OTEL_MODULES = ("opentelemetry.sdk.trace", "opentelemetry.exporter.otlp.proto.http")


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:  # a parent package is missing (or its import is refused)
        return False


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


KEY_BURST_S = 0.1  # a key's rate bucket holds this many seconds' worth of starts


@dataclasses.dataclass(frozen=True)
class KeyLimitConfig:
    """A handler's limits per key (supervisor/key_limits.py): at most
    ``concurrency`` running, ``rate_per_s`` starts and ``budget`` cost started per
    ``budget_period_s`` per key, across every daemon."""

    key: str  # the JSON Pointer into the payload, as configured
    tokens: tuple[str, ...]  # its reference tokens
    concurrency: int | None = None
    rate_limit: str | None = None
    rate_per_s: float | None = None
    budget: float | None = None  # cost units started per key per period
    budget_period: str = "1m"
    budget_period_s: float = 60.0
    cost: str | None = None  # the JSON Pointer to an item's cost (none: each costs 1)
    cost_tokens: tuple[str, ...] | None = None

    @property
    def burst(self) -> float:
        """The starts a key's full bucket holds: KEY_BURST_S worth, at least one."""
        return max(1.0, (self.rate_per_s or 0.0) * KEY_BURST_S)


@dataclasses.dataclass(frozen=True)
class HandlerConfig:
    name: str
    type: str
    target: str = ""
    url: str = ""
    command: tuple[str, ...] = ()
    timeout_s: float = 300.0
    # how far item.extend() may move an attempt's deadline, from its start
    max_timeout_s: float = 300.0
    max_attempts: int = 3
    retry_backoff: BackoffConfig = dataclasses.field(default_factory=BackoffConfig)
    concurrency: int | None = None
    global_concurrency: int | None = None
    rate_limit: str | None = None
    rate_per_s: float | None = None
    key_limit: KeyLimitConfig | None = None
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
class ScheduleConfig:
    """``[schedules.NAME]``: a batch of ``handler``, or a run of ``pipeline``,
    submitted at every slot of a cron expression (see supervisor/schedules.py for
    the slot rules)."""

    name: str
    cron: str  # 5 fields, or 6 with seconds first (cronsim)
    timezone: str = "UTC"  # the zone the cron fields are read in (zoneinfo)
    handler: str = ""  # exactly one of handler and pipeline
    pipeline: str = ""
    items: tuple[Any, ...] = ()  # static items, as POST /v1/batches takes them
    items_from: str = ""  # "module:function" called at fire time (instead of items)
    tenant: str = "default"
    metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    priority: int = 0
    max_attempts: int | None = None
    exclusive_key: str = ""  # "": "schedule:NAME"
    overlap: str = "skip"  # the previous run still unfinished: skip, queue or cancel
    catch_up: str = "skip"  # slots missed while no daemon ran: skip, or run the latest
    grace_s: float = 60.0  # a slot fired later than this counts as missed
    items_timeout_s: float = 60.0  # items_from must return within this

    @property
    def key(self) -> str:
        """The exclusive key the schedule's batches (or pipeline runs) hold; overlap
        is decided on it."""
        return self.exclusive_key or f"schedule:{self.name}"


@dataclasses.dataclass(frozen=True)
class StageConfig:
    """One stage of a pipeline: a batch of ``handler``; ``items`` ("module:function")
    derives its items from the previous stage's results (every stage but the first)."""

    name: str
    handler: str
    items: str | None = None


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    name: str
    stages: tuple[StageConfig, ...]
    on_stage_failure: str = "stop"  # or "continue" (states.StageFailure)


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
    schedules: Mapping[str, ScheduleConfig] = dataclasses.field(default_factory=dict)
    pipelines: Mapping[str, PipelineConfig] = dataclasses.field(default_factory=dict)
    telemetry: TelemetryConfig = dataclasses.field(default_factory=TelemetryConfig)

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

    def handler_ref(self, field: str, name: str, handlers: Mapping[str, Any]) -> None:
        """``field`` names a handler: a problem, with a did-you-mean, unless it exists."""
        self.name_ref(field, "handler", name, handlers)

    def name_ref(self, field: str, what: str, name: str, known: Mapping[str, Any]) -> None:
        """``field`` names a ``what`` (a handler, a pipeline) of ``known``: a problem,
        with a did-you-mean, unless it exists."""
        if name not in known:
            hint = difflib.get_close_matches(name, list(known), n=1)
            more = f" (did you mean {hint[0]!r}?)" if hint else ""
            self.problems.append(f"{field}: no {what} {name!r}{more}")

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


def _toml_name(f: dataclasses.Field[Any]) -> str:
    return f.name.removesuffix("_s")


def _fields(cls: type) -> list[str]:
    return [_toml_name(f) for f in dataclasses.fields(cls)]


def _read_key(ck: _Checker, t: Mapping[str, Any], path: str, f: dataclasses.Field[Any]) -> Any:
    spec: Key = f.metadata["key"]
    name = _toml_name(f)
    default: Any = f.default if f.default is not dataclasses.MISSING else ""
    if spec.kind == "duration":
        return ck.duration(t, path, name, default, positive=spec.positive)
    if spec.kind == "int":
        return ck.positive_int(t, path, name, default, minimum=spec.minimum)
    if spec.kind == "bool":
        return ck.get(t, path, name, bool, default)
    if spec.kind == "strings":
        return _strings(ck, t, path, name)
    value = ck.get(t, path, name, str, default)
    value = value.lower() if spec.lower else value
    if spec.choices:
        if value not in spec.choices:
            allowed = ", ".join(spec.choices)
            ck.problems.append(f"{path}.{name}: must be one of {allowed}, got {value!r}")
            return default
    return value


def _read_section(ck: _Checker, raw: Mapping[str, Any], path: str, cls: type[T], **given: Any) -> T:
    """Section ``path`` of the file as a ``cls``: every field with a :class:`Key`
    read from it (problems collected in ``ck``), the rest from ``given``."""
    t = ck.section(raw, path)
    ck.unknown(path, t, _fields(cls))
    values = {
        f.name: _read_key(ck, t, path, f)
        for f in dataclasses.fields(cls)  # type: ignore[arg-type]
        if "key" in f.metadata and f.name not in given
    }
    return cls(**values, **given)


def from_mapping(raw: Mapping[str, Any], path: str = "") -> Config:
    """Build and validate a Config from parsed TOML; raises ConfigError listing every problem."""
    ck = _Checker()
    top = [
        "database",
        "embedded",
        "server",
        "worker",
        "logging",
        "retention",
        "auth",
        "handlers",
        "schedules",
        "pipelines",
        "telemetry",
    ]
    ck.unknown("", raw, top)

    database = _read_section(ck, raw, "database", DatabaseConfig)
    if not _SCHEMA_NAME.match(database.schema):
        ck.problems.append(
            f"database.schema: {database.schema!r} must be a lower-case identifier "
            "(letters, digits, _)"
        )
    for where, value in (
        ("database.url", database.url),
        ("database.listen_url", database.listen_url),
        (ENV_DATABASE_URL, os.environ.get(ENV_DATABASE_URL, "")),
    ):
        why = _dsn_problem(value)
        if why:
            ck.problems.append(f"{where}: {why}")
    if database.pool_min > database.pool_max:
        ck.problems.append("database.pool_min: must not exceed database.pool_max")

    embedded = _read_section(ck, raw, "embedded", EmbeddedConfig)

    server = _read_section(ck, raw, "server", ServerConfig)
    if bool(server.tls_cert) != bool(server.tls_key):
        missing = "tls_key" if server.tls_cert else "tls_cert"
        ck.problems.append(f"server.{missing}: required with server.tls_cert/tls_key")
    elif server.tls_cert:
        try:
            tls_context(server)
        except (OSError, ssl.SSLError) as exc:
            ck.problems.append(f"server.tls_cert: cannot load the certificate and key: {exc}")

    t = raw["worker"] if isinstance(raw.get("worker"), dict) else {}
    worker = _read_section(
        ck,
        raw,
        "worker",
        WorkerConfig,
        name=ck.get(t, "worker", "name", str, "") or default_worker_name(server.port),
        prefetch=_prefetch(ck, t),
    )
    if worker.dead_after_s <= worker.heartbeat_interval_s:
        ck.problems.append("worker.dead_after: must be longer than worker.heartbeat_interval")

    logging_cfg = _read_section(ck, raw, "logging", LoggingConfig)
    retention = _read_section(ck, raw, "retention", RetentionConfig)
    telemetry = _read_section(ck, raw, "telemetry", TelemetryConfig)
    ck.problems += tracing_problems(telemetry)

    tokens = _tokens(ck, ck.section(raw, "auth"))
    handlers = _handlers(ck, ck.section(raw, "handlers"))
    pipelines = _pipelines(ck, ck.section(raw, "pipelines"), handlers)
    schedules = _schedules(ck, ck.section(raw, "schedules"), handlers, pipelines)
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
        database,
        embedded,
        server,
        worker,
        logging_cfg,
        retention,
        tokens,
        handlers,
        path,
        schedules,
        pipelines,
        telemetry,
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
    "max_timeout",
    "max_attempts",
    "retry_backoff",
    "concurrency",
    "global_concurrency",
    "rate_limit",
    "key_limit",
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
        key_limit = _key_limit(ck, t, p)
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
        timeout_s = ck.duration(t, p, "timeout", 300.0)
        max_timeout_s = ck.duration(t, p, "max_timeout", timeout_s)
        if max_timeout_s < timeout_s:
            ck.problems.append(
                f"{p}.max_timeout: must be at least timeout ({timeout_s:g}s): it is how far "
                "an attempt may extend its own deadline"
            )
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
            timeout_s=timeout_s,
            max_timeout_s=max(timeout_s, max_timeout_s),
            max_attempts=ck.positive_int(t, p, "max_attempts", 3) or 3,
            retry_backoff=backoff,
            concurrency=ck.positive_int(t, p, "concurrency", None),
            global_concurrency=ck.positive_int(t, p, "global_concurrency", None),
            rate_limit=rate_limit,
            rate_per_s=rate_per_s,
            key_limit=key_limit,
            on_complete=ck.get(t, p, "on_complete", str, None),
            headers={str(k): str(v) for k, v in headers.items()},
            env={str(k): str(v) for k, v in env.items()},
            pass_env=pass_env,
            user=user,
            signing_secret=ck.get(t, p, "signing_secret", str, None),
        )
    for name, h in out.items():
        if h.on_complete is not None:
            ck.handler_ref(f"handlers.{name}.on_complete", h.on_complete, out)
    return out


def _key_limit(ck: _Checker, t: Mapping[str, Any], p: str) -> KeyLimitConfig | None:
    """``[handlers.NAME.key_limit]``: a key pointer and at least one limit per key."""
    if "key_limit" not in t:
        return None
    kp = f"{p}.key_limit"
    k = t["key_limit"]
    if not isinstance(k, dict):
        ck.problems.append(f"{kp}: expected a table, got {type(k).__name__}")
        return None
    ck.unknown(kp, k, ["key", "concurrency", "rate_limit", "budget", "budget_period", "cost"])
    pointer = ck.get(k, kp, "key", str, None)
    tokens: tuple[str, ...] = ()
    if pointer is None:
        if "key" not in k:
            ck.problems.append(
                f'{kp}.key: required, a JSON Pointer into the payload like "/domain"'
            )
    else:
        try:
            tokens = key_limits.parse_pointer(pointer)
        except ValueError as exc:
            ck.problems.append(f"{kp}.key: {exc}")
    rate_limit = ck.get(k, kp, "rate_limit", str, None)
    rate_per_s = None
    if rate_limit is not None:
        try:
            rate_per_s = parse_rate(rate_limit)
        except ValueError as exc:
            ck.problems.append(f"{kp}.rate_limit: {exc}")
    concurrency = ck.positive_int(k, kp, "concurrency", None)
    if not {"concurrency", "rate_limit", "budget"} & set(k):
        ck.problems.append(
            f"{kp}: needs concurrency, rate_limit or budget (the limits per key), or several"
        )
    budget = ck.get(k, kp, "budget", (int, float), None)
    if budget is not None and not 0 < budget < math.inf:
        ck.problems.append(f"{kp}.budget: must be a number greater than zero, got {budget!r}")
        budget = None
    period_s = ck.duration(k, kp, "budget_period", 60.0)
    period = ck.get(k, kp, "budget_period", (str, int, float), "1m")
    cost = ck.get(k, kp, "cost", str, None)
    cost_tokens = None
    if cost is not None:
        try:
            cost_tokens = key_limits.parse_pointer(cost)
        except ValueError as exc:
            ck.problems.append(f"{kp}.cost: {exc}")
    for name in ("budget_period", "cost"):
        if name in k and "budget" not in k:
            ck.problems.append(f"{kp}.{name}: only means something with {kp}.budget")
    return KeyLimitConfig(
        key=pointer or "",
        tokens=tokens,
        concurrency=concurrency,
        rate_limit=rate_limit,
        rate_per_s=rate_per_s,
        budget=None if budget is None else float(budget),
        budget_period=str(period),
        budget_period_s=period_s,
        cost=cost,
        cost_tokens=cost_tokens,
    )


_SCHEDULE_KEYS = [
    "cron",
    "timezone",
    "handler",
    "pipeline",
    "items",
    "items_from",
    "tenant",
    "metadata",
    "priority",
    "max_attempts",
    "exclusive_key",
    "overlap",
    "catch_up",
    "grace",
    "items_timeout",
]
_SCHEDULE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


def cron_problem(expr: str, timezone: str) -> str | None:
    """Why ``expr`` in ``timezone`` is not a usable schedule (None if it is)."""
    try:
        zone = zoneinfo.ZoneInfo(timezone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        return f"timezone: unknown time zone {timezone!r} (an IANA name like 'Europe/Zurich')"
    try:
        next(cronsim.CronSim(expr, datetime.now(UTC).astimezone(zone)))
    except cronsim.CronSimError as exc:
        return f"cron: {expr!r} is not a cron expression: {exc}"
    except StopIteration:
        return f"cron: {expr!r} never fires"
    return None


def _schedules(
    ck: _Checker,
    raw: Mapping[str, Any],
    handlers: Mapping[str, HandlerConfig],
    pipelines: Mapping[str, PipelineConfig],
) -> dict[str, ScheduleConfig]:
    """``[schedules.NAME]`` tables; the items themselves are checked by
    supervisor.schedules (with the API's own validation) before the daemon starts."""
    out: dict[str, ScheduleConfig] = {}
    for name, t in raw.items():
        p = f"schedules.{name}"
        if not isinstance(t, dict):
            ck.problems.append(f"{p}: expected a table")
            continue
        if not _SCHEDULE_NAME.match(name):
            ck.problems.append(f"{p}: a schedule name is 1 to 100 letters, digits, '_', '.' or '-'")
        ck.unknown(p, t, _SCHEDULE_KEYS)
        cron = ck.get(t, p, "cron", str, "")
        timezone = ck.get(t, p, "timezone", str, "UTC")
        if not cron:
            ck.problems.append(f"{p}.cron: required, e.g. '0 2 * * *'")
        elif why := cron_problem(cron, timezone):
            ck.problems.append(f"{p}.{why}")
        handler = ck.get(t, p, "handler", str, "")
        pipeline = ck.get(t, p, "pipeline", str, "")
        if bool(handler) == bool(pipeline):
            ck.problems.append(
                f"{p}: exactly one of handler (a batch at each slot) or pipeline (a pipeline run)"
            )
        elif handler:
            ck.handler_ref(f"{p}.handler", handler, handlers)
        else:
            ck.name_ref(f"{p}.pipeline", "pipeline", pipeline, pipelines)
        items = ck.get(t, p, "items", list, [])
        items_from = ck.get(t, p, "items_from", str, "")
        if bool(items) == bool(items_from):
            ck.problems.append(f"{p}: exactly one of items (a non-empty list) or items_from")
        if items_from and not re.fullmatch(r"[\w.]+:[\w.]+", items_from):
            ck.problems.append(
                f"{p}.items_from: expected 'package.module:function', got {items_from!r}"
            )
        priority = ck.get(t, p, "priority", int, 0)
        overlap = ck.get(t, p, "overlap", str, "skip")
        if overlap not in OVERLAP_POLICIES:
            ck.problems.append(
                f"{p}.overlap: must be one of {', '.join(OVERLAP_POLICIES)}, got {overlap!r}"
            )
        elif pipeline and overlap != "skip":
            ck.problems.append(
                f'{p}.overlap: "{overlap}" is not available with pipeline: a pipeline run '
                "cannot wait for its exclusive key to be free, so a pipeline schedule takes "
                'overlap = "skip" (the slot is skipped while the previous run is running)'
            )
        if pipeline:
            for field in ("priority", "max_attempts"):
                if field in t:
                    ck.problems.append(
                        f"{p}.{field}: not with pipeline: a pipeline run takes neither (each "
                        "stage's batch has its handler's settings)"
                    )
        catch_up = ck.get(t, p, "catch_up", str, "skip")
        if catch_up not in CATCH_UP_POLICIES:
            ck.problems.append(
                f"{p}.catch_up: must be one of {', '.join(CATCH_UP_POLICIES)}, got {catch_up!r}"
            )
        out[name] = ScheduleConfig(
            name=name,
            cron=cron,
            timezone=timezone,
            handler=handler,
            pipeline=pipeline,
            items=tuple(items),
            items_from=items_from,
            tenant=ck.get(t, p, "tenant", str, "default") or "default",
            metadata=ck.get(t, p, "metadata", dict, {}),
            priority=priority,
            max_attempts=ck.positive_int(t, p, "max_attempts", None),
            exclusive_key=ck.get(t, p, "exclusive_key", str, ""),
            overlap=overlap,
            catch_up=catch_up,
            grace_s=ck.duration(t, p, "grace", 60.0),
            items_timeout_s=ck.duration(t, p, "items_timeout", 60.0),
        )
    return out


_PIPELINE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
_FUNCTION_REF = re.compile(r"[\w.]+:[\w.]+")


def _pipelines(
    ck: _Checker, raw: Mapping[str, Any], handlers: Mapping[str, HandlerConfig]
) -> dict[str, PipelineConfig]:
    """``[pipelines.<name>]``: ``stages`` (a non-empty array of {name, handler,
    items}) and ``on_stage_failure``. The first stage takes the run's items, so
    it has no ``items`` function; every later stage must name one."""
    out: dict[str, PipelineConfig] = {}
    for name, t in raw.items():
        p = f"pipelines.{name}"
        if not isinstance(t, dict):
            ck.problems.append(f"{p}: expected a table")
            continue
        if not _PIPELINE_NAME.match(name):
            ck.problems.append(f"{p}: a name of letters, digits, '_', '.' and '-' (URL-safe)")
        ck.unknown(p, t, ["stages", "on_stage_failure"])
        policy = ck.get(t, p, "on_stage_failure", str, "stop")
        if policy not in ("stop", "continue"):
            ck.problems.append(
                f'{p}.on_stage_failure: must be "stop" or "continue", got {policy!r}'
            )
        raw_stages = ck.get(t, p, "stages", list, [])
        if not raw_stages:
            ck.problems.append(f"{p}.stages: required: a non-empty array of stages")
        stages: list[StageConfig] = []
        seen: set[str] = set()
        for i, st in enumerate(raw_stages):
            sp = f"{p}.stages[{i}]"
            if not isinstance(st, dict):
                ck.problems.append(f"{sp}: expected a table {{ name, handler, items }}")
                continue
            ck.unknown(sp, st, ["name", "handler", "items"])
            sname = ck.get(st, sp, "name", str, "")
            handler = ck.get(st, sp, "handler", str, "")
            items = ck.get(st, sp, "items", str, None)
            if not sname:
                ck.problems.append(f"{sp}.name: required")
            elif sname in seen:
                ck.problems.append(f"{sp}.name: {sname!r} names another stage too")
            seen.add(sname)
            ck.handler_ref(f"{sp}.handler", handler, handlers)
            if i == 0 and items is not None:
                ck.problems.append(
                    f"{sp}.items: the first stage takes the run's items; only later stages "
                    "derive theirs"
                )
            elif i > 0 and items is None:
                ck.problems.append(
                    f"{sp}.items: required: 'package.module:function' deriving the stage's "
                    "items from the previous stage's results"
                )
            elif items is not None and not _FUNCTION_REF.fullmatch(items):
                ck.problems.append(f"{sp}.items: expected 'package.module:function', got {items!r}")
            stages.append(StageConfig(name=sname, handler=handler, items=items))
        out[name] = PipelineConfig(name=name, stages=tuple(stages), on_stage_failure=policy)
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
