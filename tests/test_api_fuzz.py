"""Property-based run of every documented operation against a real daemon
(schemathesis, generated from supervisor/api/static/openapi.json): no 5xx, and
no response whose status, content type, headers or body contradict the document.
Afterwards the database holds no partial batch."""

from __future__ import annotations

import asyncio
import copy
import hashlib
import json
from importlib import resources
from typing import Any

import asyncpg
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.core.result import Ok

from tests.conftest import DaemonFactory
from tests.daemon import DEFAULT_HANDLERS, wait_for

TOKEN = "fuzz-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
EXAMPLES = {GenerationMode.POSITIVE: 15, GenerationMode.NEGATIVE: 6}


def fuzz_document(batch_ids: list[str]) -> dict[str, Any]:
    """The served document, steered so generated requests reach real data: ``handler``
    is the configured one (unknown handlers are test_api's), batch ids sometimes real."""
    text = resources.files("supervisor").joinpath("api", "static", "openapi.json").read_text()
    doc: dict[str, Any] = copy.deepcopy(json.loads(text))
    submission = doc["components"]["schemas"]["Submission"]
    submission["properties"]["handler"] = {"type": "string", "enum": ["echo"]}
    for example in submission["examples"]:
        example["handler"] = "echo"
    bid = doc["components"]["parameters"]["BatchId"]
    bid["schema"] = {"anyOf": [{"enum": batch_ids}, bid["schema"]]}
    return doc


async def batch_totals(db_url: str) -> list[tuple[int, int]]:
    """(total, number of items) of every batch."""
    conn = await asyncpg.connect(db_url)
    try:
        rows = await conn.fetch(
            "SELECT b.total, count(i.id) AS n FROM supervisor.batches b"
            " LEFT JOIN supervisor.items i ON i.batch_id = b.id GROUP BY b.id, b.total"
        )
        return [(r["total"], r["n"]) for r in rows]
    finally:
        await conn.close()


def test_schemathesis_every_operation(daemons: DaemonFactory, db_url: str) -> None:
    d = daemons(
        "fuzz",
        handlers={"echo": DEFAULT_HANDLERS["echo"]},
        worker={"concurrency": 4},
        extra={
            "server": {"max_body_bytes": 20_000, "max_items_per_batch": 20},
            "auth": {
                "tokens": [
                    {
                        "name": "fuzzer",
                        "tenant": "fuzz",
                        "sha256": hashlib.sha256(TOKEN.encode()).hexdigest(),
                        "scopes": ["read", "write"],
                    }
                ]
            },
        },
    )
    # A few real batches, all finished so that an event stream on them ends at once.
    ids = []
    for n in range(3):
        status, body, _ = d.api(
            "POST", "/v1/batches", {"handler": "echo", "items": list(range(n + 1))}, AUTH
        )
        assert status == 201, body
        ids.append(body["id"])
    for bid in ids:

        def finished(bid: str = bid) -> bool:
            return bool(d.api("GET", f"/v1/batches/{bid}", None, AUTH)[1]["finished_at"])

        wait_for(finished, 20, what=f"batch {bid} finished")

    schema = schemathesis.openapi.from_dict(fuzz_document(ids))
    operations = []
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), result
        operations.append(result.ok())
    assert len(operations) >= 17
    for operation in operations:
        for mode, examples in EXAMPLES.items():
            if mode is GenerationMode.NEGATIVE and not list(operation.iter_parameters()):
                continue  # nothing to make invalid (the probes take no input)

            @settings(
                max_examples=examples,
                deadline=None,
                database=None,
                derandomize=True,
                suppress_health_check=list(HealthCheck),
            )
            @given(case=operation.as_strategy(generation_mode=mode))
            def run(case: Any) -> None:
                # The events stream of a live batch lasts until it ends; the timeout
                # bounds that, and the echo batches here end in well under it.
                # Changes carry the JSON content type, as every client must (a body-less
                # POST without it is a 415, which would hide the operation itself).
                ctype = {} if case.method.upper() == "GET" else {"Content-Type": "application/json"}
                response = case.call(base_url=d.url, headers=AUTH | ctype, timeout=15)
                case.validate_response(response, checks=CHECKS)

            run()

    totals = asyncio.run(batch_totals(db_url))
    assert len(totals) > len(ids) + 5, "the fuzzing created (almost) no batch: too weak"
    assert [t for t in totals if t[0] != t[1]] == []  # no partial batch
    assert "api.internal_error" not in d.log()
