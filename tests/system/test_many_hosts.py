"""Four daemons, four identities, one database, SIGKILLs in the middle of the work.

What the scale-out promises, measured from outside rather than assumed:

1. The global limits hold across every daemon: a handler's
   ``global_concurrency`` is never exceeded and its ``rate_limit`` bounds the
   starts, counted from the start and end times the handlers themselves write
   (tests/handlers.py: one O_APPEND line per event, CLOCK_MONOTONIC), also while
   a killed daemon's items wait to be reclaimed and after they are.
2. Fairness: batches submitted to different daemons all progress at once.
3. Every batch ends terminal exactly once: one ``finished`` entry in its log,
   counters equal to its items' statuses, ``doctor`` clean.
4. Any daemon reads and controls a batch submitted to any other, and an SSE
   stream on one daemon sees the end of a batch that others submitted and ran.

A SIGKILLed daemon's handlers die with it (python handlers run in the daemon's
process), so a reclaimed attempt never overlaps its predecessor: the lease rules
let a reclaimed attempt run beside the old one only when the old daemon is alive
with a heartbeat older than ``dead_after`` (stalled; its late write is then
fenced, see test_operations.py::test_stalled_daemon_late_writes_are_fenced).
The kill time stands in for the end a killed attempt never wrote.
"""

from __future__ import annotations

import itertools
import pathlib
import threading
import time
from collections import defaultdict
from typing import Any

from tests.chaos.common import TERMINAL, assert_no_drift, read_runlog
from tests.conftest import DaemonFactory
from tests.daemon import Daemon, check_invariants, sse_events, wait_for
from tests.system.test_operations import item_detail

NAMES = ("a", "b", "c", "d")
CAP = 3  # global_concurrency of "capped"
CAPPED_ITEMS = 12  # per capped batch, 0.3 s each: four batches take about 5 s
RATE = 10.0  # rate_limit of "rated", per second
BURST = 1  # what its bucket holds: max(1, RATE x dispatcher.RATE_BURST_S)
# How late a handler may start after its claim took the token (claim commit,
# reply, a free worker): one more token's worth, and a window a little wider.
START_LAG_S = 0.2
# Short liveness intervals: a killed daemon's items are reclaimed about 2 s later.
WORKER: dict[str, Any] = {
    "concurrency": 8,
    "poll_interval": "200ms",
    "heartbeat_interval": "250ms",
    "dead_after": "2s",
    "drain_timeout": "5s",
}


def _handler(target: str, **extra: Any) -> dict[str, Any]:
    return {
        "type": "python",
        "target": f"tests.handlers:{target}",
        "timeout": "1h",
        # kills must not exhaust an item's attempts: every batch should complete
        "max_attempts": 20,
        **extra,
    }


HANDLERS: dict[str, dict[str, Any]] = {
    "capped": _handler("echo", global_concurrency=CAP),
    "rated": _handler("echo", rate_limit=f"{RATE:g}/s"),
    "hold": _handler("until_file"),
}


class Fleet:
    """The four daemons, started together, and what their kills left behind."""

    def __init__(
        self,
        daemons: DaemonFactory,
        runlog: pathlib.Path,
        handlers: dict[str, dict[str, dict[str, Any]]] | None = None,
    ) -> None:
        self.by_name: dict[str, Daemon] = {}
        for n in NAMES:
            self.by_name[n] = daemons(
                n,
                start=False,
                handlers=(handlers or {}).get(n, HANDLERS),
                worker=WORKER,
                env={"BSV_TEST_RUNLOG": str(runlog)},
            )
        self.all = list(self.by_name.values())
        self.pids: dict[int, str] = {}
        self.deaths: dict[int, float] = {}  # pid -> CLOCK_MONOTONIC once it is gone
        self.start(*NAMES)

    def __getitem__(self, name: str) -> Daemon:
        return self.by_name[name]

    def start(self, *names: str) -> None:
        for n in names:  # all at once: four start-ups overlap
            self[n].start(wait=False)
            self.pids[self[n].pid] = n
        for n in names:
            self[n].wait_ready()

    def kill(self, name: str) -> int:
        """SIGKILL (no drain, no deregistration); returns the pid that died."""
        pid = self[name].pid
        self[name].kill()  # returns once the process is reaped
        self.deaths[pid] = time.monotonic()
        return pid


