"""Items functions of the test pipelines (``items = "tests.pipes:<name>"``): each
gets an iterator of the previous stage's succeeded result records and returns or
yields the next stage's item entries. The stage handlers are ``echo``, whose
result is ``{"echo": <payload>, ...}``."""

from __future__ import annotations

import os
import pathlib
import time
from collections.abc import Iterator
from typing import Any

Results = Iterator[dict[str, Any]]


def one_per_link(results: Results) -> Iterator[dict[str, Any]]:
    """A fetched page {"page": p, "links": n} becomes n items, keyed "p/i"."""
    for r in results:
        page = r["result"]["echo"]
        for i in range(page["links"]):
            yield {"key": f"{page['page']}/{i}", "payload": {"page": page["page"], "link": i}}


def one_summary(results: Results) -> list[Any]:
    """Every extracted link of the run becomes one summary item."""
    links = sorted(r["key"] for r in results)
    return [{"links": links}]


def passthrough(results: Results) -> list[Any]:
    """The previous stage's payloads again, in item order."""
    return [r["result"]["echo"] for r in results]


def results_of(results: Results) -> list[Any]:
    """The previous stage's results, as they are."""
    return [r["result"] for r in results]


def nothing(results: Results) -> list[Any]:
    return []


def raises(results: Results) -> list[Any]:
    raise ValueError("no links in \x00 these pages")


def not_items(results: Results) -> list[Any]:
    return [{"key": "", "payload": 1}]


def gated(results: Results) -> list[Any]:
    """As passthrough, after writing the daemon's pid to ``$BSV_PIPE_GATE.entered``
    and waiting (at most a minute) for ``$BSV_PIPE_GATE`` to exist: a test kills
    the daemon in the middle of deriving the next stage's items."""
    gate = pathlib.Path(os.environ["BSV_PIPE_GATE"])
    out = passthrough(results)
    pathlib.Path(f"{gate}.entered").write_text(str(os.getpid()))
    deadline = time.monotonic() + 60
    while not gate.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    return out
