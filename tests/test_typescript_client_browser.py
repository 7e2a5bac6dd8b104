"""The TypeScript client in a real headless Chromium: the watch example page,
served from the daemon's origin (as the API's origin check requires), follows a
batch to its end over fetch-streamed SSE with a bearer token.

Needs what tests/test_dashboard_browser.py needs (chromium, playwright) and what
tests/test_typescript_client.py needs (node, npm) to build the client; skips
otherwise.
"""

from __future__ import annotations

import hashlib
import shutil
from typing import Any

import pytest

from tests.conftest import DaemonFactory
from tests.test_dashboard_browser import expect, page  # noqa: F401 (the fixture)
from tests.test_typescript_client import PACKAGE, build_client


def test_watch_example_follows_a_batch_to_its_end_with_a_token(
    daemons: DaemonFactory,
    page: Any,  # noqa: F811 (the fixture imported above)
) -> None:
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node or npm is not on PATH (building the TypeScript client)")
    build_client(examples=True)
    token = "ts-client-token"
    d = daemons(
        extra={
            "auth": {
                "tokens": [
                    {
                        "name": "page",
                        "tenant": "acme",
                        "sha256": hashlib.sha256(token.encode()).hexdigest(),
                        "scopes": ["read", "write"],
                    }
                ]
            }
        },
    )
    auth = {"Authorization": f"Bearer {token}"}
    items = [{"key": f"k{i}", "payload": {"sleep": 0.2}} for i in range(4)]
    code, batch, _ = d.api(
        "POST", "/v1/batches", {"handler": "echo", "items": items, "max_concurrency": 1}, auth
    )
    assert code == 201, batch

    def serve(route: Any) -> None:
        # The client's files under /ts/ on the daemon's own origin.
        rel = route.request.url.split("/ts/", 1)[1].split("?", 1)[0]
        route.fulfill(path=str(PACKAGE / rel))

    page.route(f"{d.url}/ts/**", serve)
    page.goto(
        f"{d.url}/ts/examples/watch.html?batch={batch['id']}&since={batch['version']}&token={token}"
    )
    expect(page.locator("body")).to_have_attribute("data-finished", "completed")
    expect(page.locator("#status")).to_contain_text("4 succeeded")
    expect(page.locator("#items li")).to_have_count(4)
    expect(page.locator("#items")).to_contain_text("k3: succeeded")
