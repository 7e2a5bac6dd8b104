"""Which wake-ups make the callback loop claim: every submission sends one naming
its handler, and claiming callbacks for each of those was a database round trip
per batch (a few percent of the daemon's and PostgreSQL's time with one-item
batches) that could never find anything."""

from __future__ import annotations

from supervisor.callbacks import wakes_callbacks

HANDLERS = {"scrape": object(), "notify": object()}


def test_a_wake_up_naming_an_item_handler_does_not_claim_callbacks() -> None:
    assert not wakes_callbacks("scrape", HANDLERS)
    assert not wakes_callbacks("notify", HANDLERS)


def test_a_callback_a_lost_session_or_anything_unknown_does() -> None:
    for payload in ("callback", "reconnect", "", "probe:3f2a"):
        assert wakes_callbacks(payload, HANDLERS), payload
    assert wakes_callbacks("callback", {"callback": object()})  # a handler named so, too
