"""The dashboard's triage of one batch in a real headless Chromium (same browser
setup as test_dashboard_browser.py; skips the same way): its failures grouped
by error type, a search of its items by key and by error type, an item's
details and error history, the bulk retry of one error type and of a
selection, and the results downloads (with and without a token)."""

from __future__ import annotations

import hashlib
import json
import pathlib
from typing import Any

from tests.conftest import DaemonFactory
from tests.test_dashboard_browser import _confirm, _open, _same_page, expect
from tests.test_dashboard_browser import page as page
from tests.test_dashboard_views_browser import _shot
from tests.test_triage import HANDLERS, failing_batch, listing, ok

ROWS = "[data-testid^=item-row-]"


def _search(page: Any, *, key: str = "", mode: str = "key_prefix", error_type: str = "") -> None:
    page.get_by_test_id("item-search-mode").select_option(mode)
    page.get_by_test_id("item-search-key").fill(key)
    page.get_by_test_id("item-search-error").fill(error_type)
    page.get_by_test_id("item-search").click()


def test_triage_groups_searches_and_bulk_retries_one_error_type(
    daemons: DaemonFactory, page: Any, tmp_path: pathlib.Path
) -> None:
    d = daemons("dash-triage", handlers=HANDLERS)
    gate = tmp_path / "gate"
    bid = failing_batch(d, gate)["id"]
    conn_ids = [it["id"] for it in listing(d, bid, error_type="ConnectionError")]
    _open(page, d.url + "/")
    page.get_by_test_id(f"batch-link-{bid}").click()
    expect(page.get_by_test_id("detail-status")).to_have_text("completed with errors")

    # The failures, grouped by the type of their last error, largest group first.
    groups = page.locator("[data-testid^=error-group-][data-error-type]")
    expect(groups).to_have_count(2)
    expect(groups.first).to_have_attribute("data-error-type", "ConnectionError")
    expect(page.get_by_test_id("error-group-count-ConnectionError")).to_have_text("5")
    expect(page.get_by_test_id("error-group-count-ValueError")).to_have_text("3")
    expect(page.get_by_test_id("error-group-ConnectionError")).to_contain_text(
        "upstream down for 4"
    )
    expect(page.get_by_test_id("error-groups-note")).to_contain_text("8 failed items")

    # Search: a key prefix, one exact key, an error type, then both at once.
    expect(page.locator(ROWS)).to_have_count(12)
    _search(page, key="user:")
    expect(page.locator(ROWS)).to_have_count(6)
    expect(page.get_by_test_id("item-search-note")).to_have_text("6 matching")
    _search(page, key="user:10", mode="key")
    expect(page.locator(ROWS)).to_have_count(1)
    expect(page.locator(ROWS)).to_contain_text("user:10")
    _search(page, error_type="ValueError")
    expect(page.locator(ROWS)).to_have_count(3)
    _search(page, key="org:", error_type="ConnectionError")
    expect(page.locator(ROWS)).to_have_count(2)
    page.get_by_test_id("item-search-clear").click()
    expect(page.locator(ROWS)).to_have_count(12)

    # One item's details: payload, result, progress and every attempt's error.
    (first,) = listing(d, bid, key="user:0")
    page.get_by_test_id(f"item-errors-{first['id']}").click()
    expect(page.get_by_test_id(f"item-payload-{first['id']}")).to_contain_text('"ConnectionError"')
    expect(page.get_by_test_id(f"item-result-{first['id']}")).to_have_text("—")
    history = page.get_by_test_id(f"item-history-{first['id']}")
    expect(history.locator("li")).to_have_count(1)
    expect(history).to_contain_text("attempt 1: ConnectionError")
    expect(history).to_contain_text("upstream down for 0")
    _shot(page, "dashboard-triage.png")

    # Retry every ConnectionError failure from its group; the upstream is back.
    gate.touch()
    page.get_by_test_id("error-group-show-ConnectionError").click()
    expect(page.locator(ROWS)).to_have_count(5)
    page.get_by_test_id("error-group-retry-ConnectionError").click()
    expect(page.get_by_test_id("confirm-message")).to_contain_text(
        "all 5 failed ConnectionError items"
    )
    _confirm(page)
    expect(page.get_by_test_id("toast")).to_contain_text("Retried 5 items")
    for iid in conn_ids:  # the search keeps showing them: their last error is still that type
        expect(page.get_by_test_id(f"item-status-{iid}")).to_have_text("succeeded")
    expect(page.get_by_test_id("count-succeeded")).to_have_text("9")
    expect(page.get_by_test_id("count-failed")).to_have_text("3")
    expect(page.get_by_test_id("detail-status")).to_have_text("completed with errors")
    expect(groups).to_have_count(1)
    expect(page.get_by_test_id("error-group-count-ValueError")).to_have_text("3")
    for iid in conn_ids:
        it = ok(d.api("GET", f"/v1/items/{iid}"))
        assert it["status"] == "succeeded" and it["attempts"] == 2, it
    log = ok(d.api("GET", f"/v1/batches/{bid}/log"))["entries"]
    assert sorted(e["detail"]["item"] for e in log if e["action"] == "item_retried") == sorted(
        conn_ids
    )
    expect(page.locator("[data-testid=log-entry][data-action=item_retried]")).to_have_count(5)
    _same_page(page)
    _shot(page, "dashboard-triage-retried.png")

    # A selection: two of the ValueError items, by their checkboxes.
    value_ids = [it["id"] for it in listing(d, bid, error_type="ValueError")]
    _search(page, error_type="ValueError")
    expect(page.locator(ROWS)).to_have_count(3)
    retry = page.get_by_test_id("items-retry-selected")
    expect(retry).to_be_disabled()
    for iid in value_ids[:2]:
        page.get_by_test_id(f"item-select-{iid}").check()
    expect(retry).to_have_text("Retry selected (2)")
    retry.click()
    _confirm(page)
    expect(page.get_by_test_id("toast")).to_contain_text("Retried 2 items")
    for iid in value_ids[:2]:
        expect(page.get_by_test_id(f"item-status-{iid}")).to_have_text("succeeded")
    expect(page.get_by_test_id(f"item-status-{value_ids[2]}")).to_have_text("failed")
    expect(page.get_by_test_id("error-group-count-ValueError")).to_have_text("1")
    expect(retry).to_be_disabled()
    assert d.batch(bid)["counts"]["succeeded"] == 11
    _same_page(page)

    # The results, as JSON Lines and as CSV.
    with page.expect_download() as got:
        page.get_by_test_id("download-jsonl").click()
    lines = pathlib.Path(got.value.path()).read_text().splitlines()
    assert len(lines) == 12 and {json.loads(x)["status"] for x in lines} == {"succeeded", "failed"}
    with page.expect_download() as got:
        page.get_by_test_id("download-csv").click()
    assert got.value.suggested_filename == f"batch-{bid}.csv"
    assert pathlib.Path(got.value.path()).read_text().splitlines()[0].startswith("id,key,status")
    _same_page(page)


