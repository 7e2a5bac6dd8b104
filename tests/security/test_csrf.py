"""Cross-site requests and DNS rebinding against the open (tokenless) API.

Each test failed before the guard: the API took ``text/plain`` and form bodies,
body-less POSTs (cancel, pause) from any page, any ``Origin`` and any ``Host``.
A page in a browser can send exactly those without a CORS preflight; headless
Chromium showed it (see the dashboard browser test for the real browser)."""

from __future__ import annotations

import json
from typing import Any

from tests.daemon import request
from tests.test_api import assert_problem

SUBMISSION = json.dumps({"handler": "echo", "items": [1]}).encode()


def batches(d: Any) -> int:
    code, body, _ = d.api("GET", "/v1/batches")
    assert code == 200, body
    return len(body["batches"])


def test_text_plain_and_form_bodies_are_415_and_create_nothing(daemons: Any) -> None:
    d = daemons()
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data"):
        resp = request("POST", d.url + "/v1/batches", SUBMISSION, {"Content-Type": ctype})
        assert_problem(resp, 415)
    assert batches(d) == 0


def test_bodyless_control_without_json_content_type_is_415(daemons: Any) -> None:
    d = daemons()
    b = d.submit("echo", [{"sleep": 30}])
    resp = request("POST", d.url + f"/v1/batches/{b['id']}/cancel", b"", {"Content-Type": ""})
    assert_problem(resp, 415)
    assert d.batch(b["id"])["status"] != "cancelled"
    code, body, _ = d.api("POST", f"/v1/batches/{b['id']}/cancel")  # the CLI's way: JSON type
    assert code == 200, body


def test_foreign_origin_is_403_and_own_origin_is_allowed(daemons: Any) -> None:
    d = daemons()
    evil = {"Origin": "http://evil.example", "Content-Type": "application/json"}
    assert_problem(request("POST", d.url + "/v1/batches", SUBMISSION, evil), 403)
    assert_problem(request("GET", d.url + "/v1/batches", None, evil), 403)
    assert batches(d) == 0
    own = {"Origin": d.url, "Content-Type": "application/json"}
    code, body, _ = request("POST", d.url + "/v1/batches", SUBMISSION, own)
    assert code == 201, body


def test_allowed_origins_setting_admits_a_listed_origin(daemons: Any) -> None:
    d = daemons(extra={"server": {"allowed_origins": ["https://app.example"]}})
    hdrs = {"Origin": "https://app.example", "Content-Type": "application/json"}
    code, body, _ = request("POST", d.url + "/v1/batches", SUBMISSION, hdrs)
    assert code == 201, body


def test_rebound_host_name_is_refused_even_for_reads(daemons: Any) -> None:
    d = daemons()
    for path in ("/v1/batches", "/", "/metrics"):
        resp = request("GET", d.url + path, None, {"Host": "attacker.example:8080"})
        assert resp[0] == 421, resp
    for host in ("localhost", "127.0.0.1", f"127.0.0.1:{d.port}"):
        code, _, _ = request("GET", d.url + "/v1/batches", None, {"Host": host})
        assert code == 200, host
