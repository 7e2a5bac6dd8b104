"""Tracing through real daemons: spans exported over OTLP/HTTP to a collector this
test runs, and the daemon without OpenTelemetry installed.

A traced daemon is configured only as an operator would: ``[telemetry] tracing =
true`` and the standard OTEL_* variables pointing its OTLP exporter at a local
HTTP server that decodes the protobuf export requests (the otel extra's own
opentelemetry-proto). The same server is the http handler's endpoint, so one
test sees both the attempt spans and the ``traceparent`` the handler sent. The
daemon "without the extra" runs with a ``sitecustomize`` that refuses every
``opentelemetry`` import and writes down each one tried.
"""

from __future__ import annotations

import pathlib
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from supervisor.client import Client
from tests.daemon import DEFAULT_HANDLERS, ROOT, Daemon, wait_for
from tests.pgharness import free_port
from tests.test_api import db_rows

TERMINAL = ("completed", "completed_with_errors", "failed", "cancelled")
TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_ID = "b7ad6b7169203331"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"


class Collector:
    """An OTLP/HTTP trace receiver (POST /v1/traces) that is also an http
    handler's endpoint (POST /hook, answered 200 and recorded)."""

    def __init__(self) -> None:
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

        self.spans: list[dict[str, Any]] = []
        self.hook_headers: list[dict[str, str]] = []
        self._lock = threading.Lock()
        me = self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if self.path == "/v1/traces":
                    req = trace_service_pb2.ExportTraceServiceRequest()
                    req.ParseFromString(body)
                    with me._lock:
                        me.spans += [
                            span_dict(s, rs.resource)
                            for rs in req.resource_spans
                            for ss in rs.scope_spans
                            for s in ss.spans
                        ]
                    payload = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
                    content_type = "application/x-protobuf"
                else:
                    with me._lock:
                        me.hook_headers.append({k.lower(): v for k, v in self.headers.items()})
                    payload, content_type = b'{"ok": true}', "application/json"
                self.send_response(200)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # keep test output quiet

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def named(self, name: str) -> list[dict[str, Any]]:
        with self._lock:
            return [s for s in self.spans if s["name"] == name]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(10)


def span_dict(s: Any, resource: Any) -> dict[str, Any]:
    def value(v: Any) -> Any:
        return getattr(v, v.WhichOneof("value")) if v.WhichOneof("value") else None

    return {
        "name": s.name,
        "trace_id": s.trace_id.hex(),
        "span_id": s.span_id.hex(),
        "parent_span_id": s.parent_span_id.hex(),
        "kind": s.kind,
        "status_code": s.status.code,  # 0 unset, 1 ok, 2 error
        "status_message": s.status.message,
        "attributes": {a.key: value(a.value) for a in s.attributes},
        "events": [e.name for e in s.events],
        "resource": {a.key: value(a.value) for a in resource.attributes},
    }


@pytest.fixture
def collector() -> Iterator[Collector]:
    pytest.importorskip("opentelemetry.proto", reason="the otel extra is not installed")
    c = Collector()
    try:
        yield c
    finally:
        c.close()


def traced_env(collector: Collector) -> dict[str, str]:
    return {
        "OTEL_EXPORTER_OTLP_ENDPOINT": collector.url,
        "OTEL_SERVICE_NAME": "bsv-under-test",
        "OTEL_BSP_SCHEDULE_DELAY": "50",  # export within 50 ms, not the default 5 s
    }


def submit(d: Daemon, handler: str, items: list[Any], **fields: Any) -> dict[str, Any]:
    status, body, _ = d.api(
        "POST",
        "/v1/batches",
        {"handler": handler, "items": items, **fields},
        headers={"traceparent": TRACEPARENT, "tracestate": "congo=t61rcWkgMzE"},
    )
    assert status == 201, (status, body)
    return dict(body)


def test_attempt_spans_join_the_submitted_trace_and_reach_the_http_endpoint(
    daemons: Any, collector: Collector
) -> None:
    handlers = {
        **DEFAULT_HANDLERS,
        "hook": {"type": "http", "url": collector.url + "/hook", "timeout": "5s"},
    }
    d = daemons(
        handlers=handlers,
        extra={"telemetry": {"tracing": True}},
        env=traced_env(collector),
    )
    ok = submit(d, "hook", [{"payload": {"n": 1}, "key": "first"}], on_complete="cb_records")
    bad = submit(d, "permanent", [{"n": 2}])
    d.wait_status(ok["id"], TERMINAL)
    d.wait_status(bad["id"], TERMINAL)

    (attempt,) = wait_for(lambda: collector.named("batch-supervisor.attempt hook"), what="span")
    assert attempt["trace_id"] == TRACE_ID and attempt["parent_span_id"] == PARENT_ID
    assert attempt["kind"] == 5  # SPAN_KIND_CONSUMER
    (item,) = d.items(ok["id"])
    assert attempt["attributes"] == {
        "batch_supervisor.batch_id": ok["id"],
        "batch_supervisor.item_id": str(item["id"]),
        "batch_supervisor.item_key": "first",
        "batch_supervisor.attempt": 1,
        "batch_supervisor.handler": "hook",
        "batch_supervisor.outcome": "succeeded",
    }
    assert attempt["status_code"] == 0
    assert attempt["resource"]["service.name"] == "bsv-under-test"
    assert attempt["resource"]["service.instance.id"] == "d1"
    # The endpoint was called with the attempt span as its parent, tracestate kept.
    (headers,) = collector.hook_headers
    assert headers["traceparent"] == f"00-{TRACE_ID}-{attempt['span_id']}-01"
    assert headers["tracestate"] == "congo=t61rcWkgMzE"

    (failed,) = wait_for(lambda: collector.named("batch-supervisor.attempt permanent"))
    assert failed["trace_id"] == TRACE_ID
    assert failed["status_code"] == 2 and failed["status_message"] == "cannot process {'n': 2}"
    assert failed["attributes"]["batch_supervisor.outcome"] == "failed"
    assert failed["attributes"]["error.type"] == "PermanentError"
    assert failed["events"] == ["exception"]

    # The completion callback is in the submitter's trace too.
    (cb,) = wait_for(lambda: collector.named("batch-supervisor.callback cb_records"))
    assert cb["trace_id"] == TRACE_ID and cb["parent_span_id"] == PARENT_ID
    assert cb["attributes"]["batch_supervisor.outcome"] == "succeeded"


