"""OpenTelemetry tracing: one span per attempt and per completion callback.

Imported only when ``[telemetry] tracing`` is on (by ``app.py``), so a daemon
installed without the otel extra never loads OpenTelemetry; the dispatcher and
the callbacks hold ``None`` instead of a :class:`Tracer` and pay one ``is None``
check per attempt. A span is the child of the W3C trace context its batch was
submitted under (stored with the batch, see :mod:`supervisor.tracecontext`), so
every attempt of a submission lands in the submitter's trace, on whichever daemon
runs it and however often it restarts. While it runs, the span is the current
span (handlers' own OpenTelemetry spans nest under it) and ``item.trace`` carries
its context, which the http handler sends on as ``traceparent``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from supervisor import __version__, states, tracecontext
from supervisor.config import TelemetryConfig
from supervisor.executor import Attempt
from supervisor.models import Item

log = logging.getLogger(__name__)
SCOPE = "batch-supervisor"
DEFAULT_SERVICE_NAME = "batch-supervisor"
_PROPAGATOR = TraceContextTextMapPropagator()
# Attribute names: ours under one prefix, error.type from the semantic conventions.
BATCH_ID = "batch_supervisor.batch_id"
ITEM_ID = "batch_supervisor.item_id"
ITEM_KEY = "batch_supervisor.item_key"
ATTEMPT = "batch_supervisor.attempt"
HANDLER = "batch_supervisor.handler"
OUTCOME = "batch_supervisor.outcome"
ERROR_TYPE = "error.type"
_FAILED = frozenset({states.Outcome.RETRY, states.Outcome.FAILED})


@dataclasses.dataclass(slots=True)
class Traced:
    """A started span, the item that carries its context, and the context token
    that made it current (restored when it ends)."""

    span: trace.Span
    item: Item
    token: object


class Tracer:
    """Starts and ends the daemon's spans on one TracerProvider."""

    def __init__(self, provider: TracerProvider) -> None:
        self._provider = provider
        self._tracer = provider.get_tracer(SCOPE, __version__)

    @classmethod
    def configured(cls, t: TelemetryConfig, worker: str) -> Tracer:
        """The daemon's tracer as ``[telemetry]`` and the standard OTEL_* variables
        say, registered as the process's tracer provider (so handlers' own spans go
        to the same exporter). Sampling follows OTEL_TRACES_SAMPLER (default: a
        sampled parent decides, else every trace is kept); batching follows OTEL_BSP_*."""
        name = t.service_name or os.environ.get("OTEL_SERVICE_NAME") or DEFAULT_SERVICE_NAME
        resource = Resource.create(
            {
                "service.name": name,
                "service.version": __version__,
                "service.instance.id": worker,
            }
        )
        provider = TracerProvider(resource=resource, shutdown_on_exit=False)
        names = [t.exporter] if t.exporter else exporter_names(os.environ)
        for exporter in (_exporter(n, t) for n in names):
            if exporter is not None:
                provider.add_span_processor(BatchSpanProcessor(exporter))
        trace.set_tracer_provider(provider)
        log.info("tracing.on service=%s exporters=%s", name, ",".join(names))
        return cls(provider)

    def shutdown(self) -> None:
        """Export what is buffered and stop (blocking: run it in a thread)."""
        self._provider.shutdown()

    def start(self, what: str, item: Item) -> Traced:
        """A span ``batch-supervisor.<what> <handler>`` for this attempt of ``item``,
        child of ``item.trace`` (its batch's submission context; None: a new trace),
        made current; the returned item carries the span's own context."""
        parent = None
        if item.trace is not None:
            carrier = {"traceparent": item.trace.traceparent}
            if item.trace.tracestate:
                carrier["tracestate"] = item.trace.tracestate
            parent = _PROPAGATOR.extract(carrier)
        attributes: dict[str, Any] = {
            BATCH_ID: item.batch_id,
            ITEM_ID: item.id,
            ATTEMPT: item.attempt,
            HANDLER: item.handler,
        }
        if item.key is not None:
            attributes[ITEM_KEY] = item.key
        span = self._tracer.start_span(
            f"batch-supervisor.{what} {item.handler}",
            context=parent,
            kind=trace.SpanKind.CONSUMER,
            attributes=attributes,
        )
        token = otel_context.attach(trace.set_span_in_context(span))
        return Traced(span, dataclasses.replace(item, trace=context_of(span)), token)

    def end_attempt(self, traced: Traced, result: Attempt | None) -> None:
        """End an attempt's span with its outcome: status error when it failed
        (retried or not), with the error's type and an exception event."""
        if result is None:
            self.end(traced, "unknown", None, failed=True)
        else:
            self.end(traced, result.outcome.value, result.error, failed=result.outcome in _FAILED)

    def end(
        self, traced: Traced, outcome: str, error: Mapping[str, Any] | None, *, failed: bool
    ) -> None:
        span = traced.span
        try:
            span.set_attribute(OUTCOME, outcome)
            if error is not None:
                span.set_attribute(ERROR_TYPE, str(error.get("type")))
            if failed:
                message = str(error.get("message")) if error is not None else outcome
                span.set_status(trace.Status(trace.StatusCode.ERROR, message))
                if error is not None:
                    span.add_event(
                        "exception",
                        {
                            "exception.type": str(error.get("type")),
                            "exception.message": message,
                            "exception.stacktrace": str(error.get("traceback") or ""),
                        },
                    )
            span.end()
        finally:
            otel_context.detach(traced.token)  # type: ignore[arg-type]


def context_of(span: trace.Span) -> tracecontext.TraceContext:
    """The W3C context a span passes on (its trace, itself as the parent)."""
    sc = span.get_span_context()
    state = sc.trace_state.to_header() if sc.trace_state else None
    return tracecontext.TraceContext(
        f"00-{sc.trace_id:032x}-{sc.span_id:016x}-{int(sc.trace_flags):02x}", state or None
    )


def exporter_names(env: Mapping[str, str]) -> list[str]:
    """OTEL_TRACES_EXPORTER as a list (default: otlp)."""
    raw = env.get("OTEL_TRACES_EXPORTER") or "otlp"
    return [n.strip().lower() for n in raw.split(",") if n.strip()]


def _exporter(name: str, t: TelemetryConfig) -> SpanExporter | None:
    if name == "console":
        return ConsoleSpanExporter()
    if name != "otlp":
        return None  # "none"; anything else was refused with the configuration
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    if t.otlp_endpoint:
        return OTLPSpanExporter(endpoint=t.otlp_endpoint.rstrip("/") + "/v1/traces")
    return OTLPSpanExporter()  # OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT, headers, timeout
