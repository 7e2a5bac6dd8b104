"""Item and batch statuses, executor outcomes, and the allowed transitions.

The transitions are enforced by guarded UPDATEs in the SQL functions of
``sql/migrations``; this table is their reference, and the property test
(tests/chaos/test_state_machine.py) checks every item transition the database
makes against it.
"""

from __future__ import annotations

import enum


class ItemStatus(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


class BatchStatus(enum.StrEnum):
    WAITING = "waiting"  # for its `after` dependencies to end (0013)
    SCHEDULED = "scheduled"  # for its not_before (0017)
    QUEUED = "queued"
    RUNNING = "running"
    PAUSED = "paused"
    CANCELLING = "cancelling"
    COMPLETED = "completed"
    COMPLETED_WITH_ERRORS = "completed_with_errors"
    FAILED = "failed"
    CANCELLED = "cancelled"


class CallbackState(enum.StrEnum):
    NONE = "none"
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class Outcome(enum.StrEnum):
    """What the executor makes of one handler attempt (one repository call each)."""

    SUCCEEDED = "succeeded"
    RETRY = "retry"
    FAILED = "failed"
    CANCELLED = "cancelled"
    RELEASED = "released"
    LOST = "lost"


BATCH_TERMINAL = frozenset(
    {
        BatchStatus.COMPLETED,
        BatchStatus.COMPLETED_WITH_ERRORS,
        BatchStatus.FAILED,
        BatchStatus.CANCELLED,
    }
)

ITEM_TRANSITIONS: dict[ItemStatus, frozenset[ItemStatus]] = {
    ItemStatus.QUEUED: frozenset({ItemStatus.RUNNING, ItemStatus.CANCELLED}),
    ItemStatus.RUNNING: frozenset(
        {
            ItemStatus.SUCCEEDED,
            ItemStatus.FAILED,
            ItemStatus.QUEUED,  # retry, reclaimed (WorkerLost), released (drain)
            ItemStatus.CANCELLED,
        }
    ),
    ItemStatus.SUCCEEDED: frozenset({ItemStatus.QUEUED}),  # item retry (a rerun)
    ItemStatus.FAILED: frozenset({ItemStatus.QUEUED}),  # batch or item retry
    # batch retry with include_cancelled, item retry
    ItemStatus.CANCELLED: frozenset({ItemStatus.QUEUED}),
}


class AfterPolicy(enum.StrEnum):
    """When a batch's dependencies let it run (batches.after_policy)."""

    COMPLETED = "completed"  # every dependency completed; any other end cancels it
    TERMINAL = "terminal"  # every dependency ended, however


def after_allows(policy: AfterPolicy, status: str) -> bool | None:
    """Whether a dependency in ``status`` lets its dependent run: True, False
    (the dependent is cancelled) or None (not ended yet). The same rule as
    _settle_batches, for a dependency already ended at submission."""
    if not is_batch_terminal(status):
        return None
    return policy is AfterPolicy.TERMINAL or status == BatchStatus.COMPLETED


class RunStatus(enum.StrEnum):
    """A pipeline run's stored status (pipeline_runs.status, 0018)."""

    RUNNING = "running"
    COMPLETED = "completed"
    COMPLETED_WITH_ERRORS = "completed_with_errors"  # a stage failed under "continue"
    FAILED = "failed"  # a stage failed under "stop", or its items could not be derived
    CANCELLED = "cancelled"


class StageFailure(enum.StrEnum):
    """What a pipeline does when a stage's batch ends with failures."""

    STOP = "stop"  # the run fails; no later stage starts
    CONTINUE = "continue"  # the next stage runs over the items that succeeded


def item_transition_allowed(old: ItemStatus, new: ItemStatus) -> bool:
    return new in ITEM_TRANSITIONS[old]


def is_batch_terminal(status: str) -> bool:
    return status in BATCH_TERMINAL
