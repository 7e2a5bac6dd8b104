"""What the limits per key are doing, seen from outside: GET /v1/limits lists
each key's running items as the database has them (whichever daemon runs
them), and the limit-wait metrics measure how long keyed items were held."""

from __future__ import annotations

from typing import Any

from tests.daemon import DEFAULT_HANDLERS, wait_for
from tests.system.test_operations import metrics_of
from tests.test_scheduling import echo_handler


def test_get_limits_counts_a_keys_running_items_on_both_daemons(daemons: Any) -> None:
    # One item per daemon at a time: the key's two running items are one on each.
    handlers = dict(DEFAULT_HANDLERS) | {
        "scrape": echo_handler(concurrency=1, key_limit={"key": "/domain", "concurrency": 2})
    }
    a = daemons("a", handlers=handlers)
    b = daemons("b", handlers=handlers)
    batch = a.submit(
        "scrape",
        [{"domain": "x.example", "sleep": 3600, "i": i} for i in range(3)]
        + [{"domain": "y.example"}],
    )

    def scrape() -> dict[str, Any]:
        status, body, _ = b.api("GET", "/v1/limits")
        assert status == 200, body
        (h,) = body["handlers"]
        assert h["name"] == "scrape"
        return dict(h)

    wait_for(lambda: scrape()["keys"] != [], 20, what="x.example running")
    wait_for(
        lambda: [(k["limit_key"], k["running"]) for k in scrape()["keys"]] == [("x.example", 2)],
        20,
        what="x.example running twice (and y.example done)",
    )
    h = scrape()
    assert h["keys"] == [
        {"limit_key": "x.example", "running": 2, "tokens": None, "throttled_until": None}
    ], h
    assert h["keys_truncated"] is False and h["key_limit"]["burst"] is None, h
    counts = a.batch(batch["id"])["counts"]
    assert (counts["running"], counts["queued"], counts["succeeded"]) == (2, 1, 1), counts
    cli = a.cli("limits")
    assert cli.returncode == 0, cli.stderr
    assert "keys in use: 1" in cli.stdout, cli.stdout
    assert "'x.example': running 2/2" in cli.stdout, cli.stdout
    status, _, _ = a.api("POST", f"/v1/batches/{batch['id']}/cancel")
    assert status == 200
    a.wait_status(batch["id"], "cancelled", timeout=30)
    wait_for(lambda: scrape()["keys"] == [], 20, what="no key in use once cancelled")


def test_limit_wait_metrics_measure_the_hold_and_fold_keys_past_the_cap(daemons: Any) -> None:
    handlers = dict(DEFAULT_HANDLERS) | {
        "scrape": echo_handler(key_limit={"key": "/domain", "concurrency": 1})
    }
    d = daemons("a", handlers=handlers, worker={"concurrency": 8})
    # x#1 waits for x#0 (one at a time per key): about a second held.
    held = d.submit("scrape", [{"domain": "x", "sleep": 1.0}, {"domain": "x"}])
    d.wait_status(held["id"], "completed", timeout=30)
    m = metrics_of(d)
    assert m['batch_supervisor_limit_wait_seconds_count{handler="scrape"}'] == 2.0, m
    assert m['batch_supervisor_limit_wait_seconds_sum{handler="scrape"}'] >= 0.9, m
    assert m['batch_supervisor_key_limit_wait_seconds_total{handler="scrape",limit_key="x"}'] >= 0.9
    # 30 more keys: 20 series in all, the keys past them counted as "_other".
    many = d.submit("scrape", [{"domain": f"k{i:02}"} for i in range(30)])
    d.wait_status(many["id"], "completed", timeout=30)
    m = metrics_of(d)
    series = {
        k: v for k, v in m.items() if k.startswith("batch_supervisor_key_limit_wait_seconds_total")
    }
    assert len(series) == 21, series
    assert 'batch_supervisor_key_limit_wait_seconds_total{handler="scrape",limit_key="_other"}' in (
        series
    ), series
    assert m['batch_supervisor_limit_wait_seconds_count{handler="scrape"}'] == 32.0, m
    total = m['batch_supervisor_limit_wait_seconds_sum{handler="scrape"}']
    assert abs(sum(series.values()) - total) < 1e-6, (series, total)
