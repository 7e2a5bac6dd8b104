"""Every path that creates items gives them their limit key when their handler
has a key_limit: the keyed claim takes only items with one, so an item created
without it (by a schedule, a pipeline stage) would never run."""

from __future__ import annotations

from typing import Any

from tests.conftest import DaemonFactory
from tests.daemon import DEFAULT_HANDLERS, wait_for
from tests.test_pipelines import stages, wait_run

KEYED = {
    "type": "python",
    "target": "tests.handlers:echo",
    "timeout": "30s",
    "key_limit": {"key": "/page", "concurrency": 1},
}


def test_a_schedule_of_a_keyed_handler_gives_its_items_their_keys(
    daemons: DaemonFactory,
) -> None:
    extra = {
        "schedules": {"tick": {"cron": "* * * * * *", "handler": "keyed", "items": [{"page": "a"}]}}
    }
    d = daemons(handlers=DEFAULT_HANDLERS | {"keyed": KEYED}, extra=extra)

    def a_completed_run() -> dict[str, Any] | None:
        code, page, _ = d.api("GET", "/v1/batches?handler=keyed&status=completed")
        assert code == 200, page
        return page["batches"][0] if page["batches"] else None

    b = wait_for(a_completed_run, 20, what="a scheduled batch of the keyed handler completed")
    (it,) = d.items(b["id"])
    assert it["limit_key"] == "a"


def test_every_stage_of_a_pipeline_of_keyed_handlers_gets_its_keys(
    daemons: DaemonFactory,
) -> None:
    handlers = DEFAULT_HANDLERS | {"fetch": KEYED, "again": KEYED}
    pipes = {"p": {"stages": stages(("again", "again", "passthrough"))}}
    d = daemons(handlers=handlers, extra={"pipelines": pipes})
    code, run, _ = d.api("POST", "/v1/pipelines/p/runs", {"items": [{"page": "x"}, {"page": "y"}]})
    assert code == 201, run
    done = wait_run(d, run["id"])
    assert done["status"] == "completed", done
    for stage in done["stages"]:
        keys = sorted(it["limit_key"] for it in d.items(stage["batch_id"]))
        assert keys == ["x", "y"], (stage, keys)