def test_a_batch_submitted_before_a_restart_is_traced_by_the_next_daemon(
    daemons: Any, collector: Collector, db_url: str
) -> None:
    """The context lives with the batch: a daemon that did not trace took the
    submission; the traced daemon that runs it later still joins its trace."""
    first = daemons("d1", worker={"concurrency": 1})
    sleeper = submit(first, "sleeper", [{"sleep": 3600}])
    waiting = submit(first, "echo", [{"n": 1}], priority=-1)
    first.wait_status(sleeper["id"], "running")
    first.kill()
    (row,) = db_rows(
        db_url,
        "SELECT traceparent, tracestate FROM supervisor.batches WHERE id = $1",
        uuid.UUID(waiting["id"]),
    )
    assert (row["traceparent"], row["tracestate"]) == (TRACEPARENT, "congo=t61rcWkgMzE")
    second = daemons("d2", extra={"telemetry": {"tracing": True}}, env=traced_env(collector))
    second.wait_status(waiting["id"], TERMINAL)
    (span,) = wait_for(lambda: collector.named("batch-supervisor.attempt echo"))
    assert (span["trace_id"], span["parent_span_id"]) == (TRACE_ID, PARENT_ID)


BLOCKER = """\
import os, sys

class _NoOpenTelemetry:
    # The otel extra is "not installed": every import of it fails, and is written down.
    def find_spec(self, name, path=None, target=None):
        if name == "opentelemetry" or name.startswith("opentelemetry."):
            with open(os.environ["BSV_TEST_OTEL_IMPORTS"], "a") as f:
                f.write(name + "\\n")
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, _NoOpenTelemetry())
"""


def without_otel(tmp_path: pathlib.Path) -> tuple[dict[str, str], pathlib.Path]:
    site = tmp_path / "no-otel"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER)
    tried = tmp_path / "otel-imports.txt"
    return {"PYTHONPATH": f"{site}:{ROOT}", "BSV_TEST_OTEL_IMPORTS": str(tried)}, tried


def test_without_the_extra_the_daemon_runs_stores_traceparent_and_never_imports_it(
    daemons: Any, tmp_path: pathlib.Path, db_url: str
) -> None:
    env, tried = without_otel(tmp_path)
    d = daemons(env=env)
    b = submit(d, "echo", [{"n": 1}])
    assert d.wait_status(b["id"], TERMINAL)["status"] == "completed"
    # A malformed traceparent is ignored, not refused.
    status, junk, _ = d.api(
        "POST", "/v1/batches", {"handler": "echo", "items": [1]}, {"traceparent": "junk"}
    )
    assert status == 201, junk
    # The Python client sends them as headers too.
    with Client(d.url) as bsv:
        via_client = bsv.submit("echo", [1], traceparent=TRACEPARENT, tracestate="a=1").id
    rows = db_rows(
        db_url,
        "SELECT id::text, traceparent, tracestate FROM supervisor.batches"
        " WHERE id = ANY ($1::uuid[])",
        [uuid.UUID(b["id"]), uuid.UUID(junk["id"]), uuid.UUID(via_client)],
    )
    assert {r["id"]: (r["traceparent"], r["tracestate"]) for r in rows} == {
        b["id"]: (TRACEPARENT, "congo=t61rcWkgMzE"),
        junk["id"]: (None, None),
        via_client: (TRACEPARENT, "a=1"),
    }
    assert d.stop() == 0
    assert not tried.exists(), tried.read_text()  # nothing even tried to import it


def test_tracing_without_the_extra_refuses_to_start_naming_the_extra(
    daemons: Any, tmp_path: pathlib.Path
) -> None:
    env, tried = without_otel(tmp_path)
    d = daemons(start=False, extra={"telemetry": {"tracing": True}}, env=env)
    d.start(wait=False)
    assert d.wait_exit(30) == 78  # EX_CONFIG, before anything started
    log = d.log()
    assert "telemetry.tracing" in log and "pip install 'batch-supervisor[otel]'" in log, log
    assert "app.ready" not in log
    assert tried.read_text().split()  # it looked for the extra, and found nothing


def test_an_unreachable_collector_neither_fails_attempts_nor_holds_the_exit(
    daemons: Any,
) -> None:
    pytest.importorskip("opentelemetry.sdk.trace", reason="the otel extra is not installed")
    d = daemons(
        extra={"telemetry": {"tracing": True, "otlp_endpoint": f"http://127.0.0.1:{free_port()}"}},
        env={"OTEL_BSP_SCHEDULE_DELAY": "50"},
    )
    b = submit(d, "echo", [{"n": 1}, {"n": 2}])
    assert d.wait_status(b["id"], TERMINAL)["status"] == "completed"
    started = time.monotonic()
    assert d.stop(timeout=20) == 0
    # The flush at exit gives up after app.TRACE_FLUSH_TIMEOUT_S (5 s), plus the drain.
    assert time.monotonic() - started < 15, d.log()