def _running(
    fleet: Fleet, runlog: pathlib.Path, handler: str, *, besides: str = ""
) -> tuple[str, list[str]] | None:
    """A live daemon (not ``besides``) whose handlers run attempts of ``handler``
    now, by their own record (started, not ended), and the items of those attempts."""
    runs = [r for r in read_runlog(runlog) if r["handler"] == handler]
    ended = {(r["id"], r["attempt"]) for r in runs if r["event"] == "done"}
    held: dict[str, list[str]] = defaultdict(list)
    for r in runs:
        name = fleet.pids.get(r["pid"], "")
        if r["event"] == "start" and (r["id"], r["attempt"]) not in ended:
            if r["pid"] not in fleet.deaths and name != besides:
                held[name].append(r["id"])
    return next(iter(held.items()), None)


def _held_by(d: Daemon, batch_ids: list[str], worker: str) -> list[str]:
    """The items of these batches the database says ``worker`` runs."""
    return [
        it["id"] for bid in batch_ids for it in d.items(bid, "running") if it["worker"] == worker
    ]


def _intervals(
    runs: list[dict[str, Any]], deaths: dict[int, float], handler: str
) -> dict[tuple[str, int], tuple[float, float, int]]:
    """(item, attempt) -> (start, end, pid) of every attempt of ``handler`` that
    started; a killed daemon's unfinished attempt ends when its process died."""
    starts = {
        (r["id"], r["attempt"]): r
        for r in runs
        if r["event"] == "start" and r["handler"] == handler
    }
    ends = {
        (r["id"], r["attempt"]): r["mono"]
        for r in runs
        if r["event"] == "done" and r["handler"] == handler
    }
    out: dict[tuple[str, int], tuple[float, float, int]] = {}
    for k, r in starts.items():
        if k in ends:
            out[k] = (r["mono"], ends[k], r["pid"])
        else:
            # Only a killed daemon leaves an attempt without its end.
            assert r["pid"] in deaths, ("attempt never ended", r)
            out[k] = (r["mono"], deaths[r["pid"]], r["pid"])
    return out


def _peak(intervals: list[tuple[float, float, int]]) -> int:
    """Most attempts running at one instant (an end before a start at the same time:
    an outcome is written before the slot it frees is claimed)."""
    edges = sorted([(s, 1) for s, _, _ in intervals] + [(e, -1) for _, e, _ in intervals])
    level = peak = 0
    for _, step in edges:
        level += step
        peak = max(peak, level)
    return peak


def _finished_once(d: Daemon, batch_id: str) -> dict[str, Any]:
    """The batch is terminal, its log says so exactly once (last), and its counters
    are its items' statuses."""
    b = d.batch(batch_id)
    assert b["status"] in TERMINAL, b
    check_invariants(b)
    status, log, _ = d.api("GET", f"/v1/batches/{batch_id}/log")
    assert status == 200, log
    actions = [e["action"] for e in log["entries"]]
    assert actions.count("finished") == 1, actions
    assert actions[-1] == "finished", actions
    per_status: dict[str, int] = defaultdict(int)
    for it in d.items(batch_id):
        per_status[it["status"]] += 1
    counts = {k: v for k, v in b["counts"].items() if k != "total" and v}
    assert counts == dict(per_status), (b["counts"], dict(per_status))
    assert b["counts"]["total"] == sum(per_status.values()), b
    return b


