"""Key budgets without a database: the configuration, the costs a submission
may carry (422 naming each bad one), item.report_cost's checks and the exec
``::bsv-cost`` line."""

from __future__ import annotations

from typing import Any

import pytest

from supervisor import config, key_limits
from supervisor.api import schemas
from supervisor.api.problems import ValidationFailed
from supervisor.handlers.exec import _Stdout
from supervisor.models import Item, Progress
from tests.unit.test_key_limits import problems, scrape


def test_a_budget_is_cost_units_per_period_with_a_cost_pointer() -> None:
    kl = (
        config.from_mapping(
            scrape(
                {
                    "key": "/api_key",
                    "budget": 10000,
                    "budget_period": "1m",
                    "cost": "/estimated_tokens",
                }
            )
        )
        .handlers["scrape"]
        .key_limit
    )
    assert kl is not None
    assert (kl.budget, kl.budget_period_s, kl.cost, kl.cost_tokens) == (
        10000.0,
        60.0,
        "/estimated_tokens",
        ("estimated_tokens",),
    )
    # A budget alone is a limit; without a cost every item costs 1; the period
    # defaults to a minute.
    alone = config.from_mapping(scrape({"key": "/k", "budget": 5})).handlers["scrape"].key_limit
    assert alone is not None
    assert (alone.budget, alone.budget_period_s, alone.cost_tokens) == (5.0, 60.0, None)


def test_a_bad_budget_is_reported_with_dotted_paths() -> None:
    p = "handlers.scrape.key_limit"
    assert problems(scrape({"key": "/k", "budget": 0, "budget_period": "0s", "cost": "x"})) == [
        f"{p}.budget: must be a number greater than zero, got 0",
        f"{p}.budget_period: must be greater than zero",
        f"{p}.cost: 'x' is not a JSON Pointer into the payload, like '/domain'",
    ]
    assert problems(scrape({"key": "/k", "concurrency": 1, "cost": "/c"})) == [
        f"{p}.cost: only means something with {p}.budget"
    ]
    assert problems(scrape({"key": "/k", "budget": "lots"})) == [
        f"{p}.budget: expected int or float, got str 'lots'"
    ]


@pytest.mark.parametrize(
    ("payload", "cost"),
    [
        ({"c": 12}, 12.0),
        ({"c": 0.5}, 0.5),
        ({"c": 0}, 0.0),
        ({}, 1.0),
        ({"c": None}, 1.0),
        (7, 1.0),
    ],
)
def test_the_cost_of_a_payload(payload: Any, cost: float) -> None:
    assert key_limits.cost_of(payload, ("c",)) == cost


@pytest.mark.parametrize("value", [-1, "12", True, [1], {"n": 1}, float("inf")])
def test_a_value_that_cannot_be_a_cost_is_refused(value: Any) -> None:
    with pytest.raises(ValueError, match="the cost must be a number >= 0"):
        key_limits.cost_of({"c": value}, ("c",))


def test_a_submission_names_each_item_whose_cost_is_not_a_number() -> None:
    def submit(items: list[Any]) -> None:
        schemas.submission(
            {"handler": "llm", "items": items},
            header_key=None,
            handler_exists=lambda name: name == "llm",
            max_items=100,
            key_pointer=lambda _name: "/api_key",
            cost_pointer=lambda _name: "/estimated_tokens",
        )

    submit([{"api_key": "a", "estimated_tokens": 900}, {"api_key": "a"}])
    with pytest.raises(ValidationFailed) as exc:
        submit(
            [
                {"api_key": "a", "estimated_tokens": -5},
                {"api_key": "a", "estimated_tokens": 10},
                {"payload": {"api_key": "b", "estimated_tokens": "many"}},
            ]
        )
    errors = exc.value.errors or []
    assert [e["path"] for e in errors] == [
        "/items/0/estimated_tokens",
        "/items/2/payload/estimated_tokens",
    ], errors
    assert "the cost must be a number >= 0" in errors[0]["message"]


class Costs:
    """Stands in for the dispatcher: records the costs an attempt reported."""

    def __init__(self) -> None:
        self.costs: list[float] = []

    def report_progress(self, item: Item, p: Progress) -> None:
        raise AssertionError("not expected")

    def extend(self, item: Item, seconds: float) -> float:
        raise AssertionError("not expected")

    def add_items(self, item: Item, entries: Any) -> int:
        raise AssertionError("not expected")

    def report_cost(self, item: Item, cost: float) -> None:
        self.costs.append(cost)


def test_report_cost_takes_a_number_at_least_zero() -> None:
    rec = Costs()
    it = Item("1", "b", None, {}, 1, 3, "h", {}, controls=rec)
    it.report_cost(120)
    it.report_cost(0.5)
    assert rec.costs == [120.0, 0.5]
    with pytest.raises(TypeError, match="must be a number, not str"):
        it.report_cost("12")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="finite number >= 0"):
        it.report_cost(-1)
    Item("1", "b", None, {}, 1, 3, "h", {}).report_cost(3)  # outside a daemon: nothing


def test_exec_cost_lines_report_and_bad_ones_are_dropped() -> None:
    rec = Costs()
    out = _Stdout(Item("1", "b", None, {}, 1, 3, "h", {}, controls=rec))
    out._take(b"::bsv-cost 1234\n::bsv-cost lots\n::bsv-cost -3\nresult\n")
    assert rec.costs == [1234.0]
    assert bytes(out.data) == b"result\n"
