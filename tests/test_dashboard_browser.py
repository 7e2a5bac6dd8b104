"""The dashboard at ``GET /`` in a real headless Chromium (Playwright driving the
system browser; it never downloads one): live progress without reloading, the
cancel / resume buttons behind the in-page confirmation, the detail view fed only
by SSE, a failed item's error history, the audit log, and bearer-token auth.

Needs the Debian package ``chromium`` and the Python package ``playwright``; the
tests skip, saying which is missing, when either is absent.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pathlib
import shutil
import signal
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tests.conftest import DaemonFactory
from tests.daemon import check_invariants

sync_api = pytest.importorskip(
    "playwright.sync_api",
    reason="the Python package playwright is not installed (pip install playwright)",
)
expect = sync_api.expect

OUTPUT = pathlib.Path(__file__).resolve().parent / "output"
BROWSER_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
UI_TIMEOUT_MS = 20_000


def _chromium() -> str | None:
    explicit = os.environ.get("BSV_CHROMIUM")
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


@pytest.fixture
def page(daemons: DaemonFactory) -> Iterator[Any]:
    """A fresh browser page. Depends on ``daemons`` so the test database exists before
    Playwright's sync API takes over this thread's event loop, and the browser is gone
    before the database is dropped (both use ``asyncio.run``)."""
    exe = _chromium()
    if exe is None:
        pytest.skip("no chromium binary (apt-get install chromium, or set BSV_CHROMIUM)")
    errors: list[str] = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=BROWSER_ARGS)
        try:
            pg = browser.new_page(viewport={"width": 1360, "height": 820}, reduced_motion="reduce")
            pg.set_default_timeout(UI_TIMEOUT_MS)
            expect.set_options(timeout=UI_TIMEOUT_MS)
            pg.on("pageerror", lambda exc: errors.append(str(exc)))
            yield pg
        finally:
            browser.close()
    _reap_browser_children()
    assert not errors, f"JavaScript errors on the page: {errors}"


def _browser_children() -> dict[int, str]:
    """This process's children that belong to the browser, with their state letter.
    (The test session is a subreaper, so Chromium's detached crash handlers land here.)"""
    found = {}
    for entry in pathlib.Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text()
        except OSError:
            continue  # it exited while we looked
        comm = text[text.find("(") + 1 : text.rfind(")")]
        state, ppid = text[text.rfind(")") + 2 :].split()[:2]
        if int(ppid) == os.getpid() and comm.startswith("chrom"):
            found[int(entry.name)] = state
    return found


def _reap_browser_children(timeout: float = 10.0) -> None:
    """Leave no browser process behind: reap the exited ones, kill any that linger."""
    deadline = time.monotonic() + timeout
    while children := _browser_children():
        for pid, state in children.items():
            if state == "Z" or time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG if state != "Z" else 0)
        time.sleep(0.05)


def _open(page: Any, url: str) -> None:
    page.goto(url)
    expect(page.get_by_test_id("batch-table")).to_be_visible()
    # Survives only if the page is never reloaded.
    page.evaluate("window.__bsvNoReload = 'same page'")


def _same_page(page: Any) -> None:
    assert page.evaluate("window.__bsvNoReload") == "same page", "the page was reloaded"


def _confirm(page: Any, ok: bool = True) -> None:
    dialog = page.get_by_test_id("confirm-dialog")
    expect(dialog).to_be_visible()
    page.get_by_test_id("confirm-ok" if ok else "confirm-cancel").click()
    expect(dialog).to_be_hidden()


