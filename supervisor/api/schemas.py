"""Request validation. Every bad field is reported with its JSON Pointer path
(``/items/3/key``) and a message; the whole request is checked before anything
is written, so a rejected submission leaves nothing behind.
"""

from __future__ import annotations

import enum
import json
import math
import re
import uuid
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from supervisor import key_limits, pipeline_runs, states
from supervisor.api.problems import Problem, ValidationFailed
from supervisor.batches import NewBatch
from supervisor.models import compact_json

INT32 = 2**31 - 1
SUBMIT_FIELDS = (
    "handler",
    "items",
    "priority",
    "max_concurrency",
    "max_attempts",
    "max_failures",
    "metadata",
    "idempotency_key",
    "on_complete",
    "exclusive_key",
    "after",
    "after_policy",
    "on_conflict",
    "not_before",
    "max_items",
)
AFTER_MAX = 100  # dependencies of one batch
PATCH_FIELDS = ("priority", "max_concurrency", "max_failures", "not_before")
_PERCENT = re.compile(r"^([0-9]{1,3}(?:\.[0-9]+)?)%$")
KEY_MAX = 1000
IDEMPOTENCY_MAX = 255
EXCLUSIVE_KEY_MAX = 200
# RFC 3339 date-time (section 5.6): the offset is required, so the instant is
# never a guess about the server's time zone.
_RFC3339 = re.compile(
    r"^(\d{4}-\d{2}-\d{2})[Tt ](\d{2}:\d{2}:\d{2})(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$", re.ASCII
)
MAX_DEPTH = 200  # nesting levels of a request body; deeper input is a 400, never a crash


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    """A number like 1e400 would come back as Infinity, which jsonb rejects."""
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"number {text} is out of range")
    return value