def test_triage_behind_a_token_downloads_and_retries(
    daemons: DaemonFactory, page: Any, tmp_path: pathlib.Path
) -> None:
    token = "triage-token"
    grant = {
        "name": "ops",
        "tenant": "acme",
        "sha256": hashlib.sha256(token.encode()).hexdigest(),
        "scopes": ["read", "write"],
    }
    d = daemons("dash-triage-auth", handlers=HANDLERS, extra={"auth": {"tokens": [grant]}})
    auth = {"Authorization": f"Bearer {token}"}
    gate = tmp_path / "gate"
    spec = {"handler": "triage", "items": [{"raise": "LookupError", "gate": str(gate)}, {}]}
    bid = ok(d.api("POST", "/v1/batches", spec, auth))["id"]
    page.goto(f"{d.url}/#/batches/{bid}")
    page.get_by_test_id("token-input").fill(token)
    page.get_by_test_id("token-save").click()
    expect(page.get_by_test_id("detail-status")).to_have_text("completed with errors")
    expect(page.get_by_test_id("error-group-count-LookupError")).to_have_text("1")
    # A link cannot send the token: the page fetches the export and hands it over.
    with page.expect_download() as got:
        page.get_by_test_id("download-jsonl").click()
    assert len(pathlib.Path(got.value.path()).read_text().splitlines()) == 2
    gate.touch()
    page.get_by_test_id("error-group-retry-LookupError").click()
    _confirm(page)
    expect(page.get_by_test_id("detail-status")).to_have_text("completed")
    expect(page.get_by_test_id("no-failures")).to_be_visible()
    b = ok(d.api("GET", f"/v1/batches/{bid}", headers=auth))
    assert b["counts"]["succeeded"] == 2, b
