"""Runs one claimed item: timeout, outcome, and hand-off of the outcome to the
outbox, which persists it (fenced, group-committed, shielded from shutdown).

The executor maps every way an attempt can end onto the closed outcome
vocabulary of :mod:`supervisor.states`; nothing is swallowed and nothing is
recorded as "Unknown error": every failed attempt carries its exception type,
message and traceback tail.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import logging
import random
import re
import time
import traceback
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import anyio

from supervisor import key_limits, states
from supervisor.errors import PermanentError, RetryAfter
from supervisor.handlers import Handler
from supervisor.models import Item, compact_json

log = logging.getLogger(__name__)
TRACEBACK_TAIL = 4000
MESSAGE_MAX = 2000
# The longest retry delay stored: a handler's ``RetryAfter(1e300)`` (or a remote
# ``Retry-After`` of years) waits this long instead of overflowing the timestamp.
MAX_RETRY_DELAY_S = 30 * 86400.0
# Lone UTF-16 surrogates (a file name decoded with ``surrogateescape``): valid in
# a Python str, rejected by PostgreSQL's text and jsonb.
_SURROGATE = re.compile("[\ud800-\udfff]")


class StopReason(enum.Enum):
    """Why a running attempt was cancelled from outside."""

    CANCELLED = "cancelled"  # its batch was cancelled or exceeded its failure budget
    # handed back without spending the attempt: the drain deadline, or a claim
    # that never started (drain, pause, a claim whose reply was lost)
    RELEASED = "released"
    TIMEOUT = "timeout"  # ran past its handler's timeout: retried with backoff


# Attempt and OutcomeRecord are built once per item on the hot path: plain slotted
# dataclasses (a frozen one's __init__ costs about four times as much); never mutated.
@dataclasses.dataclass(slots=True)
class Attempt:
    """How one handler attempt ended, ready to be written."""

    outcome: states.Outcome
    result_json: str | None = None
    error: dict[str, Any] | None = None
    delay_s: float = 0.0
    # the limit key this attempt pauses for delay_s (backpressure per key): the
    # outcome is then RELEASED, the attempt not counted
    throttle_key: str | None = None


# An item an attempt adds to its batch: its key, payload (JSON text) and limit key
# (None unless its handler has a key_limit).
Added = tuple[str | None, str, str | None]


@dataclasses.dataclass(frozen=True, slots=True)
class CostCorrection:
    """An attempt's reported cost minus what its claim charged its key's budget,
    for the budget period that charged it."""

    limit_key: str
    period_start: datetime
    delta: float


@dataclasses.dataclass(slots=True)
class OutcomeRecord:
    """One fenced write: the outcome of attempt ``attempt`` under ``lease``."""

    item_id: int
    batch_id: str
    attempt: int
    lease: str
    handler: str
    outcome: states.Outcome
    result_json: str | None
    error_json: str | None
    delay_s: float
    duration_s: float
    # the limit key paused for delay_s, in the outcome write's transaction
    throttle_key: str | None = None
    # items the attempt added to its batch: written with a succeeded outcome, in
    # its transaction (see supervisor.outbox)
    added: Sequence[Added] = ()
    # the key budget correction its reported cost asks for (see supervisor.outbox)
    cost_correction: CostCorrection | None = None


def storable_text(text: str) -> str:
    """``text`` with what PostgreSQL cannot store spelled out: NUL as ``\\u0000``
    and a lone surrogate as ``\\udcff`` (backslash escapes, readable text)."""
    text = text.replace("\x00", "\\u0000")
    return _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def clamp_delay(delay_s: float) -> float:
    """A retry delay PostgreSQL can add to now(): NaN and negatives are 0, and
    anything longer than MAX_RETRY_DELAY_S is MAX_RETRY_DELAY_S."""
    if not delay_s >= 0.0:  # also NaN
        return 0.0
    return min(delay_s, MAX_RETRY_DELAY_S)


def _clean(text: str, limit: int) -> str:
    # Keep the tail, where the cause usually is.
    text = storable_text(text)
    return text if len(text) <= limit else "…" + text[-limit:]


def error_entry(
    attempt: int, type_name: str, message: str, tb: str | None, worker: str
) -> dict[str, Any]:
    return {
        "attempt": attempt,
        "type": type_name,
        "message": _clean(message, MESSAGE_MAX) or type_name,
        "traceback": _clean(tb, TRACEBACK_TAIL) if tb else None,
        "at": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
        "worker": worker,
    }


_ESCAPED_NUL = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")  # a NUL, not an escaped backslash


def encode_result(value: Any) -> str:
    """JSON text PostgreSQL can store; raises PermanentError otherwise."""
    try:
        text = compact_json(value)
    except (TypeError, ValueError) as exc:
        raise PermanentError(f"handler result is not JSON-serialisable: {exc}") from exc
    if "\\u0000" in text and _ESCAPED_NUL.search(text):
        raise PermanentError(
            "handler result contains a NUL character (\\u0000), which PostgreSQL cannot store"
        )
    if _SURROGATE.search(text):
        # Inside a JSON string a lone surrogate becomes the escaped text "\\udcff".
        text = _SURROGATE.sub(lambda m: f"\\\\u{ord(m.group()):04x}", text)
    return text


async def attempt(handler: Handler, item: Item, worker: str) -> Attempt:
    """Run one attempt of ``handler`` on ``item`` and classify how it ended.

    No timeout here: the caller runs this inside a cancel scope with the handler's
    deadline, and knows why that scope was cancelled (deadline, batch stop,
    drain): see :func:`timed_out` and :func:`cancelled_attempt`.
    """
    try:
        value = await handler.run(item)
        return Attempt(states.Outcome.SUCCEEDED, result_json=encode_result(value))
    except anyio.get_cancelled_exc_class():
        raise
    except PermanentError as exc:
        return Attempt(
            states.Outcome.FAILED,
            error=error_entry(
                item.attempt, type(exc).__name__, str(exc), traceback.format_exc(), worker
            ),
        )
    except RetryAfter as exc:
        if exc.scope == "key" and (
            throttled := _throttled(handler, item, exc.seconds, str(exc), worker)
        ):
            return throttled
        return Attempt(
            states.Outcome.RETRY,
            error=error_entry(item.attempt, "RetryAfter", str(exc), None, worker),
            delay_s=exc.seconds,
        )
    except BaseException as exc:
        # Any other handler failure is retried with backoff: also SystemExit,
        # KeyboardInterrupt and other BaseExceptions a handler raises (a poison
        # input costs one attempt, never the daemon). Cancellation was re-raised above.
        # A handler's exception may carry the delay the remote side asked for
        # (the http handler's Retry-After); 0 is a valid request to retry now.
        asked = getattr(exc, "retry_after", None)
        if getattr(exc, "status", None) == 429 and isinstance(asked, int | float):
            # A 429 with Retry-After to a handler with a key_limit: the key is throttled.
            if throttled := _throttled(handler, item, float(asked), str(exc), worker):
                return throttled
        delay = (
            float(asked)
            if isinstance(asked, int | float)
            else handler.config.retry_backoff.delay(item.attempt, random.random())
        )
        return Attempt(
            states.Outcome.RETRY,
            error=error_entry(
                item.attempt,
                type(exc).__name__,
                str(exc) or repr(exc),
                traceback.format_exc(),
                worker,
            ),
            delay_s=delay,
        )


def _throttled(
    handler: Handler, item: Item, seconds: float, why: str, worker: str
) -> Attempt | None:
    """The attempt that pauses its item's limit key for ``seconds``: released (its
    attempt given back) and requeued for then; None when the handler has no
    key_limit (the caller retries the item instead)."""
    kl = handler.config.key_limit
    if kl is None:
        return None
    try:
        limit_key = key_limits.key_of(item.payload, kl.tokens)
    except ValueError:
        return None  # refused at submission; cannot happen for a stored item
    delay = clamp_delay(seconds)
    return Attempt(
        states.Outcome.RELEASED,
        error=error_entry(
            item.attempt,
            "Throttled",
            f"{why}: limit key {limit_key!r} throttled for {delay:g}s: every queued item "
            "of this key waits until then; this attempt is not counted against max_attempts",
            None,
            worker,
        ),
        delay_s=delay,
        throttle_key=limit_key,
    )


def timed_out(handler: Handler, item: Item, worker: str) -> Attempt:
    """The attempt ran past the handler's ``timeout``: retried with backoff."""
    hcfg = handler.config
    return Attempt(
        states.Outcome.RETRY,
        error=error_entry(
            item.attempt,
            "Timeout",
            f"attempt exceeded the handler timeout of {hcfg.timeout_s:g}s",
            None,
            worker,
        ),
        delay_s=hcfg.retry_backoff.delay(item.attempt, random.random()),
    )


