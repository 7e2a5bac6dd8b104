"""What the executor makes storable and how it bounds what it stores
(supervisor.executor): the pure functions behind an item's error history."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import anyio
import pytest

from supervisor import executor, states
from supervisor.config import HandlerConfig, KeyLimitConfig
from supervisor.errors import PermanentError, RetryAfter
from supervisor.executor import StopReason
from supervisor.handlers.http import HTTPStatusError
from supervisor.models import Item


def item(attempt: int = 2) -> Item:
    return Item(
        id="1",
        batch_id="b",
        key=None,
        payload=None,
        attempt=attempt,
        max_attempts=3,
        handler="h",
        batch_metadata={},
    )


def test_text_postgresql_cannot_store_is_spelled_out() -> None:
    assert executor.storable_text("a\x00b") == "a\\u0000b"
    assert executor.storable_text("file-\udcff.txt") == "file-\\udcff.txt"
    assert executor.storable_text("plain") == "plain"


@pytest.mark.parametrize(
    ("given", "stored"),
    [(1.5, 1.5), (-3.0, 0.0), (math.nan, 0.0), (1e300, executor.MAX_RETRY_DELAY_S)],
)
def test_delays_are_clamped(given: float, stored: float) -> None:
    assert executor.clamp_delay(given) == stored


def test_an_error_entry_keeps_the_tail_and_never_an_empty_message() -> None:
    long = "x" * 5000 + "the cause"
    entry = executor.error_entry(2, "ValueError", long, "tb\x00", "w1")
    assert entry["message"].endswith("the cause") and entry["message"].startswith("…")
    assert len(entry["message"]) == executor.MESSAGE_MAX + 1
    assert entry["traceback"] == "tb\\u0000"
    assert (entry["attempt"], entry["type"], entry["worker"]) == (2, "ValueError", "w1")
    assert executor.error_entry(1, "Timeout", "", None, "w")["message"] == "Timeout"


def test_results_must_be_storable_json() -> None:
    assert executor.encode_result({"a": "\udcff"}) == '{"a":"\\\\udcff"}'
    with pytest.raises(PermanentError, match="NUL"):
        executor.encode_result("a\x00")
    with pytest.raises(PermanentError, match="not JSON-serialisable"):
        executor.encode_result({1, 2})


def test_a_stop_from_outside_says_what_it_was() -> None:
    never_ran = executor.cancelled_attempt(item(), StopReason.RELEASED, "w")
    assert never_ran.outcome is states.Outcome.RELEASED and never_ran.error is None
    drained = executor.cancelled_attempt(item(), StopReason.RELEASED, "w", ran_s=10.0)
    assert drained.outcome is states.Outcome.RELEASED
    assert drained.error is not None and drained.error["type"] == "Released"
    assert "10.0s" in drained.error["message"]
    cancelled = executor.cancelled_attempt(item(), StopReason.CANCELLED, "w", ran_s=1.0)
    assert cancelled.outcome is states.Outcome.CANCELLED
    assert cancelled.error is not None and cancelled.error["type"] == "Cancelled"


class Raising:
    """A handler that raises ``exc`` (a Handler, structurally)."""

    def __init__(self, exc: BaseException, key_limit: bool) -> None:
        kl = KeyLimitConfig(key="/api_key", tokens=("api_key",), concurrency=1)
        self.config = HandlerConfig(name="h", type="python", key_limit=kl if key_limit else None)
        self._exc = exc

    async def run(self, item: Item) -> Any:
        raise self._exc

    async def aclose(self) -> None:
        pass


def outcome_of(exc: BaseException, *, key_limit: bool) -> executor.Attempt:
    keyed = dataclasses.replace(item(), payload={"api_key": "team-a"})
    return anyio.run(executor.attempt, Raising(exc, key_limit), keyed, "w")


def test_retry_after_with_scope_key_pauses_the_key_only_under_a_key_limit() -> None:
    paused = outcome_of(RetryAfter(30, "provider said 429", scope="key"), key_limit=True)
    assert (paused.outcome, paused.delay_s, paused.throttle_key) == (
        states.Outcome.RELEASED,
        30.0,
        "team-a",
    )
    assert paused.error is not None and paused.error["type"] == "Throttled"
    assert "provider said 429" in paused.error["message"]
    # No key limit: an item retry, as RetryAfter(30) is everywhere.
    for a in (
        outcome_of(RetryAfter(30, scope="key"), key_limit=False),
        outcome_of(RetryAfter(30), key_limit=True),
    ):
        assert (a.outcome, a.delay_s, a.throttle_key) == (states.Outcome.RETRY, 30.0, None)
    with pytest.raises(ValueError, match="scope"):
        RetryAfter(1, scope="handler")


def test_only_a_429_with_retry_after_pauses_a_keyed_http_handlers_key() -> None:
    throttled = HTTPStatusError("HTTP 429 from x: slow down", 429, 5.0)
    assert outcome_of(throttled, key_limit=True).throttle_key == "team-a"
    for exc in (
        HTTPStatusError("HTTP 429 from x", 429, None),  # no Retry-After: backoff
        HTTPStatusError("HTTP 503 from x", 503, 5.0),
    ):
        a = outcome_of(exc, key_limit=True)
        assert (a.outcome, a.throttle_key) == (states.Outcome.RETRY, None)
    assert outcome_of(throttled, key_limit=False).throttle_key is None
