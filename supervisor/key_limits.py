"""Keyed limits: the key an item is limited by, taken from its payload.

A handler's ``key_limit`` partitions its limits by a key (a domain, an API key):
at most ``concurrency`` running and ``rate_limit`` starts per key, across every
daemon. The key is computed here once, at submission, and stored on the item
(``items.limit_key``), so the claim (``claim_keyed_items``) compares an indexed
column instead of parsing every payload it looks at.

The key is the value at a JSON Pointer (RFC 6901) into the payload: a string is
the key itself, an integer or a boolean its JSON text (``42``, ``true``); a
payload without that value (or with ``null`` there) gets the key ``""``, which
all such items share, so they are limited together rather than not at all. Any
other value (a float, an object, an array) or a string longer than
KEY_MAX characters is refused at submission (422).

A key's budget counts cost units instead of starts: an item's cost is the number
at the budget's ``cost`` pointer (1 without one), checked here at submission
(422 for anything but a number >= 0) and read again from the payload by the claim.
"""

from __future__ import annotations

import json
import math
from typing import Any

KEY_MAX = 1000
MISSING = ""  # the key of an item whose payload lacks the pointer's value


def parse_pointer(pointer: str) -> tuple[str, ...]:
    """A JSON Pointer's reference tokens ("/a/b~1c" -> ("a", "b/c")); ValueError
    for text that is not a pointer or for the whole document ("")."""
    if not pointer.startswith("/"):
        raise ValueError(f"{pointer!r} is not a JSON Pointer into the payload, like '/domain'")
    tokens = []
    for raw in pointer[1:].split("/"):
        if "~" in raw.replace("~0", "").replace("~1", ""):
            raise ValueError(f"{pointer!r}: '~' must be followed by 0 or 1 (RFC 6901)")
        tokens.append(raw.replace("~1", "/").replace("~0", "~"))
    return tuple(tokens)


def _value_at(payload: Any, tokens: tuple[str, ...]) -> Any:
    """The value at a pointer's tokens, or None where the payload has none."""
    value = payload
    for token in tokens:
        if isinstance(value, dict):
            if token not in value:
                return None
            value = value[token]
        elif isinstance(value, list):
            if not token.isdigit() or (token != "0" and token.startswith("0")):
                return None
            index = int(token)
            if index >= len(value):
                return None
            value = value[index]
        else:
            return None
    return value


def cost_of(payload: Any, tokens: tuple[str, ...]) -> float:
    """An item's cost under its key's budget: the number at the cost pointer, 1
    without one (missing or null); ValueError (the reason) for anything else."""
    value = _value_at(payload, tokens)
    if value is None:
        return 1.0
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"the cost must be a number >= 0, not {type(value).__name__}")
    if not 0 <= value < math.inf:
        raise ValueError(f"the cost must be a number >= 0, not {value!r}")
    return float(value)


def key_of(payload: Any, tokens: tuple[str, ...]) -> str:
    """The limit key of one payload; ValueError (the reason) for a value that
    cannot be a key."""
    value = _value_at(payload, tokens)
    if value is None:
        return MISSING
    if isinstance(value, str):
        if len(value) > KEY_MAX:
            raise ValueError(f"the limit key is longer than {KEY_MAX} characters")
        return value
    if isinstance(value, bool | int):
        return json.dumps(value)
    kind = {dict: "an object", list: "an array", float: "a fractional number"}.get(
        type(value), type(value).__name__
    )
    raise ValueError(f"the limit key must be a string, an integer or a boolean, not {kind}")