def _too_deep(value: Any, limit: int) -> bool:
    """Iterative depth check: recursive code (json.dumps, jsonb) must stay safe.

    Only containers are pushed, so a flat 100,000-item batch costs one pass over
    its items and their values, not a stack entry per scalar."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if depth > limit:
            return True
        for c in v.values() if type(v) is dict else v:
            if type(c) is dict or type(c) is list:
                stack.append((c, depth + 1))
    return False


def parse_json(raw: bytes) -> Any:
    """Strict JSON (no NaN/Infinity, finite numbers, bounded nesting); else a 400."""
    too_deep = Problem(400, f"request body nests arrays/objects deeper than {MAX_DEPTH} levels")
    try:
        value = json.loads(raw, parse_constant=_reject_constant, parse_float=_finite_float)
    except (ValueError, UnicodeDecodeError) as exc:
        raise Problem(400, f"request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise too_deep from None
    if (type(value) is dict or type(value) is list) and _too_deep(value, MAX_DEPTH):
        raise too_deep
    return value


def _bad_text(value: str) -> str | None:
    """Why PostgreSQL cannot store this text, or None."""
    if "\x00" in value:
        return "contains \\u0000, which PostgreSQL cannot store"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "contains an unpaired surrogate, which is not valid Unicode"
    return None


def _find_unstorable(value: Any, path: str) -> tuple[str, str] | None:
    """Locate a string PostgreSQL cannot store (NUL, lone surrogate)."""
    if isinstance(value, str):
        why = _bad_text(value)
        return (path, why) if why else None
    if isinstance(value, dict):
        for k, v in value.items():
            sub = f"{path}/{_escape(k)}"
            found = _find_unstorable(k, sub) or _find_unstorable(v, sub)
            if found:
                return found
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found = _find_unstorable(v, f"{path}/{i}")
            if found:
                return found
    return None


def _escape(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")


def storable_json(value: Any, path: str, errors: list[dict[str, str]]) -> str | None:
    """JSON text for jsonb, or None with an error naming the bad path."""
    text = compact_json(value)
    bad = "\\u0000" in text
    if not bad:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            bad = True
    found = _find_unstorable(value, path) if bad else None
    if found:  # a mere backslash-u0000 in the text (escaped by the user) is storable
        errors.append({"path": found[0], "message": found[1]})
        return None
    return text


def exclusive_key_problem(value: Any) -> str | None:
    """Why ``value`` is not an exclusive key, or None. Printable, and without
    surrounding white space: "portfolio:1 " would be another key than
    "portfolio:1", and the two batches would run side by side."""
    if not isinstance(value, str) or not 1 <= len(value) <= EXCLUSIVE_KEY_MAX:
        return f"must be null or a string of 1 to {EXCLUSIVE_KEY_MAX} characters"
    if not value.isprintable():
        return "must be printable (no control characters, no unpaired surrogates)"
    if value != value.strip():
        return "must not begin or end with white space"
    return None


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _opt_int(
    body: Mapping[str, Any],
    field: str,
    errors: list[dict[str, str]],
    *,
    minimum: int,
    maximum: int = INT32,
) -> int | None:
    v = body.get(field)
    if v is None:
        return None
    if not is_int(v) or not minimum <= v <= maximum:
        errors.append(
            {
                "path": f"/{field}",
                "message": f"must be null or an integer from {minimum} to {maximum}",
            }
        )
        return None
    return int(v)


def _max_failures(v: Any, path: str, errors: list[dict[str, str]]) -> int | str | None:
    if v is None:
        return None
    if is_int(v) and 0 <= v <= INT32:
        return int(v)
    if isinstance(v, str):
        m = _PERCENT.match(v)
        if m and 0 <= float(m.group(1)) <= 100:
            return v
    errors.append(
        {"path": path, "message": 'must be null, a non-negative integer or a percentage like "10%"'}
    )
    return None


def _priority(body: Mapping[str, Any], errors: list[dict[str, str]]) -> int:
    v = body.get("priority", 0)
    if v is None:
        return 0
    if not is_int(v) or not -1000 <= v <= 1000:
        errors.append({"path": "/priority", "message": "must be an integer from -1000 to 1000"})
        return 0
    return int(v)


def _unknown(body: Mapping[str, Any], known: tuple[str, ...], errors: list[dict[str, str]]) -> None:
    for k in body:
        if k not in known:
            errors.append(
                {
                    "path": f"/{_escape(str(k))}",
                    "message": f"unknown field (known: {', '.join(known)})",
                }
            )


def _payload_of(entry: Any, path: str) -> tuple[Any, str]:
    """An items-array entry's payload and its JSON Pointer: the entry itself, or
    its "payload" when it is ``{"payload": ..., "key": ...}`` (the key optional)."""
    if (
        type(entry) is dict
        and "payload" in entry
        and (len(entry) == 1 or (len(entry) == 2 and "key" in entry))
    ):
        return entry["payload"], f"{path}/payload"
    return entry, path


def item_entries(
    raw_items: list[Any],
    errors: list[dict[str, str]],
    *,
    path: str = "/items",
    dedupe: bool = False,
    key_limit: tuple[str, tuple[str, ...]] | None = None,
    limit_keys: list[str] | None = None,
    cost: tuple[str, tuple[str, ...]] | None = None,
) -> list[tuple[str | None, str]]:
    """Each entry of an items array as (key, payload JSON text): a bare payload, or
    ``{"payload": ..., "key": ...}``. Problems go to ``errors`` (at most about 50),
    named by JSON Pointer under ``path``. A key given twice is an error, or with
    ``dedupe`` the later entry is dropped (a handler adding every link it found).
    ``key_limit`` (the handler's pointer and its tokens): each returned entry's
    limit key is appended to ``limit_keys``, in step. ``cost`` (the pointer of
    the key budget's cost and its tokens): each payload's value there must be a
    number >= 0, or absent."""
    items: list[tuple[str | None, str]] = []
    seen: dict[str, int] = {}
    for i, entry in enumerate(raw_items):
        key: str | None = None
        payload, payload_path = _payload_of(entry, f"{path}/{i}")
        if payload_path != f"{path}/{i}":  # {"payload": ..., "key": ...}
            k = entry.get("key")
            if k is not None:
                if not isinstance(k, str) or not k or len(k) > KEY_MAX:
                    errors.append(
                        {
                            "path": f"{path}/{i}/key",
                            "message": "must be null or a non-empty string of at most "
                            f"{KEY_MAX} chars",
                        }
                    )
                elif why := _bad_text(k):
                    errors.append({"path": f"{path}/{i}/key", "message": why})
                elif k in seen and dedupe:
                    continue
                elif k in seen:
                    errors.append(
                        {
                            "path": f"{path}/{i}/key",
                            "message": f"duplicate key {k!r} (also {path}/{seen[k]}/key)",
                        }
                    )
                else:
                    seen[k] = i
                    key = k
        text = storable_json(payload, payload_path, errors)
        if text is not None:
            items.append((key, text))
        if key_limit is not None and limit_keys is not None:
            pointer, tokens = key_limit
            try:
                limit_keys.append(key_limits.key_of(payload, tokens))
            except ValueError as exc:
                errors.append({"path": f"{payload_path}{pointer}", "message": str(exc)})
        if cost is not None:
            try:
                key_limits.cost_of(payload, cost[1])
            except ValueError as exc:
                errors.append({"path": f"{payload_path}{cost[0]}", "message": str(exc)})
        if len(errors) >= 50:
            break
    return items


def idempotency_key(
    body: Mapping[str, Any], header_key: str | None, errors: list[dict[str, str]]
) -> str | None:
    """The request's idempotency key: the body's ``idempotency_key`` or the
    Idempotency-Key header (both: they must agree)."""
    idem = body.get("idempotency_key")
    if idem is not None and (
        not isinstance(idem, str) or not idem or len(idem) > IDEMPOTENCY_MAX or _bad_text(idem)
    ):
        errors.append(
            {
                "path": "/idempotency_key",
                "message": f"must be null or a string of 1 to {IDEMPOTENCY_MAX} characters",
            }
        )
        idem = None
    if header_key is not None:
        if not header_key or len(header_key) > IDEMPOTENCY_MAX or not header_key.isascii():
            errors.append(
                {
                    "path": "Idempotency-Key",
                    "message": f"header must be 1 to {IDEMPOTENCY_MAX} ASCII characters",
                }
            )
        elif idem is not None and idem != header_key:
            errors.append(
                {"path": "/idempotency_key", "message": "differs from the Idempotency-Key header"}
            )
        else:
            idem = header_key
    return idem


def submission(
    body: Any,
    *,
    header_key: str | None,
    handler_exists: Callable[[str], bool],
    max_items: int,
    key_pointer: Callable[[str], str | None] = lambda _handler: None,
    cost_pointer: Callable[[str], str | None] = lambda _handler: None,
) -> NewBatch:
    """Validate a POST /v1/batches body into a NewBatch, or raise with every error.

    ``key_pointer``: the JSON Pointer of a handler's key limit (None: it has none);
    each item's limit key is taken from its payload here, once. ``cost_pointer``:
    that of its key budget's cost (None: none), whose values are checked here."""
    if not isinstance(body, dict):
        raise ValidationFailed([{"path": "", "message": "the body must be a JSON object"}])
    errors: list[dict[str, str]] = []
    _unknown(body, SUBMIT_FIELDS, errors)

    handler = body.get("handler")
    if not isinstance(handler, str) or not handler:
        errors.append({"path": "/handler", "message": "required: the name of a configured handler"})
    elif not handler_exists(handler):
        errors.append({"path": "/handler", "message": f"unknown handler {handler!r}"})

    pointer = key_pointer(handler) if isinstance(handler, str) and handler_exists(handler) else None
    tokens = key_limits.parse_pointer(pointer) if pointer is not None else None
    limit_keys: list[str] | None = [] if tokens is not None else None
    cost = cost_pointer(handler) if pointer is not None and isinstance(handler, str) else None
    raw_items = body.get("items")
    items: list[tuple[str | None, str]] = []
    if not isinstance(raw_items, list) or not raw_items:
        errors.append({"path": "/items", "message": "required: a non-empty array of items"})
    elif len(raw_items) > max_items:
        raise Problem(
            413,
            f"/items: {len(raw_items)} items exceed the limit of {max_items} "
            "per batch ([server] max_items_per_batch)",
        )
    else:
        items = item_entries(
            raw_items,
            errors,
            key_limit=(pointer, tokens) if pointer is not None and tokens is not None else None,
            limit_keys=limit_keys,
            cost=(cost, key_limits.parse_pointer(cost)) if cost is not None else None,
        )

    metadata = body.get("metadata", {})
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict):
        errors.append({"path": "/metadata", "message": "must be a JSON object"})
        metadata = {}
    else:
        storable_json(metadata, "/metadata", errors)

    idem = idempotency_key(body, header_key, errors)

    on_complete = body.get("on_complete")
    if on_complete is not None:
        if not isinstance(on_complete, str):
            errors.append({"path": "/on_complete", "message": "must be null or a handler name"})
            on_complete = None
        elif not handler_exists(on_complete):
            errors.append({"path": "/on_complete", "message": f"unknown handler {on_complete!r}"})

    exclusive_key = body.get("exclusive_key")
    if exclusive_key is not None and (why := exclusive_key_problem(exclusive_key)):
        errors.append({"path": "/exclusive_key", "message": why})
        exclusive_key = None

    after, after_policy = _after(body, errors)
    on_conflict = body.get("on_conflict")
    if on_conflict is not None and on_conflict not in ("reject", "queue"):
        errors.append({"path": "/on_conflict", "message": 'must be "reject" or "queue"'})
        on_conflict = None
    elif on_conflict is not None and body.get("exclusive_key") is None:
        errors.append({"path": "/on_conflict", "message": "needs an exclusive_key"})
    if on_conflict == "reject":
        on_conflict = None  # the default: digests of requests that did not say so match

    not_before = not_before_value(body.get("not_before"), errors)
    nb_priority = _priority(body, errors)
    max_concurrency = _opt_int(body, "max_concurrency", errors, minimum=1)
    max_attempts = _opt_int(body, "max_attempts", errors, minimum=1, maximum=1000)
    max_failures = _max_failures(body.get("max_failures"), "/max_failures", errors)
    max_items_cap = _opt_int(body, "max_items", errors, minimum=1)
    if max_items_cap is not None and isinstance(raw_items, list) and max_items_cap < len(raw_items):
        errors.append(
            {
                "path": "/max_items",
                "message": f"must be at least the number of items submitted ({len(raw_items)})",
            }
        )
    if errors:
        raise ValidationFailed(errors)
    return NewBatch(
        handler=str(handler),
        items=items,
        priority=nb_priority,
        max_concurrency=max_concurrency,
        max_attempts=max_attempts,
        max_failures=max_failures,
        metadata=metadata,
        idempotency_key=idem,
        on_complete=on_complete,
        exclusive_key=exclusive_key,
        after=after,
        after_policy=after_policy,
        on_conflict=on_conflict,
        not_before=not_before,
        max_items=max_items_cap,
        limit_keys=limit_keys,
    )


RUN_FIELDS = ("items", "metadata", "idempotency_key", "exclusive_key")


def run_submission(
    body: Any,
    *,
    pipeline: str,
    header_key: str | None,
    max_items: int,
    key_limit: tuple[str, tuple[str, ...]] | None = None,
) -> pipeline_runs.NewRun:
    """Validate a POST /v1/pipelines/{name}/runs body (the first stage's items and
    the run's fields), or raise with every error. ``key_limit``: the first stage's
    handler's key pointer and tokens (its items' limit keys are taken here)."""
    if not isinstance(body, dict):
        raise ValidationFailed([{"path": "", "message": "the body must be a JSON object"}])
    errors: list[dict[str, str]] = []
    _unknown(body, RUN_FIELDS, errors)
    limit_keys: list[str] | None = [] if key_limit is not None else None
    raw_items = body.get("items")
    items: list[tuple[str | None, str]] = []
    if not isinstance(raw_items, list) or not raw_items:
        errors.append(
            {"path": "/items", "message": "required: a non-empty array of the first stage's items"}
        )
    elif len(raw_items) > max_items:
        raise Problem(
            413,
            f"/items: {len(raw_items)} items exceed the limit of {max_items} "
            "per batch ([server] max_items_per_batch)",
        )
    else:
        items = item_entries(raw_items, errors, key_limit=key_limit, limit_keys=limit_keys)
    metadata = body.get("metadata", {})
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict):
        errors.append({"path": "/metadata", "message": "must be a JSON object"})
        metadata = {}
    elif "pipeline_run" in metadata:
        errors.append(
            {
                "path": "/metadata/pipeline_run",
                "message": "reserved: each stage's batch names its run there",
            }
        )
    else:
        storable_json(metadata, "/metadata", errors)
    idem = idempotency_key(body, header_key, errors)
    exclusive_key = body.get("exclusive_key")
    if exclusive_key is not None and (why := exclusive_key_problem(exclusive_key)):
        errors.append({"path": "/exclusive_key", "message": why})
        exclusive_key = None
    if errors:
        raise ValidationFailed(errors)
    return pipeline_runs.NewRun(
        pipeline=pipeline,
        items=items,
        metadata=metadata,
        idempotency_key=idem,
        exclusive_key=exclusive_key,
        limit_keys=limit_keys,
    )


