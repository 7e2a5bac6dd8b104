"""Which W3C trace headers a submission keeps (supervisor.tracecontext): valid ones,
normalised; anything malformed is dropped, never refused."""

from __future__ import annotations

import pytest

from supervisor import tracecontext

TP = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def test_a_valid_traceparent_is_kept_with_its_tracestate() -> None:
    tc = tracecontext.parse(TP, "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE")
    assert tc == tracecontext.TraceContext(TP, "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE")
    assert tc.trace_id == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert tc.span_id == "00f067aa0ba902b7"


def test_a_future_version_is_read_as_version_00_without_its_extra_fields() -> None:
    tc = tracecontext.parse(TP.replace("00-", "cc-", 1) + "-what-the-future-adds")
    assert tc == tracecontext.TraceContext(TP)


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "garbage",
        TP.upper(),  # hex must be lower-case
        TP.replace("00-", "ff-", 1),  # version ff is forbidden
        TP + "-extra",  # version 00 has exactly four fields
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",  # all-zero trace id
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",  # all-zero parent id
        "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",  # short trace id
    ],
)
def test_a_malformed_traceparent_is_ignored_with_its_tracestate(bad: str) -> None:
    assert tracecontext.parse(bad, "rojo=1") is None


def test_a_tracestate_too_long_or_not_printable_is_dropped_alone() -> None:
    long = "a=" + "x" * tracecontext.TRACESTATE_MAX
    assert tracecontext.parse(TP, long) == tracecontext.TraceContext(TP)
    assert tracecontext.parse(TP, "a=\x00") == tracecontext.TraceContext(TP)
    assert tracecontext.parse(TP, "  ") == tracecontext.TraceContext(TP)
    assert tracecontext.parse(None, "a=1") is None
