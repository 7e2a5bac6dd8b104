"""What an outcome write and a reclaim do to the metrics (supervisor.metrics.Metrics):
one count per applied outcome by its resulting status, none for a fenced write,
finished batches counted, reclaims labelled as such."""

from __future__ import annotations

from supervisor import states, store
from supervisor.executor import OutcomeRecord
from supervisor.metrics import Metrics


def record(item_id: int, outcome: states.Outcome) -> OutcomeRecord:
    return OutcomeRecord(item_id, "b", 1, "lease", "h", outcome, None, None, 0.0, 0.01)


def value(m: Metrics, name: str, **labels: str) -> float:
    got = m.registry.get_sample_value(name, labels)
    return 0.0 if got is None else got


def test_applied_outcomes_are_counted_by_the_status_they_led_to() -> None:
    m = Metrics()
    chunk = [
        record(1, states.Outcome.SUCCEEDED),
        record(2, states.Outcome.RETRY),  # written back as queued: a retry
        record(3, states.Outcome.RETRY),  # attempts spent: failed
        record(4, states.Outcome.RELEASED),
        record(5, states.Outcome.SUCCEEDED),  # fenced: not an outcome
    ]
    applied = store.Transitions(
        fenced=frozenset({5}),
        statuses={2: "queued", 3: "failed", 4: "queued"},
        finished=[store.FinishedBatch("b", "completed_with_errors", 2.0)],
    )
    m.applied(chunk, applied)
    items = "batch_supervisor_items_total"
    assert value(m, items, handler="h", outcome="succeeded") == 1
    assert value(m, items, handler="h", outcome="retried") == 1
    assert value(m, items, handler="h", outcome="failed") == 1
    assert value(m, items, handler="h", outcome="released") == 1
    finished = "batch_supervisor_batches_finished_total"
    assert value(m, finished, status="completed_with_errors") == 1


def test_reclaims_are_counted_per_handler() -> None:
    m = Metrics()
    m.reclaimed({"h": 3, "g": 1})
    items = "batch_supervisor_items_total"
    assert value(m, items, handler="h", outcome="reclaimed") == 3
    assert value(m, items, handler="g", outcome="reclaimed") == 1
