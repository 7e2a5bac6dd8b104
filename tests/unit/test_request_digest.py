"""The idempotency digest of a submission: stored with each batch that has an
idempotency key, so a repeat is told from a conflicting reuse of the key."""

from __future__ import annotations

import dataclasses

from supervisor.batches import NewBatch

NIGHTLY = NewBatch(
    handler="echo",
    items=[("a", '{"n":1}'), (None, "2")],
    priority=3,
    max_failures="10%",
    metadata={"owner": "nightly"},
    idempotency_key="nightly-1",
)


def test_a_digest_stored_before_exclusive_keys_still_matches_its_repeat() -> None:
    """Made by the release before exclusive keys: a client repeating that request
    after the upgrade must get its batch (200), not a 409."""
    assert NIGHTLY.request_hash() == (
        "05b05ff50f9bb364eaf1d88ec26314548b2a59fc83add0ec3d83b49dc413b8e2"
    )


def test_the_exclusive_key_is_part_of_the_content() -> None:
    keyed = dataclasses.replace(NIGHTLY, exclusive_key="portfolio:1")
    other = dataclasses.replace(NIGHTLY, exclusive_key="portfolio:2")
    assert len({NIGHTLY.request_hash(), keyed.request_hash(), other.request_hash()}) == 3