def test_four_daemons_hold_the_global_limits_stay_fair_and_finish_once_through_kills(
    daemons: DaemonFactory, tmp_path: pathlib.Path
) -> None:
    runlog = tmp_path / "runs.jsonl"
    fleet = Fleet(daemons, runlog)

    # One capped batch submitted to each daemon; two rated ones to two of them.
    capped = [
        fleet[n].submit("capped", [{"sleep": 0.3, "b": n, "i": i} for i in range(CAPPED_ITEMS)])[
            "id"
        ]
        for n in NAMES
    ]
    rated = [
        fleet[n].submit("rated", [{"sleep": 0.02, "b": n, "i": i} for i in range(15)])["id"]
        for n in ("c", "d")
    ]
    everything = capped + rated

    # Kill a daemon while its handlers run capped items and restart it at once:
    # its restart reclaims its items.
    first, _ = wait_for(lambda: _running(fleet, runlog, "capped"), 20, what="capped running")
    fleet.kill(first)
    fleet.start(first)

    # Kill another one while it runs capped items and leave it down: the others'
    # reapers must reclaim what it held (after dead_after) before it comes back.
    second, lost = wait_for(
        lambda: _running(fleet, runlog, "capped", besides=first), 20, what="capped elsewhere"
    )
    fleet.kill(second)
    wait_for(
        lambda: not _held_by(fleet[first], everything, second),
        15,
        what=f"{second}'s items reclaimed",
    )
    for item_id in lost:
        errors = item_detail(fleet[first], item_id)["errors"]
        assert [e["worker"] for e in errors if e["type"] == "WorkerLost"] == [second], errors
    fleet.start(second)

    # Each batch is read on a daemon other than the one it was submitted to.
    for i, bid in enumerate(everything):
        reader = fleet[NAMES[(i + 1) % 4]]
        reader.wait_status(bid, TERMINAL, 60)
        b = _finished_once(reader, bid)
        assert b["status"] == "completed", b

    runs = read_runlog(runlog)
    deaths = fleet.deaths

    # 1a. global_concurrency: never more than CAP at once, across four daemons
    # and two kills; and CAP is reached (the limit is what held them back).
    cap_iv = _intervals(runs, deaths, "capped")
    assert _peak(list(cap_iv.values())) == CAP, sorted(cap_iv.values())
    # Both kills interrupted running attempts, and every item's attempts ran one
    # after the other: a reclaimed attempt started after its predecessor died.
    assert {fleet.pids[pid] for pid in deaths} == {first, second}
    for pid in deaths:
        assert any(p == pid and e == deaths[pid] for _, e, p in cap_iv.values()), pid
    per_item: dict[str, list[tuple[int, float, float]]] = defaultdict(list)
    for (item_id, attempt), (s, e, _) in cap_iv.items():
        per_item[item_id].append((attempt, s, e))
    for item_id, attempts in per_item.items():
        attempts.sort()
        for (_, _, end), (_, start, _) in itertools.pairwise(attempts):
            assert start > end, (item_id, attempts)

    # 1b. rate_limit: the bucket lets at most BURST + RATE x w claims happen in any
    # w seconds; a start may lag its claim by START_LAG_S.
    rate_starts = sorted(s for s, _, _ in _intervals(runs, deaths, "rated").values())
    assert len(rate_starts) >= 30
    for i, t0 in enumerate(rate_starts):
        for j in range(i, len(rate_starts)):
            w = rate_starts[j] - t0
            assert j - i + 1 <= BURST + RATE * (w + START_LAG_S), (i, j, w)
    # 30 starts at 10/s take about 3 s (without the limit: a few milliseconds).
    assert rate_starts[-1] - rate_starts[0] >= (30 - BURST) / RATE - START_LAG_S

    # 2. Fairness: when the first capped batch had finished, every other one had
    # started at least half of its items (taking turns, they are nearly through;
    # served one after another, the last ones would not have started).
    first_start: dict[str, float] = {}
    for (item_id, _), (s, _, _) in cap_iv.items():
        first_start[item_id] = min(s, first_start.get(item_id, s))
    batch_of = {r["id"]: r["batch"] for r in runs}
    last_end: dict[str, float] = defaultdict(float)
    for (item_id, _), (_, e, _) in cap_iv.items():
        last_end[batch_of[item_id]] = max(last_end[batch_of[item_id]], e)
    first_done = min(last_end[b] for b in capped)
    started = {
        b: sum(1 for i, s in first_start.items() if batch_of[i] == b and s < first_done)
        for b in capped
    }
    assert min(started.values()) >= CAPPED_ITEMS // 2, started

    # 3. Exactly once, and nothing drifted (checked above per batch, and here
    # over the whole database).
    assert_no_drift(fleet["a"])


