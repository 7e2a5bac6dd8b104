"""Command line: the daemon (``run``), operator tools (``migrate``, ``check``,
``doctor``) and HTTP client verbs (``submit``, ``status``, ``watch``, ``list``,
``cancel``, ``pause``, ``resume``, ``retry``).

Exit codes: 0 ok; 1 failure (API error, batch not completed cleanly, drift
found); 2 usage; 78 (EX_CONFIG) invalid configuration or a broken handler.
Client errors print one line, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import re
import sys
import threading
import time
from collections.abc import AsyncIterator
from typing import Any, TypeVar

import aiohttp

from supervisor import __version__, config, embedded, handlers, logs, store
from supervisor import db as dbm
from supervisor.errors import ConfigError, HandlerLoadError, SchemaTooNew, SupervisorError

EX_CONFIG = 78
E = TypeVar("E", bound=BaseException)
log = logging.getLogger("supervisor.cli")
DEFAULT_URL = "http://127.0.0.1:8080"


class ClientError(Exception):
    """An API call failed; the message is the one line shown to the user."""


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
            if not drift and not stray:
                print("no drift: every batch's counters and status match its items")
                return 0
            return 0 if args.repair else 1

    return asyncio.run(go())


# -- HTTP client ----------------------------------------------------------------------

WATCH_RECONNECTS = 10  # consecutive failed reconnects before ``watch`` gives up


def _client_url(args: argparse.Namespace) -> str:
    """``--url``, else BATCH_SUPERVISOR_URL, else the API address of the config
    named by ``--config`` (or BATCH_SUPERVISOR_CONFIG), else DEFAULT_URL."""
    url = args.url or os.environ.get("BATCH_SUPERVISOR_URL")
    if url:
        return str(url).rstrip("/")
    if args.config or os.environ.get(config.ENV_CONFIG):
        try:
            server = config.load(args.config).server
        except (ConfigError, OSError) as exc:
            detail = _one_line(f"cannot read the API address from the config: {exc}")
            raise ClientError(detail) from None
        host = "127.0.0.1" if server.host in ("0.0.0.0", "") else server.host
        host = "[::1]" if host == "::" else f"[{host}]" if ":" in host else host
        scheme = "https" if server.tls_cert else "http"
        return f"{scheme}://{host}:{server.port}"
    return DEFAULT_URL


def _headers() -> dict[str, str]:
    token = os.environ.get("BATCH_SUPERVISOR_TOKEN")
    return {"Authorization": f"Bearer {token}"} if token else {}


# C0 and C1 controls and the bidi overrides: an item key or an error text holding
# ANSI/OSC escape sequences must not reach (and drive) the operator's terminal.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def _printable(text: str) -> str:
    """``text`` with control characters shown as escapes (``\\x1b``)."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


def _one_line(text: str) -> str:
    return _printable(" ".join(text.split()))


def _problem(method: str, url: str, status: int, text: str) -> ClientError:
    """The one-line message for an error response (problem+json or anything else)."""
    detail = text.strip()[:500] or "(empty response)"
    with contextlib.suppress(ValueError, AttributeError, TypeError, KeyError):
        body = json.loads(text)
        detail = str(body.get("detail") or body.get("title") or detail)
        extra = [
            f"{e.get('path') or '/'}: {e.get('message')}"
            for e in body.get("errors") or []
            if str(e.get("message")) not in detail  # the detail often repeats a lone error
        ]
        if extra:
            detail += "; " + "; ".join(extra[:5])
    return ClientError(_one_line(f"{method} {url}: {status} {detail}"))