def not_before_value(value: Any, errors: list[dict[str, str]]) -> datetime | None:
    """``not_before``: null, or an RFC 3339 timestamp with its offset, as a UTC
    datetime (microseconds, as PostgreSQL keeps it). A time in the past is
    accepted: it means now."""
    if value is None:
        return None
    m = _RFC3339.match(value) if isinstance(value, str) else None
    if m is not None:
        date, clock, fraction, offset = m.groups()
        micro = (fraction or ".")[1:7].ljust(6, "0")
        zone = "+00:00" if offset in ("Z", "z") else offset
        try:
            at = datetime.fromisoformat(f"{date}T{clock}.{micro}{zone}")
            return at.astimezone(UTC)
        except (ValueError, OverflowError):
            pass
    errors.append(
        {
            "path": "/not_before",
            "message": "must be null or an RFC 3339 timestamp with an offset, "
            "e.g. 2026-12-24T18:00:00Z",
        }
    )
    return None


def _after(
    body: dict[str, Any], errors: list[dict[str, str]]
) -> tuple[tuple[uuid.UUID, ...] | None, states.AfterPolicy | None]:
    """``after`` (distinct batch ids; whether they are the tenant's is the
    submission's check) and its ``after_policy``; both None without dependencies.
    Only existing batches can be named, so dependencies never form a cycle."""
    raw, policy = body.get("after"), body.get("after_policy")
    ids: list[uuid.UUID] = []
    if raw is not None:
        if not isinstance(raw, list) or len(raw) > AFTER_MAX:
            errors.append(
                {"path": "/after", "message": f"must be a list of at most {AFTER_MAX} batch ids"}
            )
        else:
            for i, v in enumerate(raw):
                bid = uuid_or_none(v)
                if bid is None:
                    errors.append({"path": f"/after/{i}", "message": "must be a batch id"})
                elif bid in ids:
                    errors.append({"path": f"/after/{i}", "message": f"duplicate batch id {bid}"})
                else:
                    ids.append(bid)
    if policy is not None and policy not in set(states.AfterPolicy):
        errors.append({"path": "/after_policy", "message": 'must be "completed" or "terminal"'})
        policy = None
    if not ids:
        return None, None
    return tuple(ids), states.AfterPolicy(policy or states.AfterPolicy.COMPLETED)


