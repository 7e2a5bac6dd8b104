"""``type = "http"``: placeholder replaced by the full implementation."""

from __future__ import annotations

from typing import Any

from supervisor.config import HandlerConfig
from supervisor.errors import HandlerLoadError
from supervisor.models import Item


class HttpHandler:
    def __init__(self, hcfg: HandlerConfig) -> None:
        self.config = hcfg
        raise HandlerLoadError(f"handler {hcfg.name!r}: type \"http\" is not implemented yet")

    async def run(self, item: Item) -> Any:
        raise NotImplementedError

    async def aclose(self) -> None:
        return None
