"""Handlers the test daemons run (imported by target, e.g. ``tests.handlers:echo``).

Several record each execution in the file named by ``BSV_TEST_RUNLOG`` (one JSON
line per attempt) so tests can count executions across daemon processes. Each
line is one ``write`` to a file opened with O_APPEND, so lines of concurrent
daemons never interleave; ``mono`` is CLOCK_MONOTONIC, one clock for every
process on the machine, so the start and end times of different daemons compare.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from typing import Any

from supervisor import Item, PermanentError, RetryAfter


def _log_run(item: Item, event: str, **extra: Any) -> None:
    path = os.environ.get("BSV_TEST_RUNLOG")
    if path:
        line = json.dumps(
            extra
            | {
                "id": item.id,
                "batch": item.batch_id,
                "handler": item.handler,
                "key": item.key,
                "attempt": item.attempt,
                "event": event,
                "pid": os.getpid(),
                "t": time.time(),
                "mono": time.monotonic(),
            }
        )
        with open(path, "a", encoding="utf-8") as f:
            f.write(line + "\n")


async def echo(item: Item) -> Any:
    _log_run(item, "start")
    p = item.payload if isinstance(item.payload, dict) else {}
    if "sleep" in p:
        await asyncio.sleep(float(p["sleep"]))
    _log_run(item, "done")
    return {"echo": item.payload, "attempt": item.attempt}


async def costly(item: Item) -> Any:
    """echo that reports the attempt's actual cost (``actual`` in the payload) to
    its key budget, and logs it with its start."""
    p = item.payload if isinstance(item.payload, dict) else {}
    _log_run(item, "start", actual=p.get("actual"))
    await asyncio.sleep(float(p.get("sleep", 0)))
    if "actual" in p:
        item.report_cost(p["actual"])
    _log_run(item, "done")
    return {"echo": item.payload}


async def throttle_key(item: Item) -> Any:
    """echo, except that a first attempt whose payload has ``throttle`` (seconds)
    says its limit key is throttled: RetryAfter(throttle, scope="key")."""
    p = item.payload if isinstance(item.payload, dict) else {}
    if "throttle" in p and item.attempt == 1:
        _log_run(item, "throttled")
        raise RetryAfter(float(p["throttle"]), scope="key")
    return await echo(item)


def sync_echo(item: Item) -> Any:
    """A plain def: runs in a worker thread."""
    return {"sync": item.payload}


async def always_fails(item: Item) -> Any:
    raise ValueError(f"bad input {item.payload!r} on attempt {item.attempt}")


async def permanent(item: Item) -> Any:
    raise PermanentError(f"cannot process {item.payload!r}")


async def flaky(item: Item) -> Any:
    """Fails on the first attempt, succeeds after."""
    if item.attempt == 1:
        raise ConnectionError("transient upstream failure")
    return {"ok": item.attempt}


async def retry_after(item: Item) -> Any:
    if item.attempt == 1:
        raise RetryAfter(0.5, "upstream asked us to wait")
    return {"ok": item.attempt}


async def slow_first(item: Item) -> Any:
    """Attempt 1 hangs (until killed or cancelled); later attempts succeed quickly."""
    _log_run(item, "start")
    if item.attempt == 1:
        await asyncio.sleep(3600)
    _log_run(item, "done")
    return {"attempt": item.attempt}


async def sleeper(item: Item) -> Any:
    """Sleeps payload["sleep"] seconds (default 3600)."""
    _log_run(item, "start")
    p = item.payload if isinstance(item.payload, dict) else {}
    await asyncio.sleep(float(p.get("sleep", 3600)))
    _log_run(item, "done")
    return {"slept": p.get("sleep", 3600)}


async def callback_raises(item: Item) -> Any:
    raise RuntimeError("summary service is down")


async def callback_records(item: Item) -> Any:
    return {"saw": item.payload["summary"]["status"]}


async def two_args(item: Item, other: Any) -> Any:
    return None


not_callable = 42


async def gated(item: Item) -> Any:
    """Succeeds when payload["ok"] is true or the file BSV_TEST_GATE exists."""
    gate = os.environ.get("BSV_TEST_GATE", "")
    if item.payload.get("ok") or (gate and os.path.exists(gate)):
        return {"ok": True, "attempt": item.attempt}
    raise PermanentError("upstream rejected the item")


async def exits(item: Item) -> Any:
    """Calls ``sys.exit`` like a careless script would (poison input)."""
    import sys

    sys.exit(f"handler gave up on {item.payload}")


def exits_in_thread(item: Item) -> Any:
    """A plain ``def`` that raises SystemExit in its worker thread."""
    raise SystemExit(3)


async def unstorable_error(item: Item) -> Any:
    """Fails with a message PostgreSQL's jsonb cannot hold: a lone surrogate, as a
    non-UTF-8 file name decoded with ``surrogateescape`` gives."""
    name = b"report-\xff.pdf".decode("utf-8", "surrogateescape")
    if item.attempt == 1:
        raise OSError(f"cannot open {name}")
    return {"name": name}


async def absurd_retry(item: Item) -> Any:
    """Asks for a delay no timestamp can represent."""
    raise RetryAfter(1e300)


def sync_hangs(item: Item) -> Any:
    """A plain ``def`` that blocks its thread for payload["sleep"] seconds (default 60)."""
    p = item.payload if isinstance(item.payload, dict) else {}
    time.sleep(float(p.get("sleep", 60)))
    return "woke"


async def callback_slow(item: Item) -> Any:
    """A completion callback that takes a second."""
    await asyncio.sleep(1.0)
    return {"saw": item.payload["summary"]["status"]}


async def callback_until_flag(item: Item) -> Any:
    """Fails until the file named by the batch's metadata ``flag`` exists."""
    if not os.path.exists(item.payload["batch"]["metadata"]["flag"]):
        raise RuntimeError("the downstream service is down")
    return {"delivered": True}


