"""W3C Trace Context headers (``traceparent``, ``tracestate``): parsed and kept
as text, without OpenTelemetry.

A submission's headers are stored with its batch whether or not this daemon
traces, so that a daemon that does (another one, or this one after a restart
with tracing on) makes its attempt spans children of the submitter's trace.
Malformed headers are ignored, as the W3C recommendation asks of a receiver:
a bad trace header must never cost a submission.
"""

from __future__ import annotations

import dataclasses
import re

# version-traceid-parentid-flags, lower-case hex; version ff is forbidden, and an
# all-zero trace or parent id is invalid. A future version may append fields
# after the flags ("-..."), which a version-00 reader ignores.
_TRACEPARENT = re.compile(
    r"^(?P<version>[0-9a-f]{2})-(?P<trace_id>[0-9a-f]{32})-(?P<span_id>[0-9a-f]{16})"
    r"-(?P<flags>[0-9a-f]{2})(?P<rest>-.*)?$"
)
# The longest tracestate kept: the recommendation's minimum that a vendor must
# propagate (32 list members of bounded size fit). Longer ones are dropped.
TRACESTATE_MAX = 512
_TRACESTATE_CHARS = re.compile(r"^[\x20-\x7e]*$")  # printable ASCII, as the grammar allows


@dataclasses.dataclass(frozen=True, slots=True)
class TraceContext:
    """A valid ``traceparent`` (normalised to version 00) and its ``tracestate``."""

    traceparent: str
    tracestate: str | None = None

    @property
    def trace_id(self) -> str:
        return self.traceparent[3:35]

    @property
    def span_id(self) -> str:
        return self.traceparent[36:52]


def parse(traceparent: str | None, tracestate: str | None = None) -> TraceContext | None:
    """The context of these header values; None when ``traceparent`` is absent
    or malformed (then ``tracestate`` means nothing and is dropped too)."""
    if not traceparent:
        return None
    m = _TRACEPARENT.match(traceparent.strip())
    if m is None:
        return None
    version = m["version"]
    if version == "ff" or (version == "00" and m["rest"] is not None):
        return None
    if set(m["trace_id"]) == {"0"} or set(m["span_id"]) == {"0"}:
        return None
    state = (tracestate or "").strip()
    if len(state) > TRACESTATE_MAX or not _TRACESTATE_CHARS.match(state):
        state = ""
    return TraceContext(f"00-{m['trace_id']}-{m['span_id']}-{m['flags']}", state or None)


def of_row(traceparent: str | None, tracestate: str | None) -> TraceContext | None:
    """The context stored with a batch (valid by construction), or None."""
    if traceparent is None:
        return None
    return TraceContext(traceparent, tracestate)