async def invoke(handler: Handler, item: Item, worker: str) -> Attempt:
    """:func:`attempt` under the handler's timeout (for callers without a scope
    of their own, such as completion callbacks)."""
    with anyio.move_on_after(handler.config.timeout_s) as scope:
        return await attempt(handler, item, worker)
    assert scope.cancelled_caught
    return timed_out(handler, item, worker)


def cancelled_attempt(
    item: Item, reason: StopReason, worker: str, ran_s: float | None = None
) -> Attempt:
    """The outcome of an attempt stopped from outside, by reason. ``ran_s``: how
    long its handler had run (None: it never started, so it leaves no trace)."""
    if reason is StopReason.RELEASED:
        if ran_s is None:
            return Attempt(states.Outcome.RELEASED)
        return Attempt(
            states.Outcome.RELEASED,
            error=error_entry(
                item.attempt,
                "Released",
                f"the daemon was shutting down: this attempt was stopped after {ran_s:.1f}s "
                "of work and handed back (not counted against max_attempts)",
                None,
                worker,
            ),
        )
    return Attempt(
        states.Outcome.CANCELLED,
        error=error_entry(
            item.attempt,
            "Cancelled",
            "the batch was stopped while this attempt was running",
            None,
            worker,
        ),
    )


def rejected(rec: OutcomeRecord, exc: Exception, worker: str) -> OutcomeRecord:
    """``rec`` replaced by a failed attempt (retried while attempts remain) saying
    that PostgreSQL rejected the outcome it had, and why."""
    error = error_entry(
        rec.attempt,
        "OutcomeRejected",
        f"the database rejected this attempt's outcome ({rec.outcome.value}) and it was "
        f"not stored: {type(exc).__name__}: {exc}",
        None,
        worker,
    )
    return dataclasses.replace(
        rec,
        outcome=states.Outcome.RETRY,
        result_json=None,
        error_json=json.dumps(error),
        delay_s=1.0,
        throttle_key=None,  # a retry pauses nothing (the pause may be what was rejected)
        added=(),  # a retry adds nothing (its next attempt adds them again)
    )


