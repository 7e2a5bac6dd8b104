"""Operations: real daemons, real signals, a real PostgreSQL outage.

Every test runs ``batch-supervisor run`` subprocesses against the suite's server
(tests/conftest.py) and observes them only from outside: HTTP API, /metrics,
their stderr, sd_notify datagrams, exit codes. Daemon configs use short intervals
(heartbeat 0.5 s, dead_after 3 s) so that liveness tests take seconds.
"""

from __future__ import annotations

import json
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import time
import tomllib
from datetime import datetime
from typing import Any

import pytest

from tests.conftest import DaemonFactory
from tests.daemon import DEFAULT_HANDLERS, ROOT, Daemon, check_invariants, request, wait_for
from tests.pgharness import TestServer

HEARTBEAT_S = 0.5  # tests/daemon.py default [worker] heartbeat_interval (= reaper interval)
DEAD_AFTER_S = 3.0  # tests/daemon.py default [worker] dead_after
SLACK_S = 2.5  # scheduling slack on a loaded 2-core machine


# -- helpers -------------------------------------------------------------------


def item_detail(d: Daemon, item_id: str) -> dict[str, Any]:
    status, body, _ = d.api("GET", f"/v1/items/{item_id}")
    assert status == 200, (status, body)
    return dict(body)


def workers(d: Daemon) -> list[dict[str, Any]]:
    status, body, _ = d.api("GET", "/v1/workers")
    assert status == 200, (status, body)
    return list(body["workers"])


def all_running_on(d: Daemon, batch_id: str, worker: str, n: int) -> bool:
    """All n items claimed by ``worker`` and their handlers actually started there
    (a claimed item may briefly wait in the daemon's prefetch window first)."""
    items = d.items(batch_id)
    claimed = len(items) == n and all(
        i["status"] == "running" and i["worker"] == worker for i in items
    )
    if not claimed:
        return False
    status, text, _ = d.api("GET", "/metrics")
    in_flight = sum(
        v
        for k, v in metric_samples(str(text)).items()
        if k.startswith("batch_supervisor_items_in_flight{")
    )
    return status == 200 and in_flight >= n


def metric_samples(text: str) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value} (labels as rendered)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def metrics_of(d: Daemon) -> dict[str, float]:
    status, body, _ = d.api("GET", "/metrics")
    assert status == 200
    assert isinstance(body, str), body
    return metric_samples(body)


