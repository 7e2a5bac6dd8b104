"""Records the daemon passes around (frozen) and their JSON shapes for the API."""

from __future__ import annotations

import dataclasses
import json
import json.encoder as json_encoder
import math
import uuid
from collections.abc import Awaitable, Generator, Iterable, Mapping
from datetime import datetime
from typing import Any, Protocol

from supervisor import states, tracecontext
from supervisor.store import BatchRow, ItemDetail, ItemRow


class AttemptControls(Protocol):
    """What a running attempt may ask of the daemon that runs it (the dispatcher)."""

    def report_progress(self, item: Item, progress: Progress) -> None: ...

    def extend(self, item: Item, seconds: float) -> float: ...

    def add_items(self, item: Item, entries: Iterable[Any]) -> int: ...

    def report_cost(self, item: Item, cost: float) -> None: ...


@dataclasses.dataclass(frozen=True, slots=True)
class Progress:
    """One progress report of an attempt (see :meth:`Item.progress`)."""

    done: float
    total: float | None
    note: str | None

    @classmethod
    def checked(cls, done: Any, total: Any = None, note: Any = None) -> Progress:
        """Validated arguments of :meth:`Item.progress`: a bad one is the handler's
        bug, so it raises (and fails that attempt) naming the argument."""

        def number(name: str, v: Any) -> float:
            if isinstance(v, bool) or not isinstance(v, int | float):
                raise TypeError(f"progress {name} must be a number, not {type(v).__name__}")
            try:
                f = float(v)
            except OverflowError:
                f = math.inf
            if not math.isfinite(f) or f < 0:
                raise ValueError(f"progress {name} must be a finite number >= 0, not {v!r}")
            return v

        if note is not None and not isinstance(note, str):
            raise TypeError(f"progress note must be a str or None, not {type(note).__name__}")
        return cls(
            number("done", done),
            None if total is None else number("total", total),
            None if note is None else note[:NOTE_MAX],
        )


NOTE_MAX = 200  # characters of a progress note kept


class _Done:
    """An awaitable that is already done: what :meth:`Item.progress` returns, so
    ``await item.progress(...)`` (async handlers) and a bare call (plain ones,
    running in a thread) both work."""

    __slots__ = ()

    def __await__(self) -> Generator[None, None, None]:
        return
        yield  # a generator that ends at once


_DONE = _Done()


@dataclasses.dataclass(frozen=True, slots=True)
class Item:
    """What a handler receives: one work item and the attempt being made."""

    id: str
    batch_id: str
    key: str | None
    payload: Any
    attempt: int
    max_attempts: int
    handler: str
    batch_metadata: Mapping[str, Any]
    # The daemon running this attempt (None outside one, e.g. in a unit test of a
    # handler: progress and extend then do nothing).
    controls: AttemptControls | None = dataclasses.field(default=None, compare=False, repr=False)
    # The W3C trace context of this attempt when the daemon traces (README
    # "Tracing"): its span's, which the http handler sends as traceparent and a
    # python handler may pass on; None when tracing is off.
    trace: tracecontext.TraceContext | None = dataclasses.field(
        default=None, compare=False, repr=False
    )

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "batch_id": self.batch_id,
            "key": self.key,
            "payload": self.payload,
            "attempt": self.attempt,
            "max_attempts": self.max_attempts,
            "handler": self.handler,
            "batch_metadata": dict(self.batch_metadata),
        }

    def progress(
        self, done: float, total: float | None = None, note: str | None = None
    ) -> Awaitable[None]:
        """Report how far this attempt has got: ``done`` of ``total`` (any unit;
        total may be unknown) and a short note. Call it as often as you like: the
        daemon keeps the latest report and writes it at most twice a second, and it
        shows in the item's JSON, its batch's SSE stream and the dashboard."""
        p = Progress.checked(done, total, note)
        if self.controls is not None:
            self.controls.report_progress(self, p)
        return _DONE

    def extend(self, seconds: float) -> float:
        """Ask for ``seconds`` more from now before this attempt times out (never
        less time than it already has, never past the handler's ``max_timeout``
        from the attempt's start). Returns the seconds the attempt now has left."""
        if isinstance(seconds, bool) or not isinstance(seconds, int | float):
            raise TypeError(f"extend seconds must be a number, not {type(seconds).__name__}")
        if not 0 <= seconds < math.inf:
            raise ValueError(f"extend seconds must be a finite number >= 0, not {seconds!r}")
        if self.controls is None:
            return float(seconds)
        return self.controls.extend(self, float(seconds))

    def report_cost(self, cost: float) -> None:
        """Say what this attempt actually cost, in its key budget's units (tokens
        an LLM call used, say), when its estimate (the payload's cost value) was
        off: when the attempt ends, its key's budget for the period that charged
        it is corrected by the difference, if that period is not over. The last
        report counts. Does nothing for a handler without a key budget."""
        if isinstance(cost, bool) or not isinstance(cost, int | float):
            raise TypeError(f"report_cost: the cost must be a number, not {type(cost).__name__}")
        if not 0 <= cost < math.inf:
            raise ValueError(f"report_cost: the cost must be a finite number >= 0, not {cost!r}")
        if self.controls is not None:
            self.controls.report_cost(self, float(cost))

    def add_items(self, items: Iterable[Any]) -> int:
        """Add items to this item's batch (fan-out: a crawler adding the links it
        found): each a payload, or ``{"payload": ..., "key": ...}`` as in a
        submission. They are written with this attempt's outcome, in its
        transaction, and only if it succeeds: a failed or crashed attempt adds
        nothing, and its retry adds them again. A key already in the batch (or
        given twice) is skipped, so adding every link seen queues each URL once.
        If they would take the batch past its ``max_items`` the attempt fails with
        MaxItemsExceeded and adds none. Returns how many entries were taken."""
        if self.controls is None:
            raise RuntimeError("add_items: this item is not running in a daemon")
        return self.controls.add_items(self, items)


