"""The API's connection cap fits the open-file limit (supervisor.api.server.connection_cap)."""

from __future__ import annotations

import resource

import pytest

from supervisor import config
from supervisor.api import server


def limits(monkeypatch: pytest.MonkeyPatch, soft: int, hard: int) -> list[tuple[int, int]]:
    calls: list[tuple[int, int]] = []
    monkeypatch.setattr(resource, "getrlimit", lambda _: (soft, hard))
    monkeypatch.setattr(resource, "setrlimit", lambda _, v: calls.append(v))
    return calls


def cfg(**server: object) -> config.Config:
    return config.from_mapping({"server": server, "worker": {"concurrency": 16}})


def test_the_cap_leaves_room_for_pools_and_exec_pipes(monkeypatch: pytest.MonkeyPatch) -> None:
    limits(monkeypatch, 400, 400)
    # 400 files - 64 headroom - 10 + 5 pool connections - 3 pipes x 16 workers
    assert server.connection_cap(cfg()) == (273, 400)


def test_the_soft_limit_is_raised_to_the_hard_one(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = limits(monkeypatch, 1024, 65536)
    assert server.connection_cap(cfg()) == (1000, 65536)
    assert calls == [(65536, 65536)]
    limits(monkeypatch, 65536, 65536)
    assert server.connection_cap(cfg(max_connections=50)) == (50, 65536)