def test_live_progress_cancel_and_screenshot(daemons: DaemonFactory, page: Any) -> None:
    d = daemons("dash")
    _open(page, d.url + "/")
    expect(page.get_by_test_id("no-batches")).to_be_visible()

    # One item at a time, 5 x 0.3 s: about 1.5 s of work.
    done = d.submit("echo", [{"sleep": 0.3, "n": i} for i in range(5)], max_concurrency=1)
    bid = done["id"]
    expect(page.get_by_test_id(f"batch-row-{bid}")).to_be_visible()
    expect(page.get_by_test_id(f"batch-status-{bid}")).to_have_text("completed")
    bar = page.get_by_test_id(f"progress-{bid}")
    expect(bar).to_have_attribute("aria-valuenow", "100")
    assert d.batch(bid)["status"] == "completed"
    _same_page(page)

    # A long batch: cancel it from its row, behind the confirmation dialog.
    long = d.submit("sleeper", [{"sleep": 3600}, {"sleep": 3600}, {"sleep": 3600}])
    lid = long["id"]
    expect(page.get_by_test_id(f"batch-status-{lid}")).to_have_text("running")
    cancel = page.get_by_test_id(f"cancel-{lid}")
    expect(cancel).to_be_enabled()
    # Completed batches cannot be cancelled: the button says so by being disabled.
    expect(page.get_by_test_id(f"cancel-{bid}")).to_be_disabled()

    cancel.click()
    expect(page.get_by_test_id("confirm-message")).to_contain_text(lid[:8])
    _confirm(page, ok=False)  # "keep it": nothing is sent
    assert d.batch(lid)["status"] == "running"

    cancel.click()
    _confirm(page, ok=True)
    b = d.wait_status(lid, "cancelled")
    check_invariants(b)
    assert b["counts"]["cancelled"] == 3
    expect(page.get_by_test_id(f"batch-status-{lid}")).to_have_text("cancelled")
    expect(page.get_by_test_id(f"progress-{lid}")).to_have_attribute("aria-valuenow", "100")
    expect(page.get_by_test_id("toast")).to_contain_text("cancel")
    expect(cancel).to_be_disabled()
    _same_page(page)

    # The screenshot shows the completed batch's bar at 100 %.
    expect(bar).to_have_attribute("aria-valuenow", "100")
    OUTPUT.mkdir(exist_ok=True)
    shot = OUTPUT / "dashboard.png"
    page.get_by_test_id("toast").evaluate("el => { el.hidden = true; }")
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000


def test_detail_view_streams_errors_and_log(daemons: DaemonFactory, page: Any) -> None:
    d = daemons("detail")
    # Paused right after submission: at most the first item (one at a time) runs.
    b = d.submit("echo", [{"sleep": 0.3, "n": i} for i in range(4)], max_concurrency=1)
    bid = b["id"]
    code, body, _ = d.api("POST", f"/v1/batches/{bid}/pause")
    assert code == 200, body
    d.wait_status(bid, "paused")
    failing = d.submit("fails", [{"n": "x"}])
    d.wait_status(failing["id"], "failed")

    _open(page, d.url + "/")
    page.get_by_test_id(f"batch-link-{bid}").click()
    expect(page.get_by_test_id("detail-id")).to_have_text(bid)
    status = page.get_by_test_id("detail-status")
    expect(status).to_have_text("paused")
    expect(page.get_by_test_id("detail-cancel")).to_be_enabled()
    expect(page.get_by_test_id("detail-pause")).to_be_disabled()
    expect(page.locator("[data-testid^=item-row-]")).to_have_count(4)

    # Resume from the page. The detail view does not poll: "completed" and 100 can only
    # arrive over the batch's event stream.
    page.get_by_test_id("detail-resume").click()
    _confirm(page)
    expect(status).to_have_text("completed")
    expect(page.get_by_test_id("detail-progress")).to_have_attribute("aria-valuenow", "100")
    expect(page.get_by_test_id("count-succeeded")).to_have_text("4")
    log = page.get_by_test_id("log-entry")
    for action in ("created", "paused", "resumed", "finished"):
        expect(log.and_(page.locator(f"[data-action={action}]"))).to_have_count(1)
    expect(page.locator("[data-testid^=item-status-]").filter(has_text="succeeded")).to_have_count(
        4
    )
    _same_page(page)

    # The failed batch: its item's whole error history, one entry per attempt.
    page.get_by_test_id("back").click()
    page.get_by_test_id(f"batch-link-{failing['id']}").click()
    expect(page.get_by_test_id("detail-status")).to_have_text("failed")
    expect(page.get_by_test_id("detail-retry")).to_be_enabled()
    (item,) = d.items(failing["id"])
    page.get_by_test_id(f"item-errors-{item['id']}").click()
    history = page.get_by_test_id(f"item-history-{item['id']}")
    expect(history.locator("li")).to_have_count(3)
    for attempt in (1, 2, 3):
        expect(history).to_contain_text(f"attempt {attempt}: ValueError")
        expect(history).to_contain_text(f"on attempt {attempt}")
    _same_page(page)
    OUTPUT.mkdir(exist_ok=True)
    page.get_by_test_id("toast").evaluate("el => { el.hidden = true; }")
    page.screenshot(path=str(OUTPUT / "dashboard-detail.png"), full_page=True)