def uuid_or_none(v: Any) -> uuid.UUID | None:
    """A batch id given as a string, in its canonical or any uuid form."""
    if not isinstance(v, str) or len(v) > 64:
        return None
    try:
        return uuid.UUID(v)
    except ValueError:
        return None


def patch(body: Any) -> dict[str, Any]:
    """Validate a PATCH body; returns only the fields present."""
    if not isinstance(body, dict):
        raise ValidationFailed([{"path": "", "message": "the body must be a JSON object"}])
    errors: list[dict[str, str]] = []
    _unknown(body, PATCH_FIELDS, errors)
    if not any(k in body for k in PATCH_FIELDS):
        errors.append({"path": "", "message": f"give at least one of {', '.join(PATCH_FIELDS)}"})
    out: dict[str, Any] = {}
    if "priority" in body:
        out["priority"] = _priority(body, errors)
    if "max_concurrency" in body:
        out["max_concurrency"] = _opt_int(body, "max_concurrency", errors, minimum=1)
    if "max_failures" in body:
        out["max_failures"] = _max_failures(body["max_failures"], "/max_failures", errors)
    if "not_before" in body:
        out["not_before"] = not_before_value(body["not_before"], errors)
    if errors:
        raise ValidationFailed(errors)
    return out


def limit_param(value: str | None, default: int = 100, maximum: int = 500) -> int:
    if value is None:
        return default
    # Plain ASCII digits only: int() would also take " 5", "1_0" and Arabic-Indic digits.
    n = int(value) if re.fullmatch(r"[0-9]{1,6}", value) else -1
    if not 1 <= n <= maximum:
        raise ValidationFailed(
            [{"path": "limit", "message": f"must be an integer from 1 to {maximum}"}], 400
        )
    return n


