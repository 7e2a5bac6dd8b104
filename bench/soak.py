"""Soak test under chaos (not run in CI): ``python -m bench.soak --daemons N --minutes M``.

Starts its own embedded PostgreSQL (``supervisor.embedded``) and N daemons sharing one
database, then for M minutes does, at random: submissions (echo, flaky and failing
handlers), cancels, pauses, resumes and retries through the HTTP API, SIGKILLs and
restarts of daemons, and immediate stops + restarts of the database. Then it resumes
whatever is paused, waits for quiescence (every batch terminal), runs
``batch-supervisor doctor`` and checks every batch and item for consistency:

- every batch is terminal, and its status agrees with its counts;
- a succeeded item holds the result of the attempt that owns it, and that attempt ran
  to its end (the shared run log, ``BSV_TEST_RUNLOG``);
- no (item, attempt) ran twice (attempt numbers never repeat: fencing);
- no daemon exits unless it is killed;
- a failed item has its error recorded and belongs to a handler that can fail (or
  spent its attempts); a cancelled item belongs to a batch that was cancelled or
  stopped by its failure budget.

Prints the actions taken and the findings; exits 1 when something is inconsistent.
The server keeps ``synchronous_commit`` on (fsync may be off: the operating system
survives a server crash), so an acknowledged commit must survive a database restart.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import pathlib
import random
import shutil
import sys
import tempfile
import time
from typing import Any

import asyncpg

from supervisor import embedded
from tests.daemon import Daemon, request
from tests.pgharness import become_subreaper, free_port, make_base_dir, with_database

TERMINAL = ("completed", "completed_with_errors", "failed", "cancelled")
HANDLERS: dict[str, dict[str, Any]] = {
    "echo": {
        "type": "python",
        "target": "tests.handlers:echo",
        "timeout": "30s",
        "max_attempts": 10,
    },
    "flaky": {
        "type": "python",
        "target": "tests.handlers:flaky",
        "timeout": "30s",
        "max_attempts": 10,
        "retry_backoff": {"initial": "50ms", "max": "500ms", "jitter": 0.2},
    },
    "permanent": {"type": "python", "target": "tests.handlers:permanent", "timeout": "30s"},
}
WORKER: dict[str, Any] = {
    "concurrency": 16,
    "poll_interval": "500ms",
    "heartbeat_interval": "500ms",
    "dead_after": "3s",
    "drain_timeout": "5s",
}


def terminal_status(b: dict[str, Any]) -> str:
    """The status the batch invariants give a drained batch with these counts and stop reason."""
    if b["stop_reason"] == "cancel":
        return "cancelled"
    if b["stop_reason"] == "max_failures":
        return "failed"
    if b["failed"] == b["cancelled"] == 0:
        return "completed"
    return "failed" if b["succeeded"] == 0 else "completed_with_errors"


def db_rows(dsn: str, sql: str, *args: Any) -> list[dict[str, Any]]:
    async def go() -> list[dict[str, Any]]:
        conn = await asyncpg.connect(dsn, timeout=10)
        try:
            return [dict(r) for r in await conn.fetch(sql, *args)]
        finally:
            await conn.close()

    return asyncio.run(go())


class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.work = pathlib.Path(tempfile.mkdtemp(prefix="bsv-soak-"))
        self.pg_base = make_base_dir("bsv-soak-pg-")
        self.server = embedded.EmbeddedPostgres(
            self.pg_base / "data", port=free_port(), listen_tcp=True, fsync=False, auth="trust"
        )
        self.runlog = self.work / "runs.jsonl"
        self.daemons: list[Daemon] = []
        self.dsn = ""
        self.actions: collections.Counter[str] = collections.Counter()
        self.answers: collections.Counter[str] = collections.Counter()
        self.batches: dict[str, str] = {}  # id -> handler
        self.stoppable: set[str] = set()  # cancel requested, or a failure budget set
        self.n_submitted = 0
        self.findings: list[str] = []

    # -- setup and teardown -------------------------------------------------------------

    def start(self) -> None:
        admin = self.server.start()
        db_rows(admin, "CREATE DATABASE soak")
        db_rows(admin, "ALTER DATABASE soak SET synchronous_commit = on")
        self.dsn = with_database(admin, "soak")
        for i in range(self.args.daemons):
            d = Daemon(
                self.work,
                self.dsn,
                name=f"soak{i}",
                handlers=HANDLERS,
                worker=WORKER,
                env={"BSV_TEST_RUNLOG": str(self.runlog)},
            )
            self.daemons.append(d)
            d.start()

    def close(self) -> None:
        for d in self.daemons:
            d.kill()
        try:
            self.server.stop("immediate")
        finally:
            if not self.args.keep:
                shutil.rmtree(self.work, ignore_errors=True)
                shutil.rmtree(self.pg_base, ignore_errors=True)

    # -- the API, through whichever daemon answers --------------------------------------

    def api(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """Call a random live daemon; 0 when none answered (all dead or starting)."""
        for d in self.rng.sample(self.daemons, len(self.daemons)):
            if d.proc is None or d.proc.poll() is not None:
                continue
            try:
                status, resp, _ = request(method, d.url + path, body, timeout=30)
                return status, resp
            except OSError:
                continue  # killed, starting, or the connection broke: try another
        return 0, None

    def pick(self, statuses: tuple[str, ...]) -> str | None:
        rows = [r for r in self.live_rows() if r["status"] in statuses]
        return str(self.rng.choice(rows)["id"]) if rows else None

    def live_rows(self) -> list[dict[str, Any]]:
        try:
            return db_rows(self.dsn, "SELECT id, status, failed, cancelled FROM supervisor.batches")
        except (OSError, asyncpg.PostgresError):
            return []  # the database is restarting: skip this control action

    # -- actions ------------------------------------------------------------------------

    def submit(self) -> None:
        handler = self.rng.choices(["echo", "flaky", "permanent"], [8, 2, 1])[0]
        n = self.rng.randint(1, 150)
        key = f"soak-{self.args.seed}-{self.n_submitted}"
        self.n_submitted += 1
        body = {
            "handler": handler,
            "idempotency_key": key,
            "items": [{"sleep": round(self.rng.uniform(0.02, 0.3), 3)} for _ in range(n)],
            "priority": self.rng.choice([0, 0, 0, 1]),
        }
        if self.rng.random() < 0.1:
            body["max_failures"] = self.rng.randint(0, 3)
        for _ in range(20):  # a client retrying the same idempotency key through outages
            status, resp = self.api("POST", "/v1/batches", body)
            self.answers[f"submit {status}"] += 1
            if status in (200, 201):
                self.batches[str(resp["id"])] = handler
                if "max_failures" in body:
                    self.stoppable.add(str(resp["id"]))
                return
            if status not in (0, 503):
                self.findings.append(f"submission {key} answered {status}: {resp}")
                return
            time.sleep(0.5)
        self.findings.append(f"submission {key} never accepted")

    def control(self, action: str) -> None:
        statuses = {
            "cancel": ("queued", "running", "paused"),
            "pause": ("queued", "running"),
            "resume": ("paused",),
            "retry": ("completed_with_errors", "failed", "cancelled"),
        }[action]
        bid = self.pick(statuses)
        if bid is None:
            return
        body = {"include_cancelled": self.rng.random() < 0.5} if action == "retry" else None
        status, resp = self.api("POST", f"/v1/batches/{bid}/{action}", body)
        self.answers[f"{action} {status}"] += 1
        if action == "cancel":
            self.stoppable.add(bid)  # even unanswered: the cancel may have landed
        if status not in (0, 200, 409, 503):
            self.findings.append(f"{action} {bid} answered {status}: {resp}")

    def check_alive(self) -> None:
        """A daemon that exited without being killed is a finding (losing the
        database never kills the daemon); it is restarted so the soak goes on."""
        for d in self.daemons:
            if d.proc is not None and d.proc.poll() is not None:
                tail = "\n".join(d.log().splitlines()[-5:])
                self.findings.append(
                    f"daemon {d.name} exited {d.proc.returncode} by itself: {tail}"
                )
                d.start(wait=False)

    def kill(self) -> None:
        d = self.rng.choice(self.daemons)
        d.kill()
        d.start(wait=False)  # same name: it reclaims its previous incarnation's items

    def restart_database(self) -> None:
        self.server.stop("immediate")
        time.sleep(self.rng.uniform(0.2, 3.0))  # the outage lasts a while
        self.server.start()

    def storm(self) -> None:
        end = time.monotonic() + self.args.minutes * 60
        next_kill = time.monotonic() + self.rng.uniform(3, 10)
        next_db = time.monotonic() + self.rng.uniform(15, 40)
        while time.monotonic() < end:
            self.check_alive()
            now = time.monotonic()
            if now >= next_db:
                self.actions["database restart"] += 1
                self.restart_database()
                next_db = time.monotonic() + self.rng.uniform(20, 60)
            elif now >= next_kill:
                self.actions["daemon SIGKILL+restart"] += 1
                self.kill()
                next_kill = time.monotonic() + self.rng.uniform(3, 10)
            else:
                action = self.rng.choices(
                    ["submit", "cancel", "pause", "resume", "retry", "idle"], [6, 1, 1, 2, 1, 3]
                )[0]
                self.actions[action] += 1
                if action == "submit":
                    self.submit()
                elif action != "idle":
                    self.control(action)
                time.sleep(self.rng.uniform(0.05, 0.5))  # pacing of the client traffic

    # -- the end ------------------------------------------------------------------------

    def quiesce(self, limit_s: float) -> None:
        for d in self.daemons:
            if d.proc is not None and d.proc.poll() is None:
                d.wait_ready(60)
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            self.check_alive()
            for r in self.live_rows():
                if r["status"] == "paused":
                    self.api("POST", f"/v1/batches/{r['id']}/resume")
            rows = self.live_rows()
            if rows and all(r["status"] in TERMINAL for r in rows):
                return
            time.sleep(1.0)  # waiting for the daemons to drain the backlog
        stuck = [r for r in self.live_rows() if r["status"] not in TERMINAL]
        self.findings.append(
            f"not quiescent after {limit_s}s: {len(stuck)} batches, e.g. {stuck[:3]}"
        )

    def verify(self) -> dict[str, Any]:
        found: dict[str, Any] = {}
        doctor = self.daemons[0].cli("doctor", "--config", str(self.daemons[0].config_path))
        found["doctor"] = doctor.stdout.strip().splitlines()[-1] if doctor.stdout else doctor.stderr
        if doctor.returncode != 0:
            self.findings.append(f"doctor exit {doctor.returncode}: {doctor.stdout}{doctor.stderr}")
        batches = db_rows(
            self.dsn,
            "SELECT id, handler, status, stop_reason, total, succeeded, failed, cancelled"
            " FROM supervisor.batches",
        )
        items = db_rows(
            self.dsn,
            "SELECT id, batch_id, handler, status, attempts, max_attempts, result,"
            " errors -> -1 AS error FROM supervisor.items",
        )
        found["batches"] = dict(collections.Counter(b["status"] for b in batches))
        found["items"] = dict(collections.Counter(i["status"] for i in items))
        known = set(self.batches)
        stored = {str(b["id"]) for b in batches}
        if known - stored:
            self.findings.append(f"accepted batches missing: {sorted(known - stored)[:5]}")
        if stored - known:
            self.findings.append(f"batches nobody saw accepted: {sorted(stored - known)[:5]}")
        by_batch = {str(b["id"]): b for b in batches}
        for b in batches:
            if b["status"] not in TERMINAL:
                self.findings.append(f"batch {b['id']} not terminal: {b['status']}")
            expected = terminal_status(b)
            if b["status"] in TERMINAL and b["status"] != expected:
                self.findings.append(f"batch {b['id']} is {b['status']}, its counts say {expected}")

        runs = self.runlog.read_text().splitlines() if self.runlog.exists() else []
        events = [json.loads(ln) for ln in runs if ln.strip()]
        starts = collections.Counter(
            (e["id"], e["attempt"]) for e in events if e["event"] == "start"
        )
        done = {(e["id"], e["attempt"]) for e in events if e["event"] == "done"}
        twice = [k for k, n in starts.items() if n > 1]
        if twice:
            self.findings.append(f"(item, attempt) started more than once: {twice[:5]}")
        echo_items = [i for i in items if i["handler"] == "echo"]
        found["echo executions"] = sum(starts.values())
        found["echo items"] = len(echo_items)
        found["echo re-executions"] = sum(starts.values()) - len({k[0] for k in starts})
        for it in items:
            b = by_batch[str(it["batch_id"])]
            res = json.loads(it["result"]) if it["result"] else None
            err = json.loads(it["error"]) if it["error"] else None
            tag = f"item {it['id']} ({it['handler']}, batch {it['batch_id']})"
            if it["status"] == "succeeded":
                if it["handler"] == "permanent":
                    self.findings.append(f"{tag} succeeded but its handler always fails")
                elif it["handler"] == "echo":
                    if res is None or res.get("attempt") != it["attempts"]:
                        self.findings.append(
                            f"{tag}: result {res} is not attempt {it['attempts']}'s"
                        )
                    if (str(it["id"]), it["attempts"]) not in done:
                        self.findings.append(f"{tag}: succeeded attempt never ran to its end")
                elif it["handler"] == "flaky" and (res is None or res.get("ok") != it["attempts"]):
                    self.findings.append(f"{tag}: result {res} is not attempt {it['attempts']}'s")
            elif it["status"] == "failed":
                if err is None:
                    self.findings.append(f"{tag} failed without an error recorded")
                elif it["handler"] != "permanent" and it["attempts"] < it["max_attempts"]:
                    self.findings.append(f"{tag} failed with attempts left: {err}")
            elif it["status"] == "cancelled":
                if b["stop_reason"] is None and str(b["id"]) not in self.stoppable:
                    self.findings.append(f"{tag} cancelled, its batch never was")
            else:
                self.findings.append(f"{tag} is still {it['status']}")
        return found


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n")[0])
    p.add_argument("--daemons", type=int, default=3)
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--seed", type=int, default=random.randrange(1 << 30))
    p.add_argument("--quiesce-timeout", type=float, default=300.0)
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    args = p.parse_args(argv)
    become_subreaper()
    soak = Soak(args)
    print(f"soak: {args.daemons} daemons, {args.minutes} min, seed {args.seed}, dir {soak.work}")
    t0 = time.monotonic()
    try:
        soak.start()
        soak.storm()
        print(f"soak: chaos over after {time.monotonic() - t0:.0f}s; waiting for quiescence")
        soak.quiesce(args.quiesce_timeout)
        found = soak.verify()
    finally:
        soak.close()
    print(f"soak: done in {time.monotonic() - t0:.0f}s")
    print("actions:")
    for k, v in sorted(soak.actions.items()):
        print(f"  {k:28} {v}")
    print("answers:")
    for k, v in sorted(soak.answers.items()):
        print(f"  {k:28} {v}")
    print("found:")
    for k, v in found.items():
        print(f"  {k:28} {v}")
    if soak.findings:
        print(f"FINDINGS ({len(soak.findings)}):")
        for f in soak.findings[:50]:
            print(f"  - {f}")
        return 1
    print("no findings: every batch terminal and consistent, doctor clean")
    return 0


if __name__ == "__main__":
    sys.exit(main())
