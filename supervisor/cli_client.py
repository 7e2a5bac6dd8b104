"""The HTTP client verbs of the command line (``submit``, ``status``, ``watch``,
``list``, ``results``, ``cancel``, ``pause``, ``resume``, ``retry``, ``redeliver``,
``item retry``, ``item cancel``, ``limits``, ``schedules``, ``schedule``):
the live progress renderer and the one-line errors, over the Python client
(:mod:`supervisor.client`), so the project has one HTTP client.

Everything a server sends is shown with control characters escaped: item keys
and error messages are client data and must not drive the operator's terminal.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
import urllib.parse
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from supervisor import client, config
from supervisor.client import DEFAULT_URL as DEFAULT_URL  # the CLI's --url help names it
from supervisor.client import ClientError
from supervisor.errors import ConfigError

log = logging.getLogger("supervisor.cli")
_printable = client.printable
_one_line = client.one_line


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
    if b.get("not_before"):
        print(f"not before {b['not_before']}")
    print(f"created   {b['created_at']}   finished {b['finished_at'] or '-'}")
    cb = b["callback"]
    if cb["handler"]:
        print(f"callback  {cb['handler']}: {cb['state']} (attempts {cb['attempts']})")


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


async def _watch(api: client.AsyncClient, batch_id: str, quiet: bool) -> int:
    """Follow the batch's events until ``end`` (reconnecting with Last-Event-ID when a
    draining daemon closes the stream), then report; 0 only for ``completed``."""
    progress = _Progress(quiet)
    final: dict[str, Any] | None = None
    try:
        async for ev in api.events(batch_id):
            if ev.kind == "snapshot":
                final = ev.data
                progress.show(ev.data)
    finally:
        progress.close()
    if final is None:
        raise ClientError("the event stream ended before any snapshot")
    final = await _wait_callback(api, final, quiet)
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
        page = await api.request(
            "GET", f"/v1/batches/{batch_id}/items", params={"status": "failed", "limit": str(shown)}
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
    c: client.AsyncClient, batch: dict[str, Any], quiet: bool
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
        batch = await c.request("GET", f"/v1/batches/{batch['id']}")
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


async def _export(c: client.AsyncClient, args: argparse.Namespace) -> int:
    """``results``: the records to stdout as the daemon sent them; on a terminal,
    with control characters escaped (keys are client data)."""
    out = sys.stdout
    tty = out.isatty()
    records = c.result_records(args.id, fmt=args.format, status=args.status, after=args.after)
    try:
        async for text, _ in records:
            if tty:
                out.write(_printable(text.rstrip("\r\n")) + "\n")
            else:
                out.buffer.write(text.encode())
        out.flush()
    except BrokenPipeError:
        # The reader stopped (``| head``): nothing more is wanted. Point stdout at
        # /dev/null so the interpreter's own flush at exit does not fail too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), out.fileno())
    return 0


def max_failures(text: str) -> int | str:
    """``--max-failures``: a count, or a percentage such as ``10%``."""
    if text.endswith("%"):
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a count nor a percentage") from None


def not_before(text: str) -> str:
    """``--not-before``: an RFC 3339 time, sent as given (the daemon validates it),
    or ``+DURATION`` from now (this machine's clock), sent as UTC."""
    if not text.startswith("+"):
        return text
    try:
        seconds = config.parse_duration(text[1:])
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return (datetime.now(UTC) + timedelta(seconds=seconds)).isoformat()


def _submission(args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {
        "handler": args.handler,
        "items": _read_items(args.file, args.key_field),
    }
    fields = (
        "priority",
        "max_concurrency",
        "max_attempts",
        "max_failures",
        "idempotency_key",
        "on_complete",
        "exclusive_key",
        "after",
        "after_policy",
        "on_conflict",
        "not_before",
    )
    return _with_options(body, args, fields)


def _print_schedule(sc: dict[str, Any]) -> None:
    """One schedule on one line: name, what it fires (a pipeline's name), state,
    next fire, last slot and its batch (or pipeline run)."""
    last = sc.get("last_slot") or {}
    if last and last.get("pipeline_run_id"):
        status = last.get("pipeline_run_status") or last.get("outcome")
        target = f"run {last['pipeline_run_id']}"
        last_text = f"last {last.get('slot_at')} {last.get('kind')} {status} {target}"
    elif last:
        batch = last.get("batch_id") or "-"
        status = last.get("batch_status") or last.get("outcome")
        last_text = f"last {last.get('slot_at')} {last.get('kind')} {status} {batch}"
    else:
        last_text = "never fired"
    state = "paused" if sc.get("paused") else f"next {sc.get('next_fire_at') or '-'}"
    fires = f"  pipeline {sc['pipeline']}" if sc.get("pipeline") else ""
    print(
        _printable(f"{sc['name']:<20} {sc['cron']} ({sc['timezone']}){fires}  {state}  {last_text}")
    )


async def _schedules(c: client.AsyncClient, args: argparse.Namespace) -> int:
    """``schedules`` and ``schedule show|pause|resume|run NAME``."""
    if args.command == "schedules":
        data = await c.request("GET", "/v1/schedules")
        if args.json:
            print(json.dumps(data, indent=2))
        for sc in [] if args.json else data["schedules"]:
            _print_schedule(sc)
        return 0
    url = f"/v1/schedules/{urllib.parse.quote(args.name, safe='')}"
    if args.action == "show":
        sc = await c.request("GET", url)
    else:
        sc = await c.request("POST", f"{url}/{args.action}")
    if args.json:
        print(json.dumps(sc, indent=2))
    elif args.action == "run" and sc.get("run"):
        print(f"schedule {_printable(args.name)}: pipeline run {sc['run']['id']}")
    elif args.action == "run":
        print(f"schedule {_printable(args.name)}: batch {sc['batch']['id']}")
    else:
        _print_schedule(sc)
    return 0


async def _limits(c: client.AsyncClient, args: argparse.Namespace) -> int:
    """``limits``: one line per keyed handler, then one per key in use (busiest
    first), then one per throttled key."""
    data = await c.limits()
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    for h in data["handlers"]:
        kl = h["key_limit"]
        caps = ", ".join(
            f"{k} {kl[k]}" for k in ("concurrency", "rate_limit") if kl.get(k) is not None
        )
        if kl.get("budget") is not None:
            caps += f"{', ' if caps else ''}budget {kl['budget']:g} per {kl['budget_period']}"
        paused = h["throttled_keys"]
        keys = h.get("keys", [])
        line = (
            f"{h['name']:<20} key {kl['key']} ({caps})  keys in use: {len(keys)}"
            f"{'+' if h.get('keys_truncated') else ''}  throttled keys: {len(paused)}"
        )
        print(_printable(line))
        for u in keys:
            parts = [f"running {u['running']}/{kl['concurrency'] or '-'}"]
            if u["tokens"] is not None:
                parts.append(f"tokens {u['tokens']:g}/{kl['burst']:g}")
            if "budget" in u:
                parts.append(f"budget {u['budget']['used']:g}/{u['budget']['budget']:g}")
            if u["throttled_until"] is not None:
                parts.append(f"throttled until {u['throttled_until']}")
            print(_printable(f"  {u['limit_key']!r}: " + ", ".join(parts)))
        for t in paused:
            print(_printable(f"  {t['limit_key']!r} until {t['throttled_until']}"))
    if data["truncated"]:
        print("(more keys than listed)")
    return 0


def _run_submission(args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {"items": _read_items(args.file, args.key_field)}
    return _with_options(body, args, ("idempotency_key", "exclusive_key"))


def _with_options(
    body: dict[str, Any], args: argparse.Namespace, fields: Sequence[str]
) -> dict[str, Any]:
    """``body`` with the options among ``fields`` that were given, and --metadata."""
    for field in fields:
        if getattr(args, field, None) is not None:
            body[field] = getattr(args, field)
    if args.metadata is not None:
        try:
            body["metadata"] = json.loads(args.metadata)
        except ValueError as exc:
            raise ClientError(f"--metadata is not JSON: {exc}") from None
    return body


def _print_run(r: dict[str, Any]) -> None:
    print(f"run       {r['id']}")
    print(f"pipeline  {r['pipeline']}")
    paused = " (paused)" if r.get("paused") else ""
    print(f"status    {r['status']}{paused}")
    for st in r["stages"]:
        print(f"  {st['name']:<16} {st['status']:<22} {st['batch_id'] or '-'}")
    if r.get("error"):
        print(f"error     {_one_line(json.dumps(r['error']))}")


async def _watch_run(c: client.AsyncClient, run_id: str, quiet: bool) -> int:
    """Follow the run's events until ``end`` (reconnecting when a draining daemon
    closes the stream), a line per stage start and end; 0 only for ``completed``."""
    final: dict[str, Any] | None = None
    async for ev in c.stream(f"/v1/pipeline-runs/{run_id}/events"):
        if ev.kind == "snapshot":
            final = ev.data
        elif ev.kind == "stage" and not quiet:
            data = ev.data
            print(
                f"stage {data['name']} {data['event']}: {data['status']}",
                file=sys.stderr,
                flush=True,
            )
    if final is None:
        raise ClientError("the event stream ended before any snapshot")
    print(f"run {run_id} ended {final['status']}")
    if final.get("error"):
        print(f"  {_one_line(json.dumps(final['error']))}")
    return 0 if final["status"] == "completed" else 1


async def _pipeline_verb(c: client.AsyncClient, args: argparse.Namespace) -> int:
    verb = args.command
    if verb == "pipeline-run":
        body = _run_submission(args)
        r = await c.request("POST", f"/v1/pipelines/{args.pipeline}/runs", json_body=body)
        print(json.dumps(r) if args.json else r["id"], flush=True)
        return await _watch_run(c, r["id"], quiet=args.json) if args.wait else 0
    if verb == "pipeline-status":
        r = await c.request("GET", f"/v1/pipeline-runs/{args.id}")
        if args.json:
            print(json.dumps(r, indent=2))
        else:
            _print_run(r)
        return 0
    control = verb.removeprefix("pipeline-")
    retry = {"include_cancelled": True} if getattr(args, "include_cancelled", False) else None
    r = await c.request("POST", f"/v1/pipeline-runs/{args.id}/{control}", json_body=retry)
    print(f"run {r['id']}: {r['status']}" + (" (paused)" if r["paused"] else ""))
    return 0


def cmd_client(args: argparse.Namespace) -> int:
    async def go() -> int:
        async with client.AsyncClient(_client_url(args), timeout=300) as c:
            verb = args.command
            if verb.startswith("pipeline-"):
                return await _pipeline_verb(c, args)
            if verb in ("schedules", "schedule"):
                return await _schedules(c, args)
            if verb == "limits":
                return await _limits(c, args)
            if verb == "submit":
                body = _submission(args)
                b = await c.request("POST", "/v1/batches", json_body=body)
                print(json.dumps(b) if args.json else b["id"], flush=True)
                if args.wait:
                    return await _watch(c, b["id"], quiet=args.json)
                return 0
            if verb == "status":
                b = await c.request("GET", f"/v1/batches/{args.id}")
                if args.json:
                    print(json.dumps(b, indent=2))
                else:
                    _print_status(b)
                return 0
            if verb == "watch":
                return await _watch(c, args.id, quiet=False)
            if verb == "results":
                return await _export(c, args)
            if verb == "list":
                q = f"?limit={args.limit}" + (f"&status={args.status}" if args.status else "")
                data = await c.request("GET", f"/v1/batches{q}")
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
            if verb == "item":
                if not (args.id.isascii() and args.id.isdigit()):
                    raise ClientError(f"item id must be a number, not {_one_line(args.id)!r}")
                it = await c.request("POST", f"/v1/items/{args.id}/{args.item_verb}")
                b = await c.request("GET", f"/v1/batches/{it['batch_id']}")
                print(f"item {it['id']}: {it['status']}; batch {b['id']}: {b['status']}")
                return 0
            body2 = (
                {"include_cancelled": True} if getattr(args, "include_cancelled", False) else None
            )
            path = "callback/redeliver" if verb == "redeliver" else verb
            b = await c.request("POST", f"/v1/batches/{args.id}/{path}", json_body=body2)
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
