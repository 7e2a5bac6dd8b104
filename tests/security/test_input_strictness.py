"""Strict parsing where laxness hides mistakes. Each test failed before the fix:
``status=bogus`` answered 200 with an empty list, ``limit`` took " 5", "1_0"
and Arabic-Indic digits, a duplicate token digest was
accepted silently (the last one won), and ``host = "127.example.com"`` passed the
string-prefix loopback check, so an open API could listen on a public name."""

from __future__ import annotations

from typing import Any

import pytest

from supervisor import config
from supervisor.errors import ConfigError
from tests.test_api import assert_problem

DIGEST = "a" * 64


def test_unknown_status_filter_is_400_naming_the_parameter(daemons: Any) -> None:
    d = daemons()
    b = d.submit("echo", [1])
    assert_problem(d.api("GET", "/v1/batches?status=bogus"), 400, "status")
    assert_problem(d.api("GET", f"/v1/batches/{b['id']}/items?status=bogus"), 400, "status")
    code, body, _ = d.api("GET", "/v1/batches?status=queued")
    assert code == 200, body


@pytest.mark.parametrize("raw", [" 5", "5 ", "١", "1_0", "+5", "0", "501"])
def test_limit_accepts_only_plain_ascii_digits(daemons: Any, raw: str) -> None:
    d = daemons()
    from urllib.parse import quote

    assert_problem(d.api("GET", f"/v1/batches?limit={quote(raw)}"), 400, "limit")


def test_duplicate_token_digests_are_refused() -> None:
    tokens = [
        {"name": "a", "tenant": "t1", "sha256": DIGEST, "scopes": ["read"]},
        {"name": "b", "tenant": "t2", "sha256": DIGEST.upper(), "scopes": ["write"]},
    ]
    with pytest.raises(ConfigError) as exc:
        config.from_mapping({"auth": {"tokens": tokens}})
    assert exc.value.problems == [
        "auth.tokens[1].sha256: the same token as auth.tokens[0] (each token must be distinct)"
    ]


@pytest.mark.parametrize("host", ["127.example.com", "0.0.0.0", "", "::", "10.1.2.3"])
def test_open_api_refused_on_a_host_that_is_not_loopback(host: str) -> None:
    with pytest.raises(ConfigError) as exc:
        config.from_mapping({"server": {"host": host}})
    assert exc.value.problems[0].startswith("server.host:")


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_open_api_allowed_on_loopback(host: str) -> None:
    assert config.from_mapping({"server": {"host": host}}).server.host == host
