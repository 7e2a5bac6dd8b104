"""Keyed limits across daemons: two daemons share one database and one handler
with a key limit; what ran (each attempt's start and end, recorded by the
handler with its pid) never has more than the key's concurrency in flight per
key, nor more starts per key than its rate allows."""

from __future__ import annotations

import json
import pathlib
from collections import defaultdict
from typing import Any

from tests.daemon import DEFAULT_HANDLERS, wait_for
from tests.test_scheduling import echo_handler, max_overlap, runlog

DOMAINS = ["a.example", "b.example", "c.example", "d.example"]


def by_domain(events: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """The run log's events per domain (the item key is "<domain>#<n>")."""
    out: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for e in events:
        out[e["key"].split("#")[0]].append(e)
    return out


def items(domains: list[str], per: int, **payload: Any) -> list[dict[str, Any]]:
    return [
        {"key": f"{d}#{i}", "payload": {"domain": d, "i": i, **payload}}
        for i in range(per)
        for d in domains
    ]


def test_one_at_a_time_per_domain_across_two_daemons(daemons: Any, tmp_path: pathlib.Path) -> None:
    log = tmp_path / "runs.jsonl"
    # Each daemon runs at most two at a time (the handler's concurrency per
    # daemon), so both run some of the four keys' items.
    handlers = dict(DEFAULT_HANDLERS) | {
        "scrape": echo_handler(concurrency=2, key_limit={"key": "/domain", "concurrency": 1})
    }
    env = {"BSV_TEST_RUNLOG": str(log)}
    a = daemons("a", handlers=handlers, env=env, worker={"concurrency": 8})
    daemons("b", handlers=handlers, env=env, worker={"concurrency": 8})
    # Two batches, so items of one key are in both.
    first = a.submit("scrape", items(DOMAINS, 5, sleep=0.1))
    second = a.submit("scrape", items(DOMAINS[:2], 5, sleep=0.1, again=True))
    a.wait_status(first["id"], "completed", timeout=60)
    a.wait_status(second["id"], "completed", timeout=60)
    events = runlog(log)
    assert len([e for e in events if e["event"] == "start"]) == 30
    assert len({e["pid"] for e in events}) == 2, "both daemons should have run some items"
    per_key = {d: max_overlap(ev) for d, ev in by_domain(events).items()}
    assert per_key == dict.fromkeys(DOMAINS, 1), per_key
    # The keys ran side by side: the limit is per key, not per handler.
    assert max_overlap(events) > 1


def test_the_rate_per_domain_holds_across_two_daemons(daemons: Any, tmp_path: pathlib.Path) -> None:
    log = tmp_path / "runs.jsonl"
    handlers = dict(DEFAULT_HANDLERS) | {
        "scrape": echo_handler(key_limit={"key": "/domain", "rate_limit": "5/s"})
    }
    env = {"BSV_TEST_RUNLOG": str(log)}
    a = daemons("a", handlers=handlers, env=env)
    daemons("b", handlers=handlers, env=env)
    b = a.submit("scrape", items(DOMAINS[:2], 10))
    a.wait_status(b["id"], "completed", timeout=60)
    for domain, events in by_domain(runlog(log)).items():
        starts = sorted(e["t"] for e in events if e["event"] == "start")
        assert len(starts) == 10, domain
        worst = max(sum(1 for t in starts if s <= t < s + 1.0) for s in starts)
        assert worst <= 6, (domain, worst)  # 5/s, one start of burst
        assert starts[-1] - starts[0] >= 1.5, domain  # ten starts at 5/s take ~1.8 s


def test_a_payload_value_that_cannot_be_a_key_is_refused_naming_it(daemons: Any) -> None:
    handlers = dict(DEFAULT_HANDLERS) | {
        "scrape": echo_handler(key_limit={"key": "/site/domain", "concurrency": 1})
    }
    d = daemons("a", handlers=handlers)
    status, body, _ = d.api(
        "POST",
        "/v1/batches",
        {
            "handler": "scrape",
            "items": [{"site": {"domain": "ok"}}, {"payload": {"site": {"domain": [1]}}}],
        },
    )
    assert status == 422, body
    assert [e["path"] for e in body["errors"]] == ["/items/1/payload/site/domain"], body
    # A payload without the value runs under the shared key "" (and nothing was
    # written by the refused submission).
    ok = d.submit("scrape", [{"site": {}}, {"site": {"domain": 7}}, "bare"])
    d.wait_status(ok["id"], "completed", timeout=30)
    assert [i["limit_key"] for i in d.items(ok["id"])] == ["", "7", ""]
    status, listing, _ = d.api("GET", "/v1/batches")
    assert status == 200 and len(listing["batches"]) == 1, listing


def test_a_killed_daemons_item_holds_its_key_until_it_is_reclaimed(
    daemons: Any, tmp_path: pathlib.Path
) -> None:
    """Daemon a runs x#0, which hangs, and is killed; b must not start x#1 (key
    concurrency 1) until its reaper has reclaimed x#0 (one attempt: failed)."""
    log = tmp_path / "runs.jsonl"
    handlers = dict(DEFAULT_HANDLERS) | {
        "scrape": echo_handler(max_attempts=1, key_limit={"key": "/domain", "concurrency": 1})
    }
    env = {"BSV_TEST_RUNLOG": str(log)}
    a = daemons("a", handlers=handlers, env=env)
    batch = a.submit(
        "scrape",
        [
            {"key": "x#0", "payload": {"domain": "x", "sleep": 3600}},
            {"key": "x#1", "payload": {"domain": "x"}},
        ],
    )
    wait_for(lambda: any(e["key"] == "x#0" for e in runlog(log)), 20, what="x#0 started on a")
    b = daemons("b", handlers=handlers, env=env)
    a.kill()
    b.wait_status(batch["id"], "completed_with_errors", timeout=60)
    items = {i["key"]: i for i in b.items(batch["id"])}
    assert items["x#0"]["status"] == "failed" and items["x#1"]["status"] == "succeeded", items
    assert "WorkerLost" in json.dumps(items["x#0"]["error"])
    # x#1 started only once x#0 had left running (reclaimed), never beside it.
    assert items["x#1"]["started_at"] >= items["x#0"]["finished_at"], items
    starts = [e for e in runlog(log) if e["event"] == "start"]
    assert [e["key"] for e in starts] == ["x#0", "x#1"], starts
