"""Command line: the parser, the exit codes, the daemon (``run``) and the
operator tools (``migrate``, ``check``, ``doctor``); the HTTP client verbs
(``submit``, ``status``, ``watch``, ``list``, ``results``, ``cancel``, ``pause``,
``resume``, ``retry``, ``redeliver``, ``item retry|cancel``) are in
:mod:`supervisor.client`.

Exit codes: 0 ok; 1 failure (API error, batch not completed cleanly, drift
found); 2 usage; 78 (EX_CONFIG) invalid configuration or a broken handler.
Client errors print one line, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
import threading
from collections.abc import AsyncIterator
from typing import TypeVar

from supervisor import (
    __version__,
    cli_client,
    config,
    embedded,
    handlers,
    logs,
    pipelines,
    schedules,
    store,
)
from supervisor import db as dbm
from supervisor.errors import ConfigError, HandlerLoadError, SchemaTooNew, SupervisorError

EX_CONFIG = 78
E = TypeVar("E", bound=BaseException)
log = logging.getLogger("supervisor.cli")


# -- daemon and operator commands ----------------------------------------------------


def _load(args: argparse.Namespace) -> config.Config:
    cfg = config.load(args.config)
    logs.setup(cfg.logging.level, cfg.logging.format)
    return cfg


def cmd_run(args: argparse.Namespace) -> int:
    from supervisor import app

    cfg = _load(args)
    import anyio

    try:
        return anyio.run(app.Daemon(cfg).run)
    except BaseExceptionGroup as group:
        # A component that fails on purpose (schema too new, broken handler) should
        # read as that error with its exit code, not as a task-group traceback.
        ours = _first_leaf(group, SupervisorError)
        if ours is None:
            raise
        raise ours from None


def _first_leaf(group: BaseExceptionGroup[BaseException], kind: type[E]) -> E | None:
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            found = _first_leaf(exc, kind)
            if found is not None:
                return found
        elif isinstance(exc, kind):
            return exc
    return None


@contextlib.asynccontextmanager
async def _database(cfg: config.Config) -> AsyncIterator[dbm.Database]:
    """A pool on the configured database; the embedded server is started, or
    shared, by the same rule as the daemon's (see embedded.serving)."""
    async with embedded.database_url(cfg) as served:
        db = await dbm.Database.connect(cfg, served.url)
        try:
            yield db
        finally:
            await db.close()


def cmd_migrate(args: argparse.Namespace) -> int:
    cfg = _load(args)

    async def go() -> int:
        async with _database(cfg) as db:
            applied = await dbm.migrate(db)
            version, _ = await dbm.schema_status(db)
        print(
            f"schema {cfg.database.schema!r} at version {version}"
            + (f" (applied {', '.join(map(str, applied))})" if applied else " (already current)")
        )
        return 0

    return asyncio.run(go())


def cmd_check(args: argparse.Namespace) -> int:
    cfg = _load(args)
    problems = handlers.check_all(cfg)
    try:
        schedules.build_all(cfg)
    except ConfigError as exc:
        problems += exc.problems
    try:
        pipelines.load_functions(cfg)
    except HandlerLoadError as exc:
        problems.append(str(exc))
    if not cfg.database_url and cfg.embedded.bin_dir:
        try:
            embedded.find_bin_dir(cfg.embedded.bin_dir)
        except embedded.EmbeddedPostgresError as exc:
            problems.append(f"embedded.bin_dir: {exc}")
    for p in problems:
        print(f"error: {p}", file=sys.stderr)
    if problems:
        return EX_CONFIG
    print(f"configuration ok: {len(cfg.handlers)} handler(s): {', '.join(cfg.handlers) or '-'}")
    return 0


# A running pipeline run whose stage's batch ended this long ago was not moved on:
# every daemon's pipelines component does that within seconds of the batch's end.
PIPELINE_STALLED_S = 60.0


def _run_drift(run: store.RunDrift) -> str:
    """What is wrong with a pipeline run doctor found, and what to do."""
    where = f"stage {run.current_stage} (batch {run.batch_id})"
    if run.status == "running" and run.batch_status is None:
        return (
            f"is running but its {where} is gone; cancel the run "
            "(POST /v1/pipeline-runs/{id}/cancel) or a daemon fails it"
        )
    if run.status == "running":
        return (
            f"is running but its {where} ended {run.batch_status} over "
            f"{PIPELINE_STALLED_S:g}s ago and no daemon moved it on: is a daemon with this "
            "pipeline running? (see pipelines.* in its log)"
        )
    return (
        f"ended {run.status} but its {where} is {run.batch_status} (retried or changed "
        "directly?): retry the run to steer its later stages, or cancel the batch"
    )