async def _call(session: aiohttp.ClientSession, method: str, url: str, **kw: Any) -> Any:
    try:
        headers = _headers()
        if method != "GET":
            headers["Content-Type"] = "application/json"  # the API refuses changes without it
        async with session.request(method, url, headers=headers, **kw) as resp:
            text = await resp.text()
            if resp.status >= 400:
                raise _problem(method, url, resp.status, text)
            try:
                return json.loads(text) if text else None
            except ValueError:
                raise ClientError(
                    f"{method} {url}: {resp.status} but the body is not JSON "
                    "(is this a batch-supervisor API?)"
                ) from None
    except aiohttp.ClientError as exc:
        raise ClientError(_one_line(f"cannot reach {url}: {exc}")) from None
    except TimeoutError:
        raise ClientError(f"{method} {url}: no answer in time") from None


def _read_items(path: str, key_field: str | None) -> list[Any]:
    name = "stdin" if path == "-" else path
    try:
        if path == "-":
            text = sys.stdin.read()
        else:
            with open(path, encoding="utf-8") as f:
                text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise ClientError(f"cannot read {name}: {exc}") from None
    try:
        if text.lstrip().startswith("["):
            payloads = json.loads(text)
        else:
            payloads = []
            for n, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    try:
                        payloads.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        raise ClientError(f"{name}: line {n} is not JSON: {exc}") from None
    except json.JSONDecodeError as exc:
        raise ClientError(f"{name}: not a JSON array: {exc}") from None
    if not payloads:
        raise ClientError(f"{name}: no items (expected JSON Lines or a JSON array)")
    if key_field is None:
        return list(payloads)
    items = []
    for i, p in enumerate(payloads):
        if not isinstance(p, dict) or key_field not in p:
            raise ClientError(f"{name}: item {i + 1} has no field {key_field!r} for --key-field")
        items.append({"key": str(p[key_field]), "payload": p})
    return items


def _bar(done: int, total: int, width: int = 30) -> str:
    filled = int(width * done / total) if total else width
    return "[" + "#" * filled + "-" * (width - filled) + "]"


def _print_status(b: dict[str, Any]) -> None:
    c = b["counts"]
    print(f"batch     {b['id']}")
    print(f"handler   {b['handler']}")
    print(f"status    {b['status']}")
    print(
        f"progress  {_bar(c['succeeded'] + c['failed'] + c['cancelled'], c['total'])} "
        f"{b['progress'] * 100:.1f}%"
    )
    print("counts    " + "  ".join(f"{k}={v}" for k, v in c.items()))
    print(f"created   {b['created_at']}   finished {b['finished_at'] or '-'}")
    cb = b["callback"]
    if cb["handler"]:
        print(f"callback  {cb['handler']}: {cb['state']} (attempts {cb['attempts']})")


async def _sse(
    session: aiohttp.ClientSession, url: str, last_id: str | None
) -> AsyncIterator[tuple[str, str | None, Any]]:
    """(event, id, data) from one connection to an SSE stream, until it closes."""
    headers = _headers() | {"Accept": "text/event-stream"}
    if last_id is not None:
        headers["Last-Event-ID"] = last_id
    async with session.get(
        url, headers=headers, timeout=aiohttp.ClientTimeout(total=None, sock_read=60)
    ) as resp:
        if resp.status >= 400:
            raise _problem("GET", url, resp.status, await resp.text())
        event, event_id, data = "message", None, list[str]()
        async for raw in resp.content:
            line = raw.decode().rstrip("\r\n")
            if not line:
                if data:
                    yield event, event_id, json.loads("\n".join(data))
                event, event_id, data = "message", None, []
            elif line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("id:"):
                event_id = line[3:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].strip())


