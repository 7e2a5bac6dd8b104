"""Item listings are bounded in bytes, not only in count.

Before the fix, `limit` alone bounded a page: a page of large payloads was one
response of any size (100 MB were seen). Now a page stops at MAX_PAGE_BYTES (at
least one item) and its next_cursor continues exactly where it stopped. The
submission here (~12 MB) also goes through the worker-thread parse of large bodies.
"""

from __future__ import annotations

from typing import Any

from supervisor.api.routes import MAX_PAGE_BYTES
from tests.daemon import request

ITEM_BYTES = 600_000
N = 20


def test_a_page_of_large_items_is_cut_by_size_and_continues(daemons: Any) -> None:
    d = daemons()
    payloads = [{"n": i, "blob": "x" * ITEM_BYTES} for i in range(N)]
    b = d.submit("echo", payloads)
    d.wait_status(b["id"], "completed", 60)

    seen: list[int] = []
    cursor = ""
    pages = 0
    while True:
        url = f"{d.url}/v1/batches/{b['id']}/items?limit=500" + (
            f"&cursor={cursor}" if cursor else ""
        )
        status, page, headers = request("GET", url)
        assert status == 200
        assert int(headers["Content-Length"]) <= MAX_PAGE_BYTES + ITEM_BYTES * 3, headers
        seen += [it["payload"]["n"] for it in page["items"]]
        pages += 1
        if not page["next_cursor"]:
            break
        cursor = page["next_cursor"]
    assert seen == list(range(N)), seen
    assert pages > 1
