"""The configuration checks of a schedule that fires a pipeline run: exactly one
of handler and pipeline, the pipeline named with a did-you-mean, the settings a
run has no use for refused, and static items checked as POST
/v1/pipelines/{name}/runs would check them, before the daemon starts."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from supervisor import config, schedules
from supervisor.errors import ConfigError

HANDLERS = {
    "echo": {"type": "python", "target": "supervisor.examples:echo"},
    "keyed": {
        "type": "python",
        "target": "supervisor.examples:echo",
        "key_limit": {"key": "/portfolio", "concurrency": 1},
    },
}
PIPELINES = {
    "nightly": {"stages": [{"name": "load", "handler": "echo"}]},
    "keyed": {"stages": [{"name": "load", "handler": "keyed"}]},
}


def cfg_of(**schedule: Any) -> config.Config:
    return config.from_mapping(
        {
            "handlers": HANDLERS,
            "pipelines": PIPELINES,
            "schedules": {"s": {"cron": "0 2 * * *", "items": [1]} | schedule},
        }
    )


def problems(**schedule: Any) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        cfg_of(**schedule)
    return exc.value.problems


def build_problems(**schedule: Any) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        schedules.build_all(cfg_of(**schedule))
    return exc.value.problems


def test_a_schedule_names_a_pipeline_instead_of_a_handler() -> None:
    c = cfg_of(pipeline="nightly", metadata={"owner": "ops"}, tenant="A")
    s = c.schedules["s"]
    assert (s.pipeline, s.handler, s.key) == ("nightly", "", "schedule:s")
    plan = schedules.build_all(c)["s"]
    nr = plan.run_submission([1], schedules.Slot("s", datetime.now(UTC), "manual"), 10)
    assert nr.pipeline == "nightly" and nr.exclusive_key == "schedule:s"
    assert nr.metadata["owner"] == "ops" and nr.metadata["schedule"]["kind"] == "manual"


def test_exactly_one_of_handler_and_pipeline() -> None:
    both = "schedules.s: exactly one of handler (a batch at each slot) or pipeline"
    assert any(p.startswith(both) for p in problems(handler="echo", pipeline="nightly"))
    assert any(p.startswith(both) for p in problems())


def test_an_unknown_pipeline_is_named_with_a_did_you_mean() -> None:
    assert problems(pipeline="nighty") == [
        "schedules.s.pipeline: no pipeline 'nighty' (did you mean 'nightly'?)"
    ]


def test_overlap_queue_and_cancel_are_refused_with_a_pipeline() -> None:
    for policy in ("queue", "cancel"):
        (got,) = problems(pipeline="nightly", overlap=policy)
        assert got.startswith(f'schedules.s.overlap: "{policy}" is not available with pipeline'), (
            got
        )
    assert cfg_of(pipeline="nightly", overlap="skip").schedules["s"].overlap == "skip"


def test_priority_and_max_attempts_are_refused_with_a_pipeline() -> None:
    got = problems(pipeline="nightly", priority=5, max_attempts=2)
    assert [p.split(":")[0] for p in got] == ["schedules.s.priority", "schedules.s.max_attempts"]


def test_static_items_and_metadata_are_checked_as_a_run_submission() -> None:
    assert build_problems(pipeline="nightly", metadata={"pipeline_run": 1}) == [
        "schedules.s.metadata: /metadata/pipeline_run: reserved: each stage's batch names its "
        "run there"
    ]
    # The first stage's handler has a key limit: an item's limit key is taken
    # from its payload, and one that cannot be a key is refused.
    (got,) = build_problems(pipeline="keyed", items=[{"portfolio": {"id": 1}}])
    assert got.startswith("schedules.s.items: /items/0/portfolio:"), got
    plan = schedules.build_all(cfg_of(pipeline="keyed", items=[{"portfolio": 7}]))["s"]
    slot = schedules.Slot("s", datetime.now(UTC), "scheduled")
    assert plan.run_submission([{"portfolio": 7}], slot, 10).limit_keys == ["7"]
