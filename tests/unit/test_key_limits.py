"""Keyed limits without a database: the key_limit section's validation, the
JSON Pointer, the key a payload gives, and the 422 of a value that cannot be a
key (with the submission's other errors, naming the value)."""

from __future__ import annotations

from typing import Any

import pytest

from supervisor import config, key_limits
from supervisor.api import schemas
from supervisor.api.problems import ValidationFailed
from supervisor.errors import ConfigError


def scrape(key_limit: Any) -> dict[str, Any]:
    return {"handlers": {"scrape": {"type": "python", "target": "a.b:c", "key_limit": key_limit}}}


def problems(raw: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        config.from_mapping(raw)
    return exc.value.problems


def test_a_key_limit_is_a_pointer_with_limits_per_key() -> None:
    kl = (
        config.from_mapping(scrape({"key": "/site/domain", "concurrency": 1, "rate_limit": "2/s"}))
        .handlers["scrape"]
        .key_limit
    )
    assert kl == config.KeyLimitConfig(
        key="/site/domain",
        tokens=("site", "domain"),
        concurrency=1,
        rate_limit="2/s",
        rate_per_s=2.0,
    )
    # Either limit alone will do.
    only_rate = config.from_mapping(scrape({"key": "/d", "rate_limit": "1/m"}))
    assert only_rate.handlers["scrape"].key_limit == config.KeyLimitConfig(
        key="/d", tokens=("d",), rate_limit="1/m", rate_per_s=1 / 60
    )


def test_a_bad_key_limit_is_reported_with_dotted_paths() -> None:
    p = "handlers.scrape.key_limit"
    assert problems(scrape({"key": "domain", "concurency": 1})) == [
        f"{p}.concurency: unknown key (did you mean 'concurrency'?)",
        f"{p}.key: 'domain' is not a JSON Pointer into the payload, like '/domain'",
        f"{p}: needs concurrency, rate_limit or budget (the limits per key), or several",
    ]
    assert problems(scrape({"concurrency": 0, "rate_limit": "fast"})) == [
        f'{p}.key: required, a JSON Pointer into the payload like "/domain"',
        f"{p}.rate_limit: 'fast' is not a rate like '10/s' or '600/m'",
        f"{p}.concurrency: must be at least 1, got 0",
    ]
    assert problems(scrape("/domain")) == [f"{p}: expected a table, got str"]
    assert problems(scrape({"key": "/a~2", "concurrency": 1})) == [
        f"{p}.key: '/a~2': '~' must be followed by 0 or 1 (RFC 6901)"
    ]


@pytest.mark.parametrize(
    ("payload", "key"),
    [
        ({"domain": "example.org"}, "example.org"),
        ({"domain": 42}, "42"),
        ({"domain": False}, "false"),
        ({"domain": None}, ""),
        ({"other": 1}, ""),
        ("bare", ""),
        ([1, 2], ""),
    ],
)
def test_the_key_of_a_payload(payload: Any, key: str) -> None:
    assert key_limits.key_of(payload, ("domain",)) == key


def test_pointers_follow_rfc_6901() -> None:
    assert key_limits.parse_pointer("/a~1b/m~0n/0") == ("a/b", "m~n", "0")
    assert key_limits.key_of({"a/b": {"m~n": ["x", "y"]}}, ("a/b", "m~n", "1")) == "y"
    assert key_limits.key_of({"l": ["x"]}, ("l", "01")) == ""  # not an array index
    assert key_limits.key_of({"l": ["x"]}, ("l", "5")) == ""
    assert key_limits.key_of({"": "empty name"}, ("",)) == "empty name"


@pytest.mark.parametrize(
    ("value", "why"),
    [
        (1.5, "not a fractional number"),
        ({"x": 1}, "not an object"),
        ([1], "not an array"),
        ("x" * (key_limits.KEY_MAX + 1), "longer than 1000 characters"),
    ],
)
def test_a_value_that_cannot_be_a_key_is_refused(value: Any, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        key_limits.key_of({"domain": value}, ("domain",))


def submission(items: list[Any], pointer: str | None = "/domain") -> Any:
    return schemas.submission(
        {"handler": "scrape", "items": items},
        header_key=None,
        handler_exists=lambda name: name == "scrape",
        max_items=100,
        key_pointer=lambda _name: pointer,
    )


def test_a_submission_takes_each_items_key_once() -> None:
    nb = submission([{"domain": "a"}, {"key": "k", "payload": {"domain": 7}}, {}])
    assert nb.limit_keys == ["a", "7", ""]
    assert submission([{"domain": "a"}], pointer=None).limit_keys is None


def test_a_submission_with_values_that_cannot_be_keys_names_each() -> None:
    with pytest.raises(ValidationFailed) as exc:
        submission([{"domain": [1]}, {"domain": "ok"}, {"payload": {"domain": 2.5}}])
    assert [e["path"] for e in exc.value.errors or []] == [
        "/items/0/domain",
        "/items/2/payload/domain",
    ]


def test_the_limit_keys_are_not_part_of_the_request_digest() -> None:
    keyed = submission([{"domain": "a"}])
    plain = submission([{"domain": "a"}], pointer=None)
    assert keyed.request_hash() == plain.request_hash()