def parse_time(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def observer(daemons: DaemonFactory, name: str = "observer") -> Daemon:
    """A daemon that serves the API but cannot claim the tests' ``sleeper`` items
    (it only knows ``echo``): lets a test look at the database through GET
    endpoints after the daemon under test has exited."""
    return daemons(name, handlers={"echo": DEFAULT_HANDLERS["echo"]})


# -- 1. SIGKILL: another daemon reclaims -----------------------------------------


def test_sigkilled_daemon_items_are_reclaimed_by_the_other(daemons: DaemonFactory) -> None:
    a = daemons("a")
    b = daemons("b", start=False)
    batch = a.submit("slow_first", [{"n": i} for i in range(4)])  # attempt 1 hangs
    wait_for(lambda: all_running_on(a, batch["id"], "a", 4), 10, what="4 items running on a")
    b.start()
    assert {w["name"] for w in workers(b)} == {"a", "b"}

    a.kill()
    killed_at = time.monotonic()

    def reclaimed() -> bool:
        return all(i["attempts"] >= 2 for i in b.items(batch["id"]))

    wait_for(reclaimed, DEAD_AFTER_S + HEARTBEAT_S + SLACK_S, 0.05, "b to reclaim a's items")
    elapsed = time.monotonic() - killed_at
    # Not before a could have been dead for dead_after: a live worker is never reaped.
    assert elapsed >= DEAD_AFTER_S - HEARTBEAT_S - 0.2, elapsed

    done = b.wait_status(batch["id"], "completed", 10)
    check_invariants(done)
    assert done["counts"]["succeeded"] == 4
    for it in b.items(batch["id"]):
        assert it["status"] == "succeeded" and it["attempts"] == 2, it
        assert it["worker"] == "b" and it["result"] == {"attempt": 2}, it
        detail = item_detail(b, it["id"])
        lost = [e for e in detail["errors"] if e["type"] == "WorkerLost"]
        assert len(lost) == 1 and lost[0]["attempt"] == 1, detail["errors"]
        # It was claimed; the database cannot know whether its handler had started.
        assert "not known whether its handler had started" in lost[0]["message"], lost[0]

    assert [w["name"] for w in workers(b)] == ["b"]
    m = metrics_of(b)
    assert m['batch_supervisor_items_total{handler="slow_first",outcome="reclaimed"}'] == 4.0
    assert m['batch_supervisor_items_total{handler="slow_first",outcome="succeeded"}'] == 4.0


# -- 2. SIGSTOP: a zombie's late writes change nothing ---------------------------------


def test_stalled_daemon_late_writes_are_fenced(daemons: DaemonFactory) -> None:
    a = daemons("a")
    b = daemons("b", start=False)
    n = 3
    # echo returns {"echo": payload, "attempt": n}: the recorded result names its attempt.
    batch = a.submit("echo", [{"sleep": 1.5, "n": i} for i in range(n)])
    wait_for(lambda: all_running_on(a, batch["id"], "a", n), 10, what="items running on a")
    a.signal(signal.SIGSTOP)
    try:
        b.start()

        def replaced() -> bool:
            items = b.items(batch["id"])
            return all(i["attempts"] == 2 and i["worker"] == "b" for i in items)

        wait_for(replaced, DEAD_AFTER_S + HEARTBEAT_S + SLACK_S + 3, 0.05, "b to take over")
        assert "a" not in {w["name"] for w in workers(b)}
    finally:
        a.signal(signal.SIGCONT)
    # a wakes up: its sleeps are long over, so its attempt-1 outcomes are written now,
    # while (or after) b's attempt 2 runs. Every one of them must be fenced.
    wait_for(lambda: a.log().count("outcome.fenced") >= n, 15, 0.05, "a's stale writes fenced")

    done = b.wait_status(batch["id"], "completed", 15)
    check_invariants(done)
    assert done["counts"] == {
        "total": n,
        "queued": 0,
        "running": 0,
        "succeeded": n,
        "failed": 0,
        "cancelled": 0,
    }
    for it in b.items(batch["id"]):
        assert it["attempts"] == 2 and it["worker"] == "b", it
        assert it["result"]["attempt"] == 2, it
        errors = item_detail(b, it["id"])["errors"]
        assert [(e["attempt"], e["type"]) for e in errors] == [(1, "WorkerLost")], errors
    fenced = [ln for ln in a.log().splitlines() if "outcome.fenced" in ln]
    assert len(fenced) == n and all("attempt=1" in ln for ln in fenced), fenced
    # The revived daemon carries on as a live worker (it registers again).
    wait_for(lambda: {w["name"] for w in workers(b)} == {"a", "b"}, 5, 0.05, "a re-registered")
    assert a.stop() == 0
    assert b.stop() == 0


# -- 3. SIGTERM: drain, release, second signal ----------------------------------------


def test_sigterm_lets_short_items_finish(daemons: DaemonFactory) -> None:
    obs = observer(daemons)
    a = daemons("a")
    n = 4
    batch = a.submit("sleeper", [{"sleep": 1.5, "n": i} for i in range(n)])
    wait_for(lambda: all_running_on(a, batch["id"], "a", n), 10, what="items running on a")
    a.signal(signal.SIGTERM)

    def draining() -> bool:
        return any(w["name"] == "a" and w["state"] == "draining" for w in workers(obs))

    wait_for(draining, 5, 0.05, "a reported draining")
    status, body, _ = a.api("GET", "/readyz")
    assert status == 503 and "worker is draining" in body["reasons"], body
    assert a.wait_exit(20) == 0

    b = obs.batch(batch["id"])
    assert b["status"] == "completed", b
    for it in obs.items(batch["id"]):
        assert it["status"] == "succeeded" and it["attempts"] == 1, it
    assert "a" not in {w["name"] for w in workers(obs)}  # deregistered


def _released_items(obs: Daemon, batch_id: str, n: int) -> None:
    """Every item is back in the queue with its attempt not counted."""
    b = obs.batch(batch_id)
    check_invariants(b)
    assert b["counts"]["queued"] == n and b["counts"]["running"] == 0, b
    budget = DEFAULT_HANDLERS["sleeper"].get("max_attempts", 3)
    for it in obs.items(batch_id):
        assert it["status"] == "queued", it
        assert it["attempts"] == 1, it
        # "Not counted": the budget grew by one, so attempts left is still the full budget.
        assert it["max_attempts"] == budget + 1, it
        assert it["max_attempts"] - it["attempts"] == budget, it
        detail = item_detail(obs, it["id"])
        assert not [e for e in detail["errors"] if e["type"] == "WorkerLost"], detail


def test_sigterm_releases_long_items_after_drain_timeout(daemons: DaemonFactory) -> None:
    obs = observer(daemons)
    a = daemons("a", worker={"drain_timeout": "1s"})
    n = 3
    batch = a.submit("sleeper", [{"sleep": 3600, "n": i} for i in range(n)])
    wait_for(lambda: all_running_on(a, batch["id"], "a", n), 10, what="items running on a")
    a.signal(signal.SIGTERM)
    assert a.wait_exit(15) == 0
    assert "dispatcher.released items=3" in a.log(), a.log()
    _released_items(obs, batch["id"], n)
    assert "a" not in {w["name"] for w in workers(obs)}
    # The history says the attempt ran and was stopped by the drain, uncounted.
    for it in obs.items(batch["id"]):
        errors = item_detail(obs, it["id"])["errors"]
        assert [(e["attempt"], e["type"]) for e in errors] == [(1, "Released")], errors
        assert "shutting down" in errors[0]["message"] and "not counted" in errors[0]["message"]


def test_second_sigterm_skips_the_drain_wait(daemons: DaemonFactory) -> None:
    obs = observer(daemons)
    a = daemons("a", worker={"drain_timeout": "60s"})
    n = 2
    batch = a.submit("sleeper", [{"sleep": 3600, "n": i} for i in range(n)])
    wait_for(lambda: all_running_on(a, batch["id"], "a", n), 10, what="items running on a")
    a.signal(signal.SIGTERM)
    wait_for(lambda: "dispatcher.draining" in a.log(), 10, 0.05, "a draining")
    assert a.proc is not None and a.proc.poll() is None  # still waiting out the 60 s drain
    a.signal(signal.SIGTERM)
    # Far less than the 60 s drain_timeout: the second signal ended the wait.
    assert a.wait_exit(15) == 0
    assert "skipping the drain wait" in a.log()
    _released_items(obs, batch["id"], n)


# -- 4. PostgreSQL outage -----------------------------------------------------------------


def test_database_outage_mid_batch(
    daemons: DaemonFactory, pg_server: TestServer, tmp_path: pathlib.Path
) -> None:
    runlog = tmp_path / "runs.jsonl"
    # An outage shorter than dead_after: not ready, but alive (healthz 200) throughout.
    worker = {"concurrency": 4, "dead_after": "15s"}
    a = daemons("a", worker=worker, env={"BSV_TEST_RUNLOG": str(runlog)})
    n = 24
    batch = a.submit("echo", [{"sleep": 0.4, "n": i} for i in range(n)])
    wait_for(
        lambda: 0 < a.batch(batch["id"])["counts"]["succeeded"] < n - 8,
        10,
        0.02,
        "the batch under way",
    )
    readyz: list[int] = []
    healthz: list[int] = []
    pg_server.stop()
    try:
        stopped_at = time.monotonic()
        wait_for(lambda: a.api("GET", "/readyz")[0] == 503, 10, 0.05, "readyz 503")
        while time.monotonic() - stopped_at < 5.0:
            healthz.append(a.api("GET", "/healthz")[0])
            readyz.append(a.api("GET", "/readyz")[0])
            assert a.proc is not None and a.proc.poll() is None, a.log()
            time.sleep(0.2)
    finally:
        pg_server.start()
    assert set(healthz) == {200}, healthz
    assert 503 in readyz and 200 not in readyz, readyz
    assert a.proc is not None and a.proc.poll() is None, a.log()
    wait_for(lambda: a.api("GET", "/readyz")[0] == 200, 20, 0.1, "readyz 200 again")

    done = a.wait_status(batch["id"], "completed", 30)
    check_invariants(done)
    assert done["counts"]["succeeded"] == n and done["counts"]["total"] == n, done
    items = a.items(batch["id"])
    assert len(items) == n and len({i["id"] for i in items}) == n
    for it in items:
        # Results held in memory during the outage were written afterwards, not lost:
        # no item needed a second attempt.
        assert it["status"] == "succeeded" and it["attempts"] == 1, it
        assert it["result"]["attempt"] == 1, it
    runs = [json.loads(ln) for ln in runlog.read_text().splitlines()]
    finished = [r["id"] for r in runs if r["event"] == "done"]
    assert sorted(finished) == sorted(i["id"] for i in items), "each item ran exactly once"
    assert a.proc.poll() is None
    assert a.stop() == 0


# -- 5. sd_notify ---------------------------------------------------------------------------


def test_sd_notify_protocol(
    daemons: DaemonFactory, notify_socket: tuple[str, socket.socket]
) -> None:
    path, sock = notify_socket
    got: list[str] = []

    def drain() -> list[str]:
        while True:
            try:
                got.append(sock.recv(4096).decode())
            except TimeoutError:
                return got

    a = daemons("a", env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000"})
    wait_for(lambda: "READY=1" in drain(), 5, 0, "READY=1")
    # WATCHDOG_USEC=200000: a ping every 0.1 s from the event loop; see several.
    wait_for(lambda: sum(m == "WATCHDOG=1" for m in drain()) >= 3, 5, 0, "WATCHDOG=1 pings")
    assert any(m.startswith("STATUS=") for m in got), got
    assert "STOPPING=1" not in got
    a.signal(signal.SIGTERM)
    assert a.wait_exit(15) == 0
    drain()
    assert "STOPPING=1" in got, got
    assert got.index("READY=1") < got.index("STOPPING=1")
    status = [m for m in got if m.startswith("STATUS=")]
    assert any("in flight" in m for m in status), status


def test_an_unread_notify_socket_never_blocks_the_daemon(
    daemons: DaemonFactory, notify_socket: tuple[str, socket.socket]
) -> None:
    """A notify receiver that stops reading (its queue holds about ten datagrams)
    must not freeze the event loop: the pings are dropped, the API answers."""
    path, _ = notify_socket  # never read
    a = daemons("a", env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000"})
    # 30 requests over 3 s: well past the ~15 pings that fill the queue.
    for _ in range(30):
        status, _, _ = request("GET", a.url + "/healthz", timeout=5)
        assert status == 200
        time.sleep(0.1)
    batch = a.submit("echo", [1, 2])
    assert a.wait_status(batch["id"], "completed", 10)["counts"]["succeeded"] == 2


# -- 6. metrics -------------------------------------------------------------------------------


def test_metrics_names_labels_and_counts(daemons: DaemonFactory) -> None:
    handlers = dict(DEFAULT_HANDLERS)
    handlers["sleeper"] = {**DEFAULT_HANDLERS["sleeper"], "concurrency": 1}
    a = daemons("a", handlers=handlers, extra={"server": {"metrics_sample_interval": "200ms"}})
    ok = a.submit("echo", [{"x": 1}])
    bad = a.submit("permanent", [{"x": 2}])
    a.wait_status(ok["id"], "completed")
    a.wait_status(bad["id"], "failed")
    # sleeper has concurrency 1 here: one runs (a daemon may also hold one more claimed,
    # waiting for the slot), the rest stay runnable in the queue.
    waiting = a.submit("sleeper", [{"sleep": 3600, "n": i} for i in range(4)])

    def sampled() -> dict[str, float] | None:
        m = metrics_of(a)
        if m.get('batch_supervisor_items_in_flight{handler="sleeper"}') != 1.0:
            return None
        queued = a.batch(waiting["id"])["counts"]["queued"]
        ok = queued >= 2 and m.get('batch_supervisor_items_queued{handler="sleeper"}') == queued
        return m if ok else None

    m = wait_for(sampled, 5, 0.1, "a queue sample matching the batch")
    assert m is not None
    p = "batch_supervisor_"
    assert m[p + 'items_total{handler="echo",outcome="succeeded"}'] == 1.0
    assert m[p + 'items_total{handler="permanent",outcome="failed"}'] == 1.0
    # Every handler's counters exist from the start (rate() works after a restart).
    assert m[p + 'items_total{handler="echo",outcome="failed"}'] == 0.0
    assert m[p + 'item_duration_seconds_count{handler="echo",outcome="succeeded"}'] == 1.0
    assert m[p + 'item_duration_seconds_count{handler="permanent",outcome="failed"}'] == 1.0
    assert m[p + 'batches_finished_total{status="completed"}'] == 1.0
    assert m[p + 'batches_finished_total{status="failed"}'] == 1.0
    assert m[p + "batch_duration_seconds_count"] == 2.0
    assert m[p + 'items_in_flight{handler="sleeper"}'] == 1.0
    assert m[p + 'items_in_flight{handler="echo"}'] == 0.0
    assert m[p + 'queue_lag_seconds{handler="sleeper"}'] > 0.0
    assert m[p + 'worker_state{state="running"}'] == 1.0
    assert m[p + 'worker_state{state="draining"}'] == 0.0
    from supervisor import __version__

    assert m[p + f'build_info{{version="{__version__}"}}'] == 1.0
    status, text, headers = a.api("GET", "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    # Every documented metric family is exported under its fixed name and type.
    for family, kind in (
        ("items_total", "counter"),
        ("item_duration_seconds", "histogram"),
        ("items_in_flight", "gauge"),
        ("items_queued", "gauge"),
        ("queue_lag_seconds", "gauge"),
        ("batches_finished_total", "counter"),
        ("batch_duration_seconds", "histogram"),
        ("callbacks_total", "counter"),
        ("db_errors_total", "counter"),
        ("worker_state", "gauge"),
        ("build_info", "gauge"),
    ):
        assert f"# TYPE {p}{family} {kind}\n" in text, family


# -- 7. JSON logs -------------------------------------------------------------------------------


def test_json_logging_every_line_is_json_with_action(daemons: DaemonFactory) -> None:
    a = daemons("a", extra={"logging": {"format": "json"}})
    a.wait_status(a.submit("echo", [{"x": 1}])["id"], "completed")
    a.wait_status(a.submit("permanent", [{"x": 1}])["id"], "failed")
    assert a.stop() == 0
    lines = [ln for ln in a.log().splitlines() if ln.strip()]
    assert lines
    actions = []
    for ln in lines:
        rec = json.loads(ln)  # raises on any non-JSON line
        assert isinstance(rec, dict) and rec.get("action"), ln
        assert {"ts", "level", "message"} <= rec.keys(), ln
        actions.append(rec["action"])
    assert "app.ready" in actions and "app.stopped" in actions, actions


# -- 8. retention -------------------------------------------------------------------------------


def test_retention_deletes_old_terminal_batches(daemons: DaemonFactory) -> None:
    a = daemons("a", extra={"retention": {"finished_after": "1s", "interval": "200ms"}})
    live = a.submit("sleeper", [{"sleep": 3600}])
    old = a.submit("echo", [{"x": 1}, {"x": 2}])
    done = a.wait_status(old["id"], "completed")
    item_ids = [i["id"] for i in a.items(old["id"])]
    finished_at = parse_time(done["finished_at"])

    wait_for(
        lambda: a.api("GET", f"/v1/batches/{old['id']}")[0] == 404,
        10,
        0.05,
        "the finished batch deleted",
    )
    # Not before it was finished_after old.
    assert time.time() >= finished_at + 1.0 - 0.05
    for item_id in item_ids:
        assert a.api("GET", f"/v1/items/{item_id}")[0] == 404
    # A live batch is never a retention candidate, however old.
    assert a.batch(live["id"])["status"] == "running"
    assert "retention.deleted batches=1" in a.log()


# -- systemd unit ---------------------------------------------------------------------------------

UNIT = ROOT / "systemd" / "batch-supervisor.service"


def unit_settings() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def _seconds(value: str) -> float:
    m = re.fullmatch(r"(\d+)(ms|s|min)?", value)
    assert m, value
    return int(m.group(1)) * {"ms": 0.001, "s": 1, "min": 60, None: 1}[m.group(2)]


def test_systemd_unit_contents() -> None:
    s = unit_settings()
    expected = {
        "Type": "notify",
        "NotifyAccess": "main",
        "User": "batch-supervisor",
        "Group": "batch-supervisor",
        "StateDirectory": "batch-supervisor",
        "KillMode": "mixed",
        "Restart": "on-failure",
        "RestartPreventExitStatus": "78",
        "ProtectSystem": "strict",
        "ProtectHome": "true",
        "SystemCallArchitectures": "native",
        "ReadWritePaths": "/var/lib/batch-supervisor",
    }
    for key, value in expected.items():
        assert s.get(key) == [value], (key, s.get(key))
    for key in (
        "NoNewPrivileges",
        "PrivateTmp",
        "PrivateDevices",
        "ProtectKernelTunables",
        "ProtectKernelModules",
        "ProtectKernelLogs",
        "ProtectControlGroups",
        "RestrictSUIDSGID",
        "LockPersonality",
        "RestrictRealtime",
        "RestrictNamespaces",
    ):
        assert s.get(key) in (["yes"], ["true"]), (key, s.get(key))
    assert s["ExecStart"] == [
        "/opt/batch-supervisor/.venv/bin/batch-supervisor run "
        "--config /etc/batch-supervisor/config.toml"
    ]
    assert _seconds(s["WatchdogSec"][0]) == 30
    # The stop timeout outlives the drain of the shipped config (and the default).
    with open(ROOT / "config.toml", "rb") as f:
        shipped = tomllib.load(f)
    from supervisor import config

    drain = config.from_mapping(shipped).worker.drain_timeout_s
    assert _seconds(s["TimeoutStopSec"][0]) > max(drain, config.WorkerConfig().drain_timeout_s)


def test_systemd_unit_verifies(tmp_path: pathlib.Path) -> None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd to run this)")
    # verify insists that ExecStart exists: point it at this checkout's console script.
    exe = pathlib.Path(ROOT / ".venv" / "bin" / "batch-supervisor")
    if not exe.exists():
        exe = pathlib.Path(shutil.which("batch-supervisor") or "/nonexistent")
    if not exe.exists():
        pytest.skip("no batch-supervisor console script installed to stand in for ExecStart")
    unit = tmp_path / UNIT.name
    unit.write_text(
        UNIT.read_text().replace("/opt/batch-supervisor/.venv/bin/batch-supervisor", str(exe))
    )
    res = subprocess.run(
        [tool, "verify", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
    )
    problems = [ln for ln in (res.stdout + res.stderr).splitlines() if UNIT.name in ln]
    assert res.returncode == 0 and not problems, res.stdout + res.stderr