def cmd_doctor(args: argparse.Namespace) -> int:
    cfg = _load(args)

    async def go() -> int:
        async with _database(cfg) as db:
            q = store.Queries(db)
            drift = await q.doctor_drift()
            orphans = await q.doctor_orphans()
            for r in drift:
                counted = {"queued": r.q, "running": r.r, "succeeded": r.s, "failed": r.f}
                counted["cancelled"] = r.c
                stored = {
                    "queued": r.queued,
                    "running": r.running,
                    "succeeded": r.succeeded,
                    "failed": r.failed,
                    "cancelled": r.cancelled,
                }
                print(
                    f"drift: batch {r.id} status={r.status} total={r.total} "
                    f"(items: {r.n}) stored={stored} counted={counted}"
                )
                if args.repair:
                    status = await q.doctor_repair(r.id, actor="doctor")
                    print(f"  repaired: batch {r.id} -> {status}")
            if orphans:
                print(
                    f"note: {orphans} item(s) running under a lease no live worker holds; "
                    "a running daemon's reaper reclaims them"
                )
            stray = await q.doctor_stray_items()
            for st in stray:
                print(f"drift: {st.n} item(s) of batch {st.batch_id}, which does not exist")
                if args.repair:
                    await q.doctor_delete_stray_items(st.batch_id)
                    print(f"  repaired: deleted the stray items of {st.batch_id}")
            runs = await q.doctor_pipeline_runs(stalled_after_s=PIPELINE_STALLED_S)
            for run in runs:
                print(f"pipeline: run {run.id} ({run.pipeline}) {_run_drift(run)}")
            if not drift and not stray and not runs:
                print(
                    "no drift: every batch's counters and status match its items, and "
                    "every pipeline run's status its stages"
                )
                return 0
            return 0 if args.repair and not runs else 1

    return asyncio.run(go())


