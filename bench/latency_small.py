"""Scenario ``latency_small``: how long one 10-item batch takes, submit to
terminal, on an idle daemon and on one busy with other small batches.

A probe POSTs a 10-item batch of ``bench.handlers:stamp`` (each item returns its
handler's start time), then polls ``GET /v1/batches/{id}`` every 5 ms
(``PROBE_POLL_S``) until it is terminal, waits 50 ms and sends the next. Per probe:

- pick-up: the POST's send time -> the first item's handler start;
- terminal: the POST's send time -> the batch's ``finished_at`` (the daemon's
  commit time: independent of the polling);
- observed: the POST's send time -> the poll that saw it terminal (what a client
  polling every 5 ms sees: terminal plus up to one interval and one GET).

Busy: 16 other clients loop, each POSTing a 10-item no-op batch and polling it
every 20 ms (``LOAD_POLL_S``) until terminal, then the next; the rate they get
through is reported too. The daemon has ``concurrency = 64``. Polling, not SSE:
the event stream sends at most about five snapshots a second, coarser than what
is measured here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

import aiohttp

from bench.context import Ctx
from bench.harness import Daemon, Results, parse_ts, percentile, running_daemon

PROBE_POLL_S = 0.005
LOAD_POLL_S = 0.02
GAP_S = 0.05
SIZE = 10
TERMINAL = ("completed", "completed_with_errors", "failed", "cancelled")


async def _until_terminal(
    s: aiohttp.ClientSession, url: str, interval: float, limit_s: float = 60.0
) -> tuple[dict[str, object], float]:
    deadline = time.monotonic() + limit_s
    while True:
        async with s.get(url) as r:
            b = await r.json()
        if b["status"] in TERMINAL:
            return b, time.time()
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} not terminal after {limit_s}s")
        await asyncio.sleep(interval)


async def _probes(d: Daemon, samples: int) -> dict[str, list[float]]:
    body = json.dumps({"handler": "stamp", "items": [{}] * SIZE}).encode()
    headers = {"Content-Type": "application/json"}
    out: dict[str, list[float]] = {"pickup": [], "terminal": [], "observed": []}
    conn = aiohttp.TCPConnector(limit=1)
    async with aiohttp.ClientSession(connector=conn) as s:
        for _ in range(samples):
            await asyncio.sleep(GAP_S)
            sent = time.time()
            async with s.post(d.url + "/v1/batches", data=body, headers=headers) as r:
                batch = await r.json()
                if r.status != 201:
                    raise RuntimeError(f"POST -> {r.status}: {batch}")
            b, seen = await _until_terminal(s, f"{d.url}/v1/batches/{batch['id']}", PROBE_POLL_S)
            if b["status"] != "completed":
                raise RuntimeError(f"probe batch ended {b['status']}")
            async with s.get(f"{d.url}/v1/batches/{batch['id']}/items") as r:
                items = (await r.json())["items"]
            out["pickup"].append(min(it["result"]["t"] for it in items) - sent)
            out["terminal"].append(parse_ts(str(b["finished_at"])) - sent)
            out["observed"].append(seen - sent)
    return out


async def _load(d: Daemon, done: list[int], stop: asyncio.Event) -> None:
    """One background client: a 10-item no-op batch, polled to terminal, again."""
    body = json.dumps({"handler": "noop", "items": list(range(SIZE))}).encode()
    headers = {"Content-Type": "application/json"}
    conn = aiohttp.TCPConnector(limit=1)
    async with aiohttp.ClientSession(connector=conn) as s:
        while not stop.is_set():
            async with s.post(d.url + "/v1/batches", data=body, headers=headers) as r:
                batch = await r.json()
            await _until_terminal(s, f"{d.url}/v1/batches/{batch['id']}", LOAD_POLL_S)
            done[0] += SIZE


def _add(results: Results, key: str, label: str, lat: dict[str, list[float]]) -> None:
    names = {
        "pickup": "submit -> first handler start",
        "terminal": "submit -> finished_at",
        "observed": f"submit -> seen terminal ({PROBE_POLL_S * 1000:g} ms polls)",
    }
    for what, name in names.items():
        for p in (50, 99):
            results.add(
                f"{key}.{what}.p{p}",
                f"{label}: {name} p{p}",
                "ms",
                1000 * percentile(lat[what], p),
                higher=False,
            )


async def run(ctx: Ctx, results: Results) -> None:
    samples = ctx.scaled(200, 20)
    for _ in range(ctx.runs):
        dsn = await ctx.server.new_database("lats")
        try:
            async with running_daemon(ctx.work_dir, dsn, "lats") as (d, _):
                await _probes(d, 10)  # warm-up: first connections, plans, caches
                idle = await _probes(d, samples)
                done = [0]
                stop = asyncio.Event()
                load = [asyncio.create_task(_load(d, done, stop)) for _ in range(ctx.clients)]
                try:
                    await asyncio.sleep(1.0)  # let the load settle
                    n0, t0 = done[0], time.perf_counter()
                    busy = await _probes(d, samples)
                    rate = (done[0] - n0) / (time.perf_counter() - t0)
                finally:
                    stop.set()
                    for t in load:
                        with contextlib.suppress(Exception):
                            await t
        finally:
            await ctx.server.drop_database(dsn)
        _add(results, "latency_small.idle", f"latency_small idle ({SIZE} items)", idle)
        _add(results, "latency_small.busy", f"latency_small busy ({ctx.clients} clients)", busy)
        results.add(
            "latency_small.load",
            f"latency_small: the {ctx.clients} clients' items meanwhile",
            "items/s",
            rate,
        )
