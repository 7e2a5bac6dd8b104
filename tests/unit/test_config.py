"""Configuration validation: every problem reported with its dotted path; exit 78."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

from supervisor import config
from supervisor.errors import ConfigError
from tests.daemon import ROOT


def problems(raw: dict[str, object]) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        config.from_mapping(raw)
    return exc.value.problems


def test_defaults_are_valid_and_durations_are_seconds() -> None:
    cfg = config.from_mapping({"worker": {"drain_timeout": "1m", "poll_interval": "250ms"}})
    assert cfg.worker.drain_timeout_s == 60.0
    assert cfg.worker.poll_interval_s == 0.25
    assert cfg.retention.finished_after_s == 30 * 86400
    assert cfg.database.schema == "supervisor"


def test_prefetch_is_auto_by_default_or_a_fixed_count() -> None:
    assert config.from_mapping({}).worker.prefetch is None
    assert config.from_mapping({"worker": {"prefetch": "auto"}}).worker.prefetch is None
    assert config.from_mapping({"worker": {"prefetch": 0}}).worker.prefetch == 0
    assert problems({"worker": {"prefetch": "lots"}}) == [
        "worker.prefetch: expected an integer or \"auto\", got 'lots'"
    ]
    assert problems({"worker": {"prefetch": -1}}) == ["worker.prefetch: must be at least 0, got -1"]


def test_unknown_keys_are_named_with_did_you_mean() -> None:
    ps = problems({"worker": {"concurency": 4}, "servr": {}})
    assert "worker.concurency: unknown key (did you mean 'concurrency'?)" in ps
    assert "servr: unknown key (did you mean 'server'?)" in ps


def test_wrong_types_and_bad_durations_are_all_reported() -> None:
    ps = problems(
        {
            "worker": {"concurrency": "many", "dead_after": "soon"},
            "handlers": {
                "h": {
                    "type": "python",
                    "target": "m:f",
                    "timeout": "5 parsecs",
                    "retry_backoff": {"initial": "x", "jitter": 3},
                }
            },
        }
    )
    text = "\n".join(ps)
    assert "worker.concurrency: expected int, got str 'many'" in text
    assert "worker.dead_after: 'soon' is not a duration" in text
    assert "handlers.h.timeout: '5 parsecs' is not a duration" in text
    assert "handlers.h.retry_backoff.initial" in text
    assert "handlers.h.retry_backoff.jitter: must be a fraction between 0 and 1" in text


def test_handler_types_targets_and_limits_are_checked() -> None:
    ps = problems(
        {
            "handlers": {
                "a": {"type": "pyton"},
                "b": {"type": "python", "target": "no-colon"},
                "c": {"type": "http"},
                "d": {"type": "exec", "command": []},
                "e": {"type": "python", "target": "m:f", "rate_limit": "fast", "on_complete": "ee"},
                "f": {"type": "python", "target": "m:f", "concurrency": 0},
            }
        }
    )
    text = "\n".join(ps)
    assert "handlers.a.type: must be one of python, http, exec, got 'pyton'" in text
    assert "handlers.b.target: expected 'package.module:function'" in text
    assert 'handlers.c.url: required for type = "http"' in text
    assert "handlers.d.command: expected a non-empty list of strings" in text
    assert "handlers.e.rate_limit: 'fast' is not a rate" in text
    assert "handlers.e.on_complete: no handler 'ee' (did you mean 'e'?)" in text
    assert "handlers.f.concurrency: must be at least 1, got 0" in text


def test_rates_and_backoff() -> None:
    assert config.parse_rate("10/s") == 10.0
    assert config.parse_rate("600/m") == 10.0
    b = config.BackoffConfig(initial_s=1.0, max_s=10.0, multiplier=2.0, jitter=0.0)
    assert [b.delay(n, 0.5) for n in (1, 2, 3, 4, 5, 6)] == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    j = config.BackoffConfig(initial_s=1.0, max_s=10.0, multiplier=2.0, jitter=0.5)
    assert j.delay(1, 0.0) == 0.5 and j.delay(1, 0.999999) == pytest.approx(1.5, abs=1e-5)


def test_open_api_on_a_public_address_is_refused() -> None:
    ps = problems({"server": {"host": "0.0.0.0"}})
    assert any(p.startswith("server.host: '0.0.0.0' is not a loopback address") for p in ps)
    tok = {"name": "ci", "tenant": "t", "sha256": "a" * 64, "scopes": ["read"]}
    ps = problems({"server": {"host": "0.0.0.0"}, "auth": {"tokens": [tok]}})
    assert any(p.startswith("server.tls_cert: on '0.0.0.0'") for p in ps), ps
    cfg = config.from_mapping(
        {"server": {"host": "0.0.0.0", "allow_plain_http": True}, "auth": {"tokens": [tok]}}
    )
    assert cfg.tokens[0].scopes == ("read",)


def test_bad_schema_name_is_rejected() -> None:
    assert any(p.startswith("database.schema:") for p in problems({"database": {"schema": "a;b"}}))


def test_cli_exits_78_before_touching_anything(tmp_path: pathlib.Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(
        '[worker]\nconcurency = 3\n[handlers.x]\ntype = "python"\ntarget = "m:f"\n'
        'timeout = "forever"\n'
    )
    out = subprocess.run(
        [sys.executable, "-m", "supervisor", "run", "--config", str(cfg)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 78
    assert "worker.concurency: unknown key (did you mean 'concurrency'?)" in out.stderr
    assert "handlers.x.timeout: 'forever' is not a duration" in out.stderr
    assert not (tmp_path / ".data").exists()


def test_shipped_config_is_valid() -> None:
    cfg = config.load(str(ROOT / "config.toml"))
    assert cfg.server.port == 8080 and "echo" in cfg.handlers


def test_max_timeout_defaults_to_timeout_and_may_not_be_shorter() -> None:
    h = {"type": "python", "target": "a:b", "timeout": "30s"}
    cfg = config.from_mapping({"handlers": {"h": h}})
    assert cfg.handlers["h"].max_timeout_s == 30.0  # no extension unless configured
    cfg = config.from_mapping({"handlers": {"h": h | {"max_timeout": "2h"}}})
    assert cfg.handlers["h"].max_timeout_s == 7200.0
    (problem,) = problems({"handlers": {"h": h | {"max_timeout": "10s"}}})
    assert problem.startswith("handlers.h.max_timeout: must be at least timeout (30s)")


def test_pipelines_are_read_and_every_problem_is_named() -> None:
    echo = {"type": "python", "target": "tests.handlers:echo"}
    ok = config.from_mapping(
        {
            "handlers": {"echo": echo},
            "pipelines": {
                "nightly": {
                    "stages": [
                        {"name": "fetch", "handler": "echo"},
                        {"name": "extract", "handler": "echo", "items": "tests.pipes:passthrough"},
                    ],
                    "on_stage_failure": "continue",
                }
            },
        }
    )
    p = ok.pipelines["nightly"]
    assert [s.name for s in p.stages] == ["fetch", "extract"] and p.on_stage_failure == "continue"
    assert p.stages[0].items is None and p.stages[1].items == "tests.pipes:passthrough"
    found = problems(
        {
            "handlers": {"echo": echo},
            "pipelines": {
                "bad": {
                    "stages": [
                        {"name": "a", "handler": "ecko", "items": "tests.pipes:passthrough"},
                        {"name": "a", "handler": "echo"},
                        {"name": "c", "handler": "echo", "items": "not a function"},
                        "d",
                    ],
                    "on_stage_failure": "retry",
                    "stage": [],
                },
                "empty": {"stages": []},
                "bad name!": {"stages": [{"name": "a", "handler": "echo"}]},
            },
        }
    )
    for expected in (
        "pipelines.bad.stage: unknown key (did you mean 'stages'?)",
        'pipelines.bad.on_stage_failure: must be "stop" or "continue"',
        "pipelines.bad.stages[0].handler: no handler 'ecko' (did you mean 'echo'?)",
        "pipelines.bad.stages[0].items: the first stage takes the run's items",
        "pipelines.bad.stages[1].name: 'a' names another stage too",
        "pipelines.bad.stages[1].items: required",
        "pipelines.bad.stages[2].items: expected 'package.module:function'",
        "pipelines.bad.stages[3]: expected a table",
        "pipelines.empty.stages: required",
        "pipelines.bad name!: a name of letters",
    ):
        assert any(pr.startswith(expected) for pr in found), (expected, found)


def test_telemetry_is_off_by_default_and_checked_field_by_field() -> None:
    assert config.from_mapping({}).telemetry == config.TelemetryConfig(tracing=False)
    assert problems(
        {"telemetry": {"tracng": True, "exporter": "zipkin", "otlp_endpoint": "collector:4318"}}
    ) == [
        "telemetry.tracng: unknown key (did you mean 'tracing'?)",
        "telemetry.exporter: must be one of otlp, console, none, got 'zipkin'",
        "telemetry.otlp_endpoint: 'collector:4318' is not an http:// or https:// URL",
    ]
    t = config.from_mapping(
        {"telemetry": {"tracing": True, "exporter": "OTLP", "otlp_endpoint": "http://c:4318"}}
    ).telemetry
    assert (t.tracing, t.exporter, t.otlp_endpoint) == (True, "otlp", "http://c:4318")


def test_tracing_checks_the_standard_otel_variables_it_reads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp,jaeger")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    assert problems({"telemetry": {"tracing": True}}) == [
        "OTEL_TRACES_EXPORTER: 'jaeger' is not one of otlp, console, none",
        "OTEL_EXPORTER_OTLP_PROTOCOL: 'grpc' is not supported; the otel extra exports OTLP "
        "over HTTP (http/protobuf)",
    ]
    # Not tracing: the variables are someone else's business.
    assert not config.from_mapping({}).telemetry.tracing
    # The file's exporter wins over the variable.
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_PROTOCOL")
    config.from_mapping({"telemetry": {"tracing": True, "exporter": "console"}})
