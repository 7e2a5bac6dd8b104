"""The OpenAPI document against the application that serves it: every
route documented, nothing documented that is not routed, and a valid 3.1 document."""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

import pytest
from openapi_spec_validator import validate

from supervisor import config
from supervisor.api import server
from supervisor.api.context import ApiContext

METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}
PUBLIC = {"/healthz", "/readyz", "/metrics", "/v1/openapi.json", "/"}


def document() -> dict[str, Any]:
    text = resources.files("supervisor").joinpath("api", "static", "openapi.json").read_text()
    doc: dict[str, Any] = json.loads(text)
    return doc


def app_routes() -> set[tuple[str, str]]:
    """(METHOD, path template) of every route the real app registers."""
    dummy: Any = None
    ctx = ApiContext(
        cfg=config.from_mapping({}),
        db=dummy,
        bus=dummy,
        metrics=dummy,
        auth=dummy,
        readiness=dummy,
        draining=dummy,
    )
    app = server.build_app(ctx)
    out = set()
    for route in app.router.routes():
        assert route.resource is not None
        # aiohttp answers HEAD for every GET by itself; the document lists the GETs.
        if route.method != "HEAD":
            out.add((route.method, route.resource.canonical))
    return out


def documented_routes(doc: dict[str, Any]) -> set[tuple[str, str]]:
    return {
        (method.upper(), path)
        for path, item in doc["paths"].items()
        for method in item
        if method in METHODS
    }


def test_every_route_is_documented_and_every_documented_route_exists() -> None:
    routed, documented = app_routes(), documented_routes(document())
    assert ("POST", "/v1/batches") in routed  # the app really was built with its routes
    assert routed - documented == set(), "routes missing from openapi.json"
    assert documented - routed == set(), "openapi.json documents routes the app lacks"


def test_document_is_valid_openapi_3_1() -> None:
    doc = document()
    assert doc["openapi"].startswith("3.1")
    validate(doc)


def test_every_reference_resolves() -> None:
    doc = document()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            target = node.get("$ref")
            if isinstance(target, str):
                assert target.startswith("#/"), target
                cur: Any = doc
                for part in target[2:].split("/"):
                    assert isinstance(cur, dict) and part in cur, f"unresolved {target}"
                    cur = cur[part]
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(doc)


def test_security_is_global_and_only_probes_are_public() -> None:
    doc = document()
    assert doc["security"] == [{"bearer": []}]
    scheme = doc["components"]["securitySchemes"]["bearer"]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")
    public = {
        path
        for path, item in doc["paths"].items()
        for method, op in item.items()
        if method in METHODS and op.get("security") == []
    }
    assert public == PUBLIC
    assert set(server.PUBLIC) >= PUBLIC  # the middleware really skips auth for them


@pytest.mark.parametrize(
    ("path", "method", "codes"),
    [
        (
            "/v1/batches",
            "post",
            {"200", "201", "400", "401", "403", "409", "413", "415", "421", "422", "503"},
        ),
        ("/v1/batches", "get", {"200", "400", "401", "403", "421", "503"}),
        ("/v1/batches/{id}", "get", {"200", "304", "401", "403", "404", "421", "503"}),
        ("/v1/batches/{id}", "delete", {"204", "401", "403", "404", "409", "415", "421", "503"}),
        (
            "/v1/batches/{id}/cancel",
            "post",
            {"200", "401", "403", "404", "409", "415", "421", "503"},
        ),
        ("/readyz", "get", {"200", "403", "421", "503"}),
    ],
)
def test_status_codes(path: str, method: str, codes: set[str]) -> None:
    assert set(document()["paths"][path][method]["responses"]) == codes


def test_errors_are_problem_json() -> None:
    doc = document()
    for name, resp in doc["components"]["responses"].items():
        assert list(resp["content"]) == ["application/problem+json"], name
    problem = doc["components"]["schemas"]["Problem"]
    assert set(problem["required"]) == {"type", "title", "status", "detail"}
    assert problem["properties"]["errors"]["items"] == {"$ref": "#/components/schemas/FieldError"}


def test_the_shapes_documented_are_the_shapes_served(daemons: Any) -> None:
    """The members of a real batch, item listing and item (with errors) are exactly
    the properties their schemas document (additionalProperties is false)."""
    schemas = document()["components"]["schemas"]
    d = daemons()
    b = d.submit("echo", [{"key": "k", "payload": 1}])
    d.wait_status(b["id"], "completed")
    (listed,) = d.items(b["id"])
    code, item, _ = d.api("GET", f"/v1/items/{listed['id']}")
    assert code == 200
    for name, served in [
        ("Batch", d.batch(b["id"])),
        ("Item", listed),
        ("ItemWithErrors", item),
    ]:
        documented = set(schemas[name]["properties"])
        assert set(served) == documented, (name, set(served) ^ documented)
        assert set(schemas[name]["required"]) <= documented, name