def status_param(value: str | None, allowed: type[enum.StrEnum]) -> str | None:
    """A ``status`` filter: one of ``allowed``; empty means absent. An unknown
    status is a 400 (a typo must not look like "no such batches")."""
    if not value:
        return None
    if value not in allowed.__members__.values():
        names = ", ".join(allowed.__members__.values())
        raise ValidationFailed([{"path": "status", "message": f"must be one of {names}"}], 400)
    return value


def exclusive_key_param(value: str | None) -> str | None:
    """The ``exclusive_key`` listing filter; empty means absent. A value no batch
    could have been submitted with is a 400, like an unknown status."""
    if not value:
        return None
    why = exclusive_key_problem(value)
    if why:
        raise ValidationFailed([{"path": "exclusive_key", "message": why}], 400)
    return value


def text_param(name: str, value: str | None) -> str | None:
    """A free-text query filter; empty means absent, unstorable text is a 400."""
    if not value:
        return None
    why = _bad_text(value)
    if why:
        raise ValidationFailed([{"path": name, "message": why}], 400)
    return value


def statuses_param(value: str | None, allowed: type[enum.StrEnum]) -> list[str] | None:
    """A ``status`` filter of comma-separated statuses (an item matches any of
    them); empty means absent. Anything else is a 400 naming ``status``, like
    every bad query parameter."""
    if not value:
        return None
    names = list(allowed.__members__.values())
    wanted = value.split(",")
    if any(s not in names for s in wanted):
        raise ValidationFailed(
            [
                {
                    "path": "status",
                    "message": f"must be a comma-separated list of {', '.join(names)}",
                }
            ],
            400,
        )
    return sorted(set(wanted))