async def callback_fails_timed(item: Item) -> Any:
    """Appends the time of each call to the batch's metadata ``times`` file, then fails."""
    with open(item.payload["batch"]["metadata"]["times"], "a") as f:
        f.write(f"{time.time()}\n")
    raise RuntimeError("still down")


async def until_file(item: Item) -> Any:
    """Runs until the file named by payload["file"] exists: a test decides when
    the item (and so its batch) finishes, without guessing a duration. With
    payload["fail_first"], attempt 1 fails at once (a batch to retry); with
    payload["then_fail"], it fails once the file exists (a batch that ends failed
    when the test says so)."""
    _log_run(item, "start")
    if item.attempt == 1 and item.payload.get("fail_first"):
        raise PermanentError("first attempt fails, as asked")
    path = str(item.payload["file"])
    while not os.path.exists(path):
        await asyncio.sleep(0.02)
    if item.payload.get("then_fail"):
        raise PermanentError("failed once released, as asked")
    _log_run(item, "done")
    return {"released": path}


async def reports_progress(item: Item) -> Any:
    """Reports steps 0..payload["total"]; payload["holds"] maps a step to a file:
    after reporting that step it waits until the file exists. payload["note"] goes
    with every report, "<NUL>" in it as a NUL character (a payload cannot carry one)."""
    total = int(item.payload["total"])
    holds = {int(step): path for step, path in item.payload.get("holds", {}).items()}
    note = str(item.payload.get("note", "")).replace("<NUL>", "\x00")
    for done in range(total + 1):
        await item.progress(done, total, note=note)
        while done in holds and not os.path.exists(holds[done]):
            await asyncio.sleep(0.02)
    return {"steps": total}


def sync_reports_progress(item: Item) -> Any:
    """A plain function (run in a thread) reports without ``await``, then holds
    until the file payload["file"] exists."""
    item.progress(1, 2, note="half")
    while not os.path.exists(item.payload["file"]):
        time.sleep(0.02)
    return "ok"