def test_item_progress_is_shown_and_streamed(
    daemons: DaemonFactory, page: Any, tmp_path: pathlib.Path
) -> None:
    steps = {"type": "python", "target": "tests.handlers:reports_progress", "timeout": "30s"}
    d = daemons("progress", handlers={"steps": steps})
    first, second = tmp_path / "first", tmp_path / "second"
    holds = {"1": str(first), "3": str(second)}
    b = d.submit("steps", [{"total": 4, "holds": holds, "note": "fetching"}])
    _open(page, d.url + "/")
    page.get_by_test_id(f"batch-link-{b['id']}").click()
    (item,) = d.items(b["id"])
    shown = page.get_by_test_id(f"item-progress-{item['id']}")
    expect(shown).to_have_text("1 / 4 · fetching")
    first.touch()  # the next report reaches the open page only over the event stream
    expect(shown).to_have_text("3 / 4 · fetching")
    second.touch()
    expect(page.get_by_test_id(f"item-status-{item['id']}")).to_have_text("succeeded")
    expect(shown).to_have_text("")  # finished: no live progress
    _same_page(page)


def test_token_auth_and_streaming_with_a_token(daemons: DaemonFactory, page: Any) -> None:
    token = "dashboard-test-token"
    d = daemons(
        "auth",
        extra={
            "auth": {
                "tokens": [
                    {
                        "name": "ops",
                        "tenant": "acme",
                        "sha256": hashlib.sha256(token.encode()).hexdigest(),
                        "scopes": ["read", "write"],
                    }
                ]
            }
        },
    )
    auth = {"Authorization": f"Bearer {token}"}
    code, body, _ = d.api(
        "POST",
        "/v1/batches",
        {"handler": "echo", "items": [{"sleep": 0.3}, {"sleep": 0.3}], "max_concurrency": 1},
        auth,
    )
    assert code == 201, body
    bid = body["id"]
    code, body, _ = d.api("POST", f"/v1/batches/{bid}/pause", headers=auth)
    assert code == 200, body

    page.goto(d.url + "/")
    panel = page.get_by_test_id("token-panel")
    expect(panel).to_be_visible()
    expect(page.get_by_test_id("conn-status")).to_contain_text("token required")

    page.get_by_test_id("token-input").fill("wrong")
    page.get_by_test_id("token-save").click()
    expect(panel).to_be_visible()
    expect(panel).to_contain_text("refused")

    page.get_by_test_id("token-input").fill(token)
    page.get_by_test_id("token-save").click()
    expect(panel).to_be_hidden()
    assert page.evaluate("sessionStorage.getItem('batch-supervisor.token')") == token
    expect(page.get_by_test_id(f"batch-status-{bid}")).to_have_text("paused")

    # The detail view learns of progress only from the event stream, which needs the
    # token too: fetch() streaming sends it (EventSource could not).
    page.get_by_test_id(f"batch-link-{bid}").click()
    expect(page.get_by_test_id("detail-status")).to_have_text("paused")
    page.get_by_test_id("detail-resume").click()
    _confirm(page)
    expect(page.get_by_test_id("detail-status")).to_have_text("completed")
    expect(page.get_by_test_id("detail-progress")).to_have_attribute("aria-valuenow", "100")
    code, body, _ = d.api("GET", f"/v1/batches/{bid}", headers=auth)
    assert code == 200 and body["status"] == "completed", body


def test_a_scheduled_batch_shows_its_time_and_starts_now_from_the_page(
    daemons: DaemonFactory, page: Any
) -> None:
    d = daemons("dash-sched")
    later = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    bid = d.submit("echo", [1, 2], not_before=later)["id"]
    _open(page, d.url + "/")
    expect(page.get_by_test_id(f"batch-status-{bid}")).to_have_text("scheduled")
    expect(page.get_by_test_id(f"pause-{bid}")).to_be_disabled()
    page.get_by_test_id(f"batch-link-{bid}").click()
    expect(page.get_by_test_id("detail-status")).to_have_text("scheduled")
    expect(page.get_by_test_id("detail-not-before")).not_to_have_text("—")
    page.get_by_test_id("detail-start").click()
    _confirm(page)
    expect(page.get_by_test_id("detail-status")).to_have_text("completed")
    assert d.batch(bid)["counts"]["succeeded"] == 2
    _same_page(page)