def rfc3339(value: datetime | None) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value is not None else None


def _unserialisable(o: Any) -> Any:
    raise TypeError(f"{type(o).__name__} is not JSON")


# json.dumps builds a new C encoder on every call; a 100,000-item submission
# encodes each payload, so build it once (about 4x faster per payload).
_C_ENCODER = (
    json_encoder.c_make_encoder(  # type: ignore[attr-defined]
        None, _unserialisable, json_encoder.encode_basestring, None, ":", ",", False, False, False
    )
    if getattr(json_encoder, "c_make_encoder", None) is not None
    else None
)
_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)
_encode_str = json_encoder.encode_basestring  # the C one when available, as json.dumps uses


def compact_json(value: Any) -> str:
    """Compact JSON text, as jsonb will store it (UTF-8, no NaN)."""
    # Scalars are common (payloads: ids, URLs; results: None): skip the encoder's
    # call overhead.
    if value is None:
        return "null"
    kind = type(value)
    if kind is int:
        return repr(value)
    if kind is str:
        return _encode_str(value)
    if _C_ENCODER is not None:
        return "".join(_C_ENCODER(value, 0))
    return _ENCODER.encode(value)


def loads(value: Any) -> Any:
    """jsonb arrives from asyncpg as text."""
    return json.loads(value) if isinstance(value, str) else value


def counts(b: BatchRow) -> dict[str, int]:
    return {
        "total": b.total,
        "queued": b.queued,
        "running": b.running,
        "succeeded": b.succeeded,
        "failed": b.failed,
        "cancelled": b.cancelled,
    }


def batch_json(b: BatchRow, *, waiting_on: list[uuid.UUID] | None = None) -> dict[str, Any]:
    """A batch for clients; ``waiting_on`` (the dependencies it still waits for)
    is looked up by the routes that show one batch, null elsewhere."""
    c = counts(b)
    done = c["succeeded"] + c["failed"] + c["cancelled"]
    return {
        "id": str(b.id),
        "handler": b.handler,
        "tenant": b.tenant,
        "status": b.status,
        "counts": c,
        "progress": round(done / c["total"], 4) if c["total"] else 1.0,
        "priority": b.priority,
        "max_concurrency": b.max_concurrency,
        "max_failures": loads(b.max_failures),
        "max_attempts": b.max_attempts,
        "max_items": b.max_items,
        "metadata": loads(b.metadata),
        "idempotency_key": b.idempotency_key,
        "exclusive_key": b.exclusive_key,
        "after": [str(a) for a in b.after_ids or ()],
        "after_policy": b.after_policy,
        "waiting_on": None if waiting_on is None else [str(a) for a in waiting_on],
        "not_before": rfc3339(b.not_before),
        "version": b.version,
        "created_at": rfc3339(b.created_at),
        "started_at": rfc3339(b.started_at),
        "finished_at": rfc3339(b.finished_at),
        "callback": {
            "handler": b.callback_handler,
            "state": b.callback_state,
            "attempts": b.callback_attempts,
            "error": loads(b.callback_error),
        },
    }


def error_json(text: str | None, *, tracebacks: bool) -> Any:
    """An item's error entry for a client; without ``tracebacks`` its traceback
    (source lines, paths, whatever secret sits on the failing line) is withheld:
    type and message are for every reader, tracebacks for ``admin`` only."""
    entry = loads(text)
    if not tracebacks and isinstance(entry, dict) and entry.get("traceback") is not None:
        entry["traceback"] = None
    return entry


def item_json(it: ItemRow, *, with_errors: bool = False, tracebacks: bool = True) -> dict[str, Any]:
    out = {
        "id": str(it.id),
        "batch_id": str(it.batch_id),
        "key": it.key,
        "status": it.status,
        "payload": loads(it.payload),
        "result": loads(it.result),
        "attempts": it.attempts,
        "max_attempts": it.max_attempts,
        "error": error_json(it.error, tracebacks=tracebacks),
        "run_after": rfc3339(it.run_after) if it.status == states.ItemStatus.QUEUED else None,
        "worker": it.worker,
        "created_at": rfc3339(it.created_at),
        "started_at": rfc3339(it.started_at),
        "finished_at": rfc3339(it.finished_at),
        "progress": loads(it.progress),
        "limit_key": it.limit_key,
    }
    if with_errors and isinstance(it, ItemDetail):
        errors = loads(it.errors)
        if not tracebacks and isinstance(errors, list):
            errors = [{**e, "traceback": None} if isinstance(e, dict) else e for e in errors]
        out["errors"] = errors
        out["errors_dropped"] = it.errors_dropped  # older entries not kept (last 20 are)
    return out


def is_terminal(b: BatchRow) -> bool:
    return states.is_batch_terminal(b.status)