def too_many_items(rec: OutcomeRecord, total: int, max_items: int, worker: str) -> OutcomeRecord:
    """``rec`` replaced by a permanent failure: the items it adds would take its
    batch past ``max_items``, so none were added (another attempt would add the
    same)."""
    error = error_entry(
        rec.attempt,
        "MaxItemsExceeded",
        f"this attempt added {len(rec.added)} items to its batch, which has {total}; "
        f"that would pass the batch's max_items ({max_items}), so none were added",
        None,
        worker,
    )
    return dataclasses.replace(
        rec,
        outcome=states.Outcome.FAILED,
        result_json=None,
        error_json=json.dumps(error),
        added=(),
    )


def unstarted_release(
    item_id: int, batch_id: str, attempt: int, handler: str, lease: str
) -> OutcomeRecord:
    """The write that hands back a claim whose handler never started: released,
    the attempt not counted, no error entry (nothing happened to it)."""
    return OutcomeRecord(
        item_id=item_id,
        batch_id=batch_id,
        attempt=attempt,
        lease=lease,
        handler=handler,
        outcome=states.Outcome.RELEASED,
        result_json=None,
        error_json=None,
        delay_s=0.0,
        duration_s=0.0,
    )


def record(
    item: Item,
    lease: str,
    attempt: Attempt,
    started: float,
    added: Sequence[Added] = (),
    cost_correction: CostCorrection | None = None,
) -> OutcomeRecord:
    """The write of an attempt's outcome; what it added goes only with a success."""
    return OutcomeRecord(
        item_id=int(item.id),
        batch_id=item.batch_id,
        attempt=item.attempt,
        lease=lease,
        handler=item.handler,
        outcome=attempt.outcome,
        result_json=attempt.result_json,
        error_json=json.dumps(attempt.error) if attempt.error is not None else None,
        delay_s=clamp_delay(attempt.delay_s),
        duration_s=time.monotonic() - started,
        throttle_key=attempt.throttle_key,
        added=added if attempt.outcome is states.Outcome.SUCCEEDED else (),
        cost_correction=cost_correction,
    )
