"""What the executor makes storable and how it bounds what it stores
(supervisor.executor): the pure functions behind an item's error history."""

from __future__ import annotations

import math

import pytest

from supervisor import executor, states
from supervisor.errors import PermanentError
from supervisor.executor import StopReason
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
