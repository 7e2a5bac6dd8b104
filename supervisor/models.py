"""Records the daemon passes around (frozen) and their JSON shapes for the API."""

from __future__ import annotations

import dataclasses
import json
import json.encoder as json_encoder
from collections.abc import Mapping
from datetime import datetime
from typing import Any, Protocol

from supervisor import states


@dataclasses.dataclass(frozen=True)
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

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"batch_metadata": dict(self.batch_metadata)}


class Row(Protocol):
    """A database row (asyncpg.Record) or any mapping with the same keys."""

    def __getitem__(self, key: str, /) -> Any: ...


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


def counts(row: Row) -> dict[str, int]:
    return {
        k: int(row[k]) for k in ("total", "queued", "running", "succeeded", "failed", "cancelled")
    }


def batch_json(row: Row) -> dict[str, Any]:
    c = counts(row)
    done = c["succeeded"] + c["failed"] + c["cancelled"]
    return {
        "id": str(row["id"]),
        "handler": row["handler"],
        "tenant": row["tenant"],
        "status": row["status"],
        "counts": c,
        "progress": round(done / c["total"], 4) if c["total"] else 1.0,
        "priority": row["priority"],
        "max_concurrency": row["max_concurrency"],
        "max_failures": loads(row["max_failures"]),
        "max_attempts": row["max_attempts"],
        "metadata": loads(row["metadata"]),
        "idempotency_key": row["idempotency_key"],
        "version": row["version"],
        "created_at": rfc3339(row["created_at"]),
        "started_at": rfc3339(row["started_at"]),
        "finished_at": rfc3339(row["finished_at"]),
        "callback": {
            "handler": row["callback_handler"],
            "state": row["callback_state"],
            "attempts": row["callback_attempts"],
            "error": loads(row["callback_error"]),
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


def item_json(row: Row, *, with_errors: bool = False, tracebacks: bool = True) -> dict[str, Any]:
    out = {
        "id": str(row["id"]),
        "batch_id": str(row["batch_id"]),
        "key": row["key"],
        "status": row["status"],
        "payload": loads(row["payload"]),
        "result": loads(row["result"]),
        "attempts": row["attempts"],
        "max_attempts": row["max_attempts"],
        "error": error_json(row["error"], tracebacks=tracebacks),
        "run_after": rfc3339(row["run_after"])
        if row["status"] == states.ItemStatus.QUEUED
        else None,
        "worker": row["worker"],
        "created_at": rfc3339(row["created_at"]),
        "started_at": rfc3339(row["started_at"]),
        "finished_at": rfc3339(row["finished_at"]),
    }
    if with_errors:
        errors = loads(row["errors"])
        if not tracebacks and isinstance(errors, list):
            errors = [{**e, "traceback": None} if isinstance(e, dict) else e for e in errors]
        out["errors"] = errors
        out["errors_dropped"] = row["errors_dropped"]  # older entries not kept (last 20 are)
    return out


def is_terminal(row: Row) -> bool:
    return states.is_batch_terminal(row["status"])