class Stream(threading.Thread):
    """An SSE stream read as it arrives: (event, data) pairs until the server closes."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.events: list[tuple[str, Any]] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for event, data, _ in sse_events(self.url, timeout=60):
                self.events.append((event, data))
        except BaseException as exc:  # reported by the test that reads the stream
            self.error = exc


def test_any_daemon_reads_and_controls_any_batch_and_streams_what_others_finish(
    daemons: DaemonFactory, tmp_path: pathlib.Path
) -> None:
    runlog = tmp_path / "runs.jsonl"
    # a cannot run "remote": whatever a's stream shows, the others did.
    remote = {"remote": _handler("until_file")}
    others = HANDLERS | remote
    fleet = Fleet(daemons, runlog, {"a": HANDLERS, "b": others, "c": others, "d": others})

    def gate(name: str) -> str:
        return str(tmp_path / f"gate-{name}")

    # Submit on a, read on b.
    x = fleet["a"].submit(
        "hold", [{"file": gate("x"), "i": i} for i in range(3)], max_concurrency=1
    )["id"]
    seen = fleet["b"].batch(x)
    assert (seen["id"], seen["handler"], seen["counts"]["total"]) == (x, "hold", 3)
    wait_for(lambda: fleet["b"].batch(x)["counts"]["running"] == 1, 20, what="x runs")

    # Pause on c: every daemon sees it paused.
    status, body, _ = fleet["c"].api("POST", f"/v1/batches/{x}/pause")
    assert status == 200 and body["status"] == "paused", body
    paused_at = time.monotonic()
    for d in fleet.all:
        assert d.batch(x)["status"] == "paused"
    # Kill and restart c meanwhile: the pause is in the database, not in c.
    fleet.kill("c")
    fleet.start("c")
    # The running attempt finishes (or was reclaimed with c); nothing new starts:
    # a later batch of the same handler runs to its end while x stays put (the
    # claims that took z's three items had room for one of x's).
    pathlib.Path(gate("x")).touch()
    wait_for(lambda: fleet["d"].batch(x)["counts"]["running"] == 0, 20, what="x idle")
    z = fleet["b"].submit("hold", [{"file": gate("x"), "i": i} for i in range(3)])["id"]
    fleet["c"].wait_status(z, "completed", 20)
    assert fleet["a"].batch(x)["status"] == "paused"
    assert fleet["a"].batch(x)["counts"]["queued"] >= 2

    # Resume on d: x finishes; none of its attempts started while it was paused.
    # (paused_at follows the pause's reply, resumed_at precedes the resume's request)
    resumed_at = time.monotonic()
    status, body, _ = fleet["d"].api("POST", f"/v1/batches/{x}/resume")
    assert status == 200 and body["status"] != "paused", body
    fleet["b"].wait_status(x, "completed", 20)
    x_items = {it["id"] for it in fleet["a"].items(x)}
    x_starts = [
        r["mono"] for r in read_runlog(runlog) if r["id"] in x_items and r["event"] == "start"
    ]
    assert not [s for s in x_starts if paused_at < s < resumed_at], (
        paused_at,
        resumed_at,
        x_starts,
    )

    # Submit on d, cancel on b: the running attempts (wherever they run) stop.
    y = fleet["d"].submit("hold", [{"file": gate("never"), "i": i} for i in range(4)])["id"]
    wait_for(lambda: fleet["a"].batch(y)["counts"]["running"] == 4, 20, what="y runs")
    status, body, _ = fleet["b"].api("POST", f"/v1/batches/{y}/cancel")
    assert status == 200, body
    for d in fleet.all:
        done = d.wait_status(y, "cancelled", 20)
        assert done["counts"]["cancelled"] == 4, done

    # A stream on a sees the end of a batch submitted to b and run by b, c or d.
    w = fleet["b"].submit("remote", [{"file": gate("w"), "i": i} for i in range(3)])["id"]
    stream = Stream(f"{fleet['a'].url}/v1/batches/{w}/events")
    stream.start()
    wait_for(lambda: stream.events or stream.error, 20, what="first snapshot on a")
    assert stream.events[0][0] == "snapshot", stream.events
    assert stream.events[0][1]["status"] not in TERMINAL, stream.events
    wait_for(lambda: fleet["c"].batch(w)["counts"]["running"] == 3, 20, what="w runs")
    victim = fleet["c"].items(w, "running")[0]["worker"]
    fleet.kill(victim)  # one of those running it dies; its restart reclaims, all finish
    fleet.start(victim)
    pathlib.Path(gate("w")).touch()
    stream.join(30)
    assert not stream.is_alive() and stream.error is None, (stream.error, stream.events)
    assert stream.events[-1][0] == "end", stream.events
    last = [data for kind, data in stream.events if kind == "snapshot"][-1]
    assert last["status"] == "completed", last
    assert {it["worker"] for it in fleet["a"].items(w)} <= {"b", "c", "d"}

    for bid in (x, z, y, w):
        _finished_once(fleet["c"], bid)
    status, log, _ = fleet["d"].api("GET", f"/v1/batches/{x}/log")
    assert [e["action"] for e in log["entries"] if e["action"] in ("paused", "resumed")] == [
        "paused",
        "resumed",
    ], log
    assert_no_drift(fleet["b"])