class _Progress:
    """Progress on stderr: a redrawn bar on a terminal, a line per status change otherwise."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.tty = sys.stderr.isatty()
        self.start = time.monotonic()
        self.first_done: int | None = None
        self.last_status: str | None = None

    def show(self, b: dict[str, Any]) -> None:
        c = b["counts"]
        done = c["succeeded"] + c["failed"] + c["cancelled"]
        if self.first_done is None:
            self.first_done = done
        rate = (done - self.first_done) / max(1e-6, time.monotonic() - self.start)
        eta = f"{(c['total'] - done) / rate:.0f}s" if rate > 0 and done < c["total"] else "-"
        line = (
            f"{_bar(done, c['total'])} {done}/{c['total']} {rate:.1f}/s eta {eta} "
            f"failed {c['failed']} [{b['status']}]"
        )
        if self.quiet:
            return
        if self.tty:
            sys.stderr.write(f"\r{line}   ")
        elif b["status"] != self.last_status:
            sys.stderr.write(line + "\n")
        self.last_status = b["status"]
        sys.stderr.flush()

    def close(self) -> None:
        if not self.quiet and self.tty:
            sys.stderr.write("\n")


async def _watch(session: aiohttp.ClientSession, base: str, batch_id: str, quiet: bool) -> int:
    """Follow the batch's events until ``end`` (reconnecting with Last-Event-ID when a
    draining daemon closes the stream), then report; 0 only for ``completed``."""
    url = f"{base}/v1/batches/{batch_id}/events"
    progress = _Progress(quiet)
    final: dict[str, Any] | None = None
    last_id: str | None = None
    ended = False
    failed_reconnects = 0
    try:
        while not ended:
            try:
                async for event, event_id, data in _sse(session, url, last_id):
                    failed_reconnects = 0
                    last_id = event_id or last_id
                    if event == "snapshot":
                        final = data
                        progress.show(data)
                    elif event == "end":
                        ended = True
                        break
            except (aiohttp.ClientError, TimeoutError) as exc:
                failed_reconnects += 1
                if failed_reconnects > WATCH_RECONNECTS:
                    raise ClientError(_one_line(f"lost the event stream {url}: {exc}")) from None
            if not ended:
                await asyncio.sleep(min(5.0, 0.2 * 2**failed_reconnects))
    finally:
        progress.close()
    if final is None:
        raise ClientError("the event stream ended before any snapshot")
    final = await _wait_callback(session, base, final, quiet)
    c = final["counts"]
    callback_ok = _report_callback(final)
    if final["status"] == "completed":
        print(f"batch {batch_id} completed: {c['succeeded']} succeeded")
        return 0 if callback_ok else 1
    print(
        f"batch {batch_id} ended {final['status']}: {c['succeeded']} succeeded, "
        f"{c['failed']} failed, {c['cancelled']} cancelled"
    )
    if c["failed"]:
        shown = 20
        page = await _call(
            session, "GET", f"{base}/v1/batches/{batch_id}/items?status=failed&limit={shown}"
        )
        for it in page["items"]:
            err = it.get("error") or {}
            key = f" key={_printable(str(it['key']))}" if it.get("key") is not None else ""
            print(
                f"  failed item {it['id']}{key} after {it['attempts']} attempt(s): "
                f"{_printable(str(err.get('type', 'Error')))}: "
                f"{_one_line(str(err.get('message', '')))}"
            )
        if c["failed"] > shown:
            more = c["failed"] - shown
            print(f"  ... and {more} more: GET /v1/batches/{batch_id}/items?status=failed")
    return 1


CALLBACK_POLL_MAX_S = 2.0


async def _wait_callback(
    session: aiohttp.ClientSession, base: str, batch: dict[str, Any], quiet: bool
) -> dict[str, Any]:
    """A terminal batch whose completion callback has not finished yet: poll until it
    has (the event stream ends with the batch, the callback runs after it)."""
    delay = 0.05
    announced = False
    while (batch.get("callback") or {}).get("state") in ("pending", "running"):
        if not announced and not quiet:
            handler = _printable(str(batch["callback"]["handler"]))
            print(f"waiting for the completion callback {handler}...", file=sys.stderr)
            announced = True
        await asyncio.sleep(delay)
        delay = min(CALLBACK_POLL_MAX_S, delay * 2)
        batch = await _call(session, "GET", f"{base}/v1/batches/{batch['id']}")
    return batch


def _report_callback(batch: dict[str, Any]) -> bool:
    """Print how the completion callback ended; False if it failed."""
    cb = batch.get("callback") or {}
    if cb.get("state") not in ("succeeded", "failed"):
        return True
    handler = _printable(str(cb["handler"]))
    if cb["state"] == "succeeded":
        print(f"completion callback {handler} succeeded after {cb['attempts']} attempt(s)")
        return True
    err = cb.get("error") or {}
    print(
        f"completion callback {handler} failed after {cb['attempts']} attempt(s): "
        f"{_printable(str(err.get('type', 'Error')))}: {_one_line(str(err.get('message', '')))}"
        f" (redeliver: batch-supervisor redeliver {batch['id']})"
    )
    return False


def _max_failures(text: str) -> int | str:
    """``--max-failures``: a count, or a percentage such as ``10%``."""
    if text.endswith("%"):
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a count nor a percentage") from None


def _submission(args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {
        "handler": args.handler,
        "items": _read_items(args.file, args.key_field),
    }
    for field in (
        "priority",
        "max_concurrency",
        "max_attempts",
        "max_failures",
        "idempotency_key",
        "on_complete",
    ):
        if getattr(args, field, None) is not None:
            body[field] = getattr(args, field)
    if args.metadata is not None:
        try:
            body["metadata"] = json.loads(args.metadata)
        except ValueError as exc:
            raise ClientError(f"--metadata is not JSON: {exc}") from None
    return body


def cmd_client(args: argparse.Namespace) -> int:
    async def go() -> int:
        base = _client_url(args)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as s:
            verb = args.command
            if verb == "submit":
                body = _submission(args)
                b = await _call(s, "POST", f"{base}/v1/batches", json=body)
                print(json.dumps(b) if args.json else b["id"], flush=True)
                if args.wait:
                    return await _watch(s, base, b["id"], quiet=args.json)
                return 0
            if verb == "status":
                b = await _call(s, "GET", f"{base}/v1/batches/{args.id}")
                if args.json:
                    print(json.dumps(b, indent=2))
                else:
                    _print_status(b)
                return 0
            if verb == "watch":
                return await _watch(s, base, args.id, quiet=False)
            if verb == "list":
                q = f"?limit={args.limit}" + (f"&status={args.status}" if args.status else "")
                data = await _call(s, "GET", f"{base}/v1/batches{q}")
                if args.json:
                    print(json.dumps(data, indent=2))
                for b in [] if args.json else data["batches"]:
                    c = b["counts"]
                    print(
                        f"{b['id']}  {b['status']:<22} {b['handler']:<12} "
                        f"{c['succeeded'] + c['failed'] + c['cancelled']}/{c['total']}  "
                        f"{b['created_at']}"
                    )
                return 0
            body2 = (
                {"include_cancelled": True} if getattr(args, "include_cancelled", False) else None
            )
            path = "callback/redeliver" if verb == "redeliver" else verb
            b = await _call(s, "POST", f"{base}/v1/batches/{args.id}/{path}", json=body2)
            print(f"batch {b['id']}: {b['status']}")
            return 0

    try:
        return asyncio.run(go())
    except ClientError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except (OSError, ValueError, KeyError, TypeError) as exc:
        # A malformed answer or a local I/O problem: still one line, never a traceback.
        print(_one_line(f"error: {type(exc).__name__}: {exc}"), file=sys.stderr)
        return 1


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
            "--url", help=f"API base URL (env BATCH_SUPERVISOR_URL, default {DEFAULT_URL})"
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
    s.add_argument("--max-failures", type=_max_failures, help="a count, or a percentage like 10%%")
    s.add_argument("--idempotency-key")
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
    for verb in ("cancel", "pause", "resume", "retry"):
        v = with_url(sub.add_parser(verb, help=f"{verb} a batch"))
        v.add_argument("id")
        if verb == "retry":
            v.add_argument("--include-cancelled", action="store_true")
    rd = with_url(
        sub.add_parser("redeliver", help="run a batch's finished completion callback again")
    )
    rd.add_argument("id")
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
        return COMMANDS.get(args.command, cmd_client)(args)
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
