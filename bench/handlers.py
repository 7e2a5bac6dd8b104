"""Handlers the benchmark's daemons load (``bench.handlers:...``)."""

from __future__ import annotations

import time
from typing import Any

import anyio

from supervisor.models import Item


async def stamp(item: Item) -> dict[str, Any]:
    """Record when the handler started (wall clock), for pick-up latency."""
    return {"t": time.time()}


async def hold(item: Item) -> None:
    """Stay running (the memory scenario keeps 64 items in flight this way)."""
    await anyio.sleep(3600)


async def sleep(item: Item) -> None:
    """Wait ``payload["s"]`` seconds without using CPU: an I/O-bound job."""
    await anyio.sleep(float(item.payload["s"]))
