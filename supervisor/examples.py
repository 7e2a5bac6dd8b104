"""Example handlers used by the shipped ``config.toml`` and the quick start."""

from __future__ import annotations

import asyncio
from typing import Any

from supervisor import PermanentError
from supervisor.models import Item


async def echo(item: Item) -> Any:
    """Return the payload; sleeps ``payload["sleep"]`` seconds when given."""
    payload = item.payload
    if isinstance(payload, dict):
        if "sleep" in payload:
            await asyncio.sleep(float(payload["sleep"]))
        if payload.get("fail"):
            raise PermanentError(str(payload["fail"]))
    return {"echo": payload, "attempt": item.attempt}


async def noop(item: Item) -> None:
    """Does nothing: the benchmark handler."""
    return None


async def report(item: Item) -> dict[str, Any]:
    """A completion callback that records the batch summary it was given."""
    summary = item.payload.get("summary", {}) if isinstance(item.payload, dict) else {}
    return {"status": summary.get("status"), "counts": summary.get("counts")}