async def extends(item: Item) -> Any:
    """Asks for payload["extend"] more seconds, then sleeps payload["sleep"]."""
    left = item.extend(item.payload["extend"]) if "extend" in item.payload else None
    await asyncio.sleep(item.payload["sleep"])
    return {"left": left}


async def bad_progress(item: Item) -> Any:
    """Reports progress with a wrong argument type (a handler's bug)."""
    await item.progress("three", 10)  # type: ignore[arg-type]
    return None


async def crawls(item: Item) -> Any:
    """A toy crawler over payload["site"] (page -> the pages it links to): adds a
    linked page per link, keyed by the page, so each page is queued once however
    many pages link to it. payload["hold"] (a file): wait for it first;
    payload["fail_first"]: attempt 1 adds its links, then fails."""
    _log_run(item, "start")
    site: dict[str, list[str]] = item.payload["site"]
    page = str(item.payload["page"])
    links = site.get(page, [])
    item.add_items(
        [{"key": link, "payload": {**item.payload, "page": link}} for link in links]
        + [{"key": link, "payload": {**item.payload, "page": link}} for link in links]
    )
    hold = item.payload.get("hold")
    if hold:
        while not os.path.exists(hold):
            await asyncio.sleep(0.02)
    if item.payload.get("fail_first") and item.attempt == 1:
        raise RuntimeError("attempt 1 fails after adding its links")
    return {"page": page, "links": len(links)}


async def adds_keyless(item: Item) -> Any:
    """Adds payload["n"] items without keys (the root only), failing attempt 1
    after adding them when payload["fail_first"]; payload["hold"]: a file to wait
    for before succeeding."""
    _log_run(item, "start")
    if item.payload.get("root"):
        item.add_items([{"child": i} for i in range(item.payload["n"])])
        hold = item.payload.get("hold")
        while hold and not os.path.exists(hold):
            await asyncio.sleep(0.02)
        if item.payload.get("fail_first") and item.attempt == 1:
            raise RuntimeError("attempt 1 fails after adding")
    return {"ok": True}


async def adds_bad(item: Item) -> Any:
    """Adds an entry whose key is not a string (a handler's bug)."""
    item.add_items([{"key": 5, "payload": {}}])
    return None


async def until_file_shielded(item: Item) -> Any:
    """Like :func:`until_file`, but deaf to the daemon's stop: it runs until the
    file named by payload["file"] exists whatever happens, then succeeds. The
    attempt of a cancelled item that its daemon cannot stop, so its late
    outcome reaches the database."""
    import anyio

    _log_run(item, "start")
    path = str(item.payload["file"])
    with anyio.CancelScope(shield=True):
        while not os.path.exists(path):
            await anyio.sleep(0.02)
    _log_run(item, "done")
    return {"released": path}


def schedule_items(slot: Any) -> list[Any]:
    """A schedule's items_from: one item naming the slot it was called for."""
    return [{"key": slot.kind, "payload": {"slot_at": slot.slot_at.isoformat()}}]


def schedule_items_fail(slot: Any) -> list[Any]:
    raise RuntimeError(f"no portfolios for {slot.schedule}")


def schedule_items_hang(slot: Any) -> list[Any]:
    """A schedule's items_from that does not return for an hour."""
    time.sleep(3600)
    return []


_TRIAGE_ERRORS: dict[str, type[Exception]] = {
    "ConnectionError": ConnectionError,
    "ValueError": ValueError,
    "LookupError": LookupError,
}


async def triage(item: Item) -> Any:
    """Fails with the exception named by payload["raise"] (message
    payload["message"]) until the file payload["gate"] exists, then succeeds; no
    "raise": succeeds at once. Gives a batch failures of several types to triage."""
    p = item.payload if isinstance(item.payload, dict) else {}
    name = p.get("raise")
    if name and not (p.get("gate") and os.path.exists(str(p["gate"]))):
        raise _TRIAGE_ERRORS[str(name)](str(p.get("message", f"{name} on attempt {item.attempt}")))
    return {"ok": True, "attempt": item.attempt}