# -- argument parsing -----------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="batch-supervisor", description="A durable batch-job daemon on PostgreSQL."
    )
    p.add_argument("--version", action="version", version=f"batch-supervisor {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sp.add_argument(
            "--config", help="config file (default ./config.toml, env BATCH_SUPERVISOR_CONFIG)"
        )
        return sp

    def with_url(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
        with_config(sp)
        sp.add_argument(
            "--url",
            help=f"API base URL (env BATCH_SUPERVISOR_URL, default {cli_client.DEFAULT_URL})",
        )
        return sp

    with_config(sub.add_parser("run", help="run the daemon"))
    with_config(sub.add_parser("migrate", help="apply database migrations"))
    with_config(sub.add_parser("check", help="validate the configuration and every handler"))
    d = with_config(sub.add_parser("doctor", help="check the invariants of every batch"))
    d.add_argument("--repair", action="store_true", help="fix the drift found")

    s = with_url(sub.add_parser("submit", help="submit a batch from JSON Lines or a JSON array"))
    s.add_argument("handler")
    s.add_argument("file", help="file with one payload per line, or a JSON array; - for stdin")
    s.add_argument("--key-field", help="use this payload field as each item's key")
    s.add_argument("--priority", type=int)
    s.add_argument("--max-concurrency", type=int)
    s.add_argument("--max-attempts", type=int)
    s.add_argument(
        "--max-failures", type=cli_client.max_failures, help="a count, or a percentage like 10%%"
    )
    s.add_argument("--idempotency-key")
    s.add_argument(
        "--exclusive-key",
        help="refused (409, naming it) while an unfinished batch has this key, e.g. portfolio:123",
    )
    s.add_argument(
        "--after",
        action="append",
        metavar="BATCH_ID",
        help="waiting until this batch has ended (repeat for several); see --after-policy",
    )
    s.add_argument(
        "--after-policy",
        choices=("completed", "terminal"),
        help="completed (default): run once every --after batch completed, else cancelled; "
        "terminal: once every one ended, however",
    )
    s.add_argument(
        "--on-conflict",
        choices=("reject", "queue"),
        help="with --exclusive-key: reject (default, 409) or queue behind the key's batches",
    )
    s.add_argument(
        "--not-before",
        type=cli_client.not_before,
        metavar="TIME",
        help="start no item before TIME: RFC 3339 with an offset (2026-12-24T18:00:00Z), "
        "or +DURATION from now (+10m, +2h); scheduled until then",
    )
    s.add_argument("--on-complete", help="handler to call once the batch is terminal")
    s.add_argument("--metadata", help="a JSON object stored with the batch")
    s.add_argument(
        "--wait",
        action="store_true",
        help="watch until terminal and its callback has run; exit 0 on completed",
    )
    s.add_argument("--json", action="store_true", help="print the batch JSON")
    st = with_url(sub.add_parser("status", help="show a batch"))
    st.add_argument("id")
    st.add_argument("--json", action="store_true")
    w = with_url(sub.add_parser("watch", help="live progress until the batch is terminal"))
    w.add_argument("id")
    ls = with_url(sub.add_parser("list", help="list batches, newest first"))
    ls.add_argument("--status")
    ls.add_argument("--limit", type=int, default=20)
    ls.add_argument("--json", action="store_true")
    rs = with_url(
        sub.add_parser(
            "results", help="every item's outcome as JSON Lines or CSV, to stdout (resumable)"
        )
    )
    rs.add_argument("id")
    rs.add_argument("--format", choices=("jsonl", "csv"), default="jsonl")
    rs.add_argument("--status", help="only these item statuses, comma-separated (failed,cancelled)")
    rs.add_argument("--after", help="start after this item id (the last one an earlier run got)")
    for verb in ("cancel", "pause", "resume", "retry"):
        v = with_url(sub.add_parser(verb, help=f"{verb} a batch"))
        v.add_argument("id")
        if verb == "retry":
            v.add_argument("--include-cancelled", action="store_true")
    rd = with_url(
        sub.add_parser("redeliver", help="run a batch's finished completion callback again")
    )
    rd.add_argument("id")
    it = sub.add_parser("item", help="retry or cancel one item")
    item_verbs = it.add_subparsers(dest="item_verb", required=True, metavar="VERB")
    for verb, text in (
        ("retry", "queue a failed, cancelled or succeeded item again (reopens its batch)"),
        ("cancel", "cancel a queued or running item"),
    ):
        iv = with_url(item_verbs.add_parser(verb, help=text))
        iv.add_argument("id", help="the item id")
    lm = with_url(
        sub.add_parser("limits", help="keyed handlers' limits and the keys throttled now (admin)")
    )
    lm.add_argument("--json", action="store_true")
    sl = with_url(sub.add_parser("schedules", help="list the schedules: next fire, last slot"))
    sl.add_argument("--json", action="store_true")
    sc = with_url(
        sub.add_parser("schedule", help="show, pause, resume or run now (an extra run) a schedule")
    )
    sc.add_argument("action", choices=("show", "pause", "resume", "run"))
    sc.add_argument("name")
    sc.add_argument("--json", action="store_true")
    pr = with_url(sub.add_parser("pipeline-run", help="start a run of a configured pipeline"))
    pr.add_argument("pipeline")
    pr.add_argument("file", help="the first stage's items: JSON Lines or a JSON array; - for stdin")
    pr.add_argument("--key-field", help="use this payload field as each item's key")
    pr.add_argument("--idempotency-key")
    pr.add_argument(
        "--exclusive-key", help="refused (409, naming it) while a running run has this key"
    )
    pr.add_argument("--metadata", help="a JSON object stored with the run and its batches")
    pr.add_argument(
        "--wait", action="store_true", help="follow the stages until the run ends; 0 on completed"
    )
    pr.add_argument("--json", action="store_true", help="print the run JSON")
    ps = with_url(sub.add_parser("pipeline-status", help="show a pipeline run and its stages"))
    ps.add_argument("id")
    ps.add_argument("--json", action="store_true")
    for verb in ("cancel", "pause", "resume", "retry"):
        pv = with_url(sub.add_parser(f"pipeline-{verb}", help=f"{verb} a pipeline run"))
        pv.add_argument("id")
        if verb == "retry":
            pv.add_argument("--include-cancelled", action="store_true")
    return p


COMMANDS = {"run": cmd_run, "migrate": cmd_migrate, "check": cmd_check, "doctor": cmd_doctor}


def main(argv: list[str] | None = None) -> int:
    code = _main(argv)
    _exit_past_abandoned_threads(code)
    return code


def _exit_past_abandoned_threads(code: int) -> None:
    """Exit now if threads of timed-out handler attempts still run: the interpreter
    would wait for them at exit, and a hung one would keep a drained daemon alive
    until systemd kills it."""
    left = [
        t
        for t in threading.enumerate()
        if t is not threading.main_thread() and t.is_alive() and not t.daemon
    ]
    if left:
        logging.getLogger(__name__).warning(
            "app.exit: %s abandoned handler thread(s) still running; exiting without them",
            len(left),
        )
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _main(argv: list[str] | None) -> int:
    args = parser().parse_args(argv)
    try:
        return COMMANDS.get(args.command, cli_client.cmd_client)(args)
    except ConfigError as exc:
        print(f"batch-supervisor: {exc}", file=sys.stderr)
        return EX_CONFIG
    except HandlerLoadError as exc:
        print(f"batch-supervisor: handler check failed: {exc}", file=sys.stderr)
        return EX_CONFIG
    except SchemaTooNew as exc:
        print(f"batch-supervisor: {exc}", file=sys.stderr)
        return EX_CONFIG
    except SupervisorError as exc:
        print(f"batch-supervisor: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