ERROR_TYPE_MAX = 1000
BULK_RETRY_MAX = 1000  # items one bulk retry names or moves at most


def _search_text(name: str, value: str, maximum: int) -> str:
    """A search filter's text: at most ``maximum`` characters PostgreSQL can
    store; anything else is a 400 naming ``name``."""
    why = _bad_text(value)
    if why is None and len(value) > maximum:
        why = f"must be at most {maximum} characters"
    if why:
        raise ValidationFailed([{"path": name, "message": why}], 400)
    return value


def _after_prefix(prefix: str) -> str:
    """A string after every key that starts with ``prefix`` and before every
    other key after it, in code point order (which is UTF-8's byte order,
    collation "C"): the prefix with its last code point incremented. A prefix of
    nothing but U+10FFFF has no such successor: then the prefix followed by more
    U+10FFFF than any key (KEY_MAX code points at most) can hold."""
    chars = list(prefix)
    while chars:
        last = ord(chars.pop())
        if last < 0x10FFFF:
            nxt = last + 1
            if 0xD800 <= nxt <= 0xDFFF:  # surrogates are not text: skip them
                nxt = 0xE000
            return "".join(chars) + chr(nxt)
    return prefix + "\U0010ffff" * (KEY_MAX + 1)


def key_range_param(key: str | None, key_prefix: str | None) -> tuple[str, str] | None:
    """The ``key`` (exact) or ``key_prefix`` item filter as a range of keys in
    byte order, ``[from, to)``; None when neither is given (empty means
    absent). Both at once is a 400 naming ``key_prefix``."""
    if key and key_prefix:
        raise ValidationFailed(
            [{"path": "key_prefix", "message": "give key (exact) or key_prefix, not both"}], 400
        )
    if key:
        # No key holds U+0000 (PostgreSQL cannot store it): [key, key + U+0001)
        # holds exactly the key itself.
        return _search_text("key", key, KEY_MAX), key + "\x01"
    if key_prefix:
        prefix = _search_text("key_prefix", key_prefix, KEY_MAX)
        return prefix, _after_prefix(prefix)
    return None


def error_type_param(value: str | None) -> str | None:
    """The ``error_type`` item filter (the type of an item's last error); empty
    means absent."""
    return _search_text("error_type", value, ERROR_TYPE_MAX) if value else None


