"""A captured webhook request cannot be replayed later. Before the fix the
signature covered only the body, which carried no time, so a request captured
once verified forever. Now the signed body carries ``sent_at`` (repeated in
``X-Supervisor-Timestamp``), and the receiver's check documented in
docs/handlers.md, run here as written, accepts the live request and refuses the
same bytes once they are older than its tolerance, or with a forged time."""

from __future__ import annotations

import json
import pathlib
import re
from collections.abc import Callable
from typing import Any
from unittest import mock

from tests.test_handlers_http import Server, run_one, server  # noqa: F401  (fixture)

DOC = pathlib.Path(__file__).resolve().parents[2] / "docs" / "handlers.md"
SECRET = "s3cret-for-tests"


def documented_verify() -> tuple[Callable[[str, bytes, str | None], bool], dict[str, Any]]:
    """``verify`` from the docs' Python snippet, and the namespace it runs in."""
    text = DOC.read_text()
    section = text[text.index("### Verifying the signature") :]
    snippet = re.search(r"```python\n(.*?)```", section, re.S)
    assert snippet, "docs/handlers.md lost its Python verifier"
    namespace: dict[str, Any] = {}
    exec(snippet.group(1), namespace)
    return namespace["verify"], namespace


def test_a_replayed_or_retimed_request_does_not_verify(daemons: Any, server: Server) -> None:  # noqa: F811
    item = run_one(daemons, server, {"x": 1}, signing_secret=SECRET)
    assert item["status"] == "succeeded"
    (req,) = server.for_item(item["id"])
    header = req.headers["X-Supervisor-Signature"]
    sent_at = json.loads(req.body)["sent_at"]
    assert req.headers["X-Supervisor-Timestamp"] == str(sent_at)

    verify, ns = documented_verify()
    assert verify(SECRET, req.body, header)  # the live request
    assert not verify("another secret", req.body, header)

    later = sent_at + ns["TOLERANCE_S"] + 1  # the same bytes, replayed after the tolerance
    with mock.patch.object(ns["time"], "time", return_value=float(later)):
        assert not verify(SECRET, req.body, header)

    retimed = req.body.replace(f'"sent_at":{sent_at}'.encode(), f'"sent_at":{later}'.encode())
    assert retimed != req.body, req.body  # moving the time forward breaks the signature
    with mock.patch.object(ns["time"], "time", return_value=float(later)):
        assert not verify(SECRET, retimed, header)
