"""The attempt spans of supervisor.otel, in-process on the SDK's InMemorySpanExporter:
parent, attributes, status, and the traceparent an http handler sends on."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from aiohttp import web

pytest.importorskip("opentelemetry.sdk.trace", reason="the otel extra is not installed")

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from supervisor import executor, otel, states, tracecontext
from supervisor.config import HandlerConfig
from supervisor.errors import PermanentError
from supervisor.handlers.http import HttpHandler
from supervisor.models import Item

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
SUBMITTED = tracecontext.TraceContext(f"00-{TRACE_ID}-{PARENT_ID}-01", "vendor=opaque")


@pytest.fixture
def spans() -> tuple[otel.Tracer, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return otel.Tracer(provider), exporter


def item(trace_ctx: tracecontext.TraceContext | None = SUBMITTED, key: str | None = "k1") -> Item:
    return Item(
        id="42",
        batch_id="6c2f0d7e-0000-4000-8000-000000000001",
        key=key,
        payload={"n": 1},
        attempt=2,
        max_attempts=3,
        handler="hook",
        batch_metadata={},
        trace=trace_ctx,
    )


def only(exporter: InMemorySpanExporter) -> ReadableSpan:
    (span,) = exporter.get_finished_spans()
    return span


def test_an_attempt_span_is_a_child_of_the_submission_with_the_item_attributes(
    spans: tuple[otel.Tracer, InMemorySpanExporter],
) -> None:
    tracer, exporter = spans
    traced = tracer.start("attempt", item())
    tracer.end_attempt(traced, executor.Attempt(states.Outcome.SUCCEEDED, result_json="1"))
    span = only(exporter)
    assert span.name == "batch-supervisor.attempt hook"
    assert span.kind is trace.SpanKind.CONSUMER
    assert format(span.context.trace_id, "032x") == TRACE_ID
    assert span.parent is not None and format(span.parent.span_id, "016x") == PARENT_ID
    assert dict(span.attributes or {}) == {
        otel.BATCH_ID: "6c2f0d7e-0000-4000-8000-000000000001",
        otel.ITEM_ID: "42",
        otel.ITEM_KEY: "k1",
        otel.ATTEMPT: 2,
        otel.HANDLER: "hook",
        otel.OUTCOME: "succeeded",
    }
    assert span.status.status_code is trace.StatusCode.UNSET
    # The item handed to the handler carries the span's own context, tracestate kept.
    assert traced.item.trace == tracecontext.TraceContext(
        f"00-{TRACE_ID}-{span.context.span_id:016x}-01", "vendor=opaque"
    )


def test_a_failed_attempt_span_has_error_status_type_and_exception_event(
    spans: tuple[otel.Tracer, InMemorySpanExporter],
) -> None:
    tracer, exporter = spans

    async def fails(it: Item) -> Any:
        raise PermanentError("no such account")

    handler: Any = type("H", (), {"run": staticmethod(fails), "config": None})()
    traced = tracer.start("attempt", item(key=None))
    result = anyio.run(executor.attempt, handler, traced.item, "w1")
    tracer.end_attempt(traced, result)
    span = only(exporter)
    assert span.status.status_code is trace.StatusCode.ERROR
    assert span.status.description == "no such account"
    assert span.attributes is not None
    assert span.attributes[otel.OUTCOME] == "failed"
    assert span.attributes[otel.ERROR_TYPE] == "PermanentError"
    assert otel.ITEM_KEY not in span.attributes  # no key, no attribute
    (event,) = span.events
    assert event.name == "exception" and event.attributes is not None
    assert event.attributes["exception.type"] == "PermanentError"
    assert "no such account" in str(event.attributes["exception.stacktrace"])


def test_a_timed_out_attempt_is_an_error_of_type_timeout(
    spans: tuple[otel.Tracer, InMemorySpanExporter],
) -> None:
    tracer, exporter = spans
    hcfg = HandlerConfig(name="hook", type="http", url="http://127.0.0.1:9/", timeout_s=1.0)
    handler: Any = type("H", (), {"config": hcfg})()
    traced = tracer.start("attempt", item())
    tracer.end_attempt(traced, executor.timed_out(handler, traced.item, "w1"))
    span = only(exporter)
    assert span.status.status_code is trace.StatusCode.ERROR
    assert span.attributes is not None
    assert (span.attributes[otel.OUTCOME], span.attributes[otel.ERROR_TYPE]) == ("retry", "Timeout")


def test_without_a_submitted_context_the_attempt_starts_a_new_trace(
    spans: tuple[otel.Tracer, InMemorySpanExporter],
) -> None:
    tracer, exporter = spans
    traced = tracer.start("attempt", item(trace_ctx=None))
    tracer.end_attempt(traced, executor.Attempt(states.Outcome.RELEASED))
    span = only(exporter)
    assert span.parent is None
    assert span.status.status_code is trace.StatusCode.UNSET  # released: not an error


def test_the_span_is_current_while_the_handler_runs_and_not_after(
    spans: tuple[otel.Tracer, InMemorySpanExporter],
) -> None:
    """So a handler's own OpenTelemetry spans nest under its attempt."""
    tracer, exporter = spans
    before = trace.get_current_span()
    traced = tracer.start("attempt", item())
    assert trace.get_current_span() is traced.span
    tracer.end_attempt(traced, None)  # no outcome at all: still ended, as an error
    assert trace.get_current_span() is before
    span = only(exporter)
    assert span.status.status_code is trace.StatusCode.ERROR
    assert span.attributes is not None and span.attributes[otel.OUTCOME] == "unknown"


def test_an_http_handler_sends_the_attempt_span_as_traceparent(
    spans: tuple[otel.Tracer, InMemorySpanExporter],
) -> None:
    """A real aiohttp server receives the attempt span's context, tracestate included."""
    tracer, exporter = spans
    seen: list[dict[str, str]] = []

    async def hook(request: web.Request) -> web.Response:
        seen.append(dict(request.headers))
        return web.json_response({"ok": True})

    async def go() -> executor.Attempt:
        app = web.Application()
        app.router.add_post("/hook", hook)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        handler = HttpHandler(
            HandlerConfig(name="hook", type="http", url=f"http://127.0.0.1:{port}/hook")
        )
        try:
            traced = tracer.start("attempt", item())
            result = await executor.attempt(handler, traced.item, "w1")
            tracer.end_attempt(traced, result)
            return result
        finally:
            await handler.aclose()
            await runner.cleanup()

    result = anyio.run(go)
    assert result.outcome is states.Outcome.SUCCEEDED
    span = only(exporter)
    (headers,) = seen
    assert headers["traceparent"] == f"00-{TRACE_ID}-{span.context.span_id:016x}-01"
    assert headers["tracestate"] == "vendor=opaque"


def test_an_http_handler_sends_no_trace_headers_when_not_tracing() -> None:
    handler = HttpHandler(HandlerConfig(name="hook", type="http", url="http://127.0.0.1:9/"))
    headers = handler._request_headers(b"{}", 0, item(trace_ctx=None).trace)
    assert not {"traceparent", "tracestate"} & {k.lower() for k in headers}


def test_an_exec_command_gets_the_attempt_span_in_traceparent_only_when_tracing() -> None:
    from supervisor.handlers.exec import ExecHandler

    handler = ExecHandler(HandlerConfig(name="cmd", type="exec", command=("true",)))
    traced = handler._env(item(), "token")
    assert (traced["TRACEPARENT"], traced["TRACESTATE"]) == (SUBMITTED.traceparent, "vendor=opaque")
    assert not {"TRACEPARENT", "TRACESTATE"} & set(handler._env(item(trace_ctx=None), "token"))