def bulk_retry(body: Any) -> tuple[list[int] | None, str | None]:
    """A bulk retry's body: ``{"ids": [item ids]}`` or ``{"error_type": "..."}``
    (both: the named items of that type); every bad field is named (422)."""
    if not isinstance(body, dict):
        raise ValidationFailed(
            [{"path": "", "message": 'must be an object: {"ids": [...]} or {"error_type": "..."}'}]
        )
    errors: list[dict[str, str]] = [
        {"path": f"/{k}", "message": "unknown field (expected ids or error_type)"}
        for k in sorted(set(body) - {"ids", "error_type"})
    ]
    ids: list[int] | None = None
    raw_ids = body.get("ids")
    if "ids" in body:
        if not isinstance(raw_ids, list) or not 1 <= len(raw_ids) <= BULK_RETRY_MAX:
            errors.append(
                {"path": "/ids", "message": f"must be a list of 1 to {BULK_RETRY_MAX} item ids"}
            )
        else:
            ids = []
            for i, v in enumerate(raw_ids):
                # Item ids are strings in every response; numbers are taken too.
                text = str(v) if is_int(v) else v if isinstance(v, str) else ""
                if not re.fullmatch(r"[0-9]{1,18}", text):
                    errors.append({"path": f"/ids/{i}", "message": "must be an item id"})
                else:
                    ids.append(int(text))
    error_type: str | None = None
    raw_type = body.get("error_type")
    if "error_type" in body:
        why = None
        if not isinstance(raw_type, str) or not 1 <= len(raw_type) <= ERROR_TYPE_MAX:
            why = f"must be a string of 1 to {ERROR_TYPE_MAX} characters"
        else:
            why = _bad_text(raw_type)
        if why:
            errors.append({"path": "/error_type", "message": why})
        else:
            error_type = raw_type
    if not errors and "ids" not in body and "error_type" not in body:
        errors.append({"path": "", "message": "give ids, error_type or both"})
    if errors:
        raise ValidationFailed(errors[:50])
    return (sorted(set(ids)) if ids is not None else None), error_type


def after_param(value: str | None) -> int:
    """An ``after`` cursor: an item id (ASCII digits that fit a bigint); absent is 0.
    Anything else is a 400 naming ``after``."""
    if value is None:
        return 0
    if not re.fullmatch(r"[0-9]{1,18}", value):
        raise ValidationFailed([{"path": "after", "message": "must be an item id (digits)"}], 400)
    return int(value)


RESULT_MEDIA = {"jsonl": "application/x-ndjson", "csv": "text/csv"}
_Q = re.compile(r"(?:0(?:\.[0-9]{0,3})?|1(?:\.0{0,3})?)")


def _accept_q(accept: str, media: str) -> float:
    """The quality ``accept`` gives ``media``: that of its most specific matching
    range (RFC 9110 12.5.1), 0 when none matches; a malformed q counts as 0."""
    main = media.split("/")[0] + "/*"
    best, quality = -1, 0.0
    for part in accept.split(","):
        rng, *params = (p.strip().lower() for p in part.split(";"))
        rank = {media: 2, main: 1, "*/*": 0}.get(rng, -1)
        if rank <= best:
            continue
        q = 1.0
        for param in params:
            name, _, v = param.partition("=")
            if name.strip() == "q":
                v = v.strip()
                q = float(v) if _Q.fullmatch(v) else 0.0
        best, quality = rank, q
    return quality


def results_format(value: str | None, accept: str | None) -> str:
    """``jsonl`` or ``csv``: the ``format`` parameter when given (else a 400 naming
    it), else whichever the Accept header prefers; JSON Lines when it prefers
    neither, so a client that accepts anything, or names neither, still gets data."""
    if value is not None:
        if value not in RESULT_MEDIA:
            raise ValidationFailed(
                [{"path": "format", "message": f"must be one of {', '.join(RESULT_MEDIA)}"}],
                400,
            )
        return value
    if not accept:
        return "jsonl"
    jsonl, csv = (_accept_q(accept, RESULT_MEDIA[f]) for f in ("jsonl", "csv"))
    return "csv" if csv > jsonl else "jsonl"
