"""Migrations: applied once under a lock, idempotent, and a newer schema is refused."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import pathlib
import subprocess
import sys

import asyncpg

from supervisor import sqlfile
from tests.daemon import ROOT, render_toml


def cli(args: list[str], url: str, cfg: pathlib.Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "BATCH_SUPERVISOR_DATABASE_URL": url}
    return subprocess.run(
        [sys.executable, "-m", "supervisor", *args, "--config", str(cfg)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def config(tmp_path: pathlib.Path) -> pathlib.Path:
    cfg = tmp_path / "config.toml"
    cfg.write_text(
        render_toml(
            {
                "server": {"host": "127.0.0.1", "port": 1},
                "handlers": {"echo": {"type": "python", "target": "tests.handlers:echo"}},
            }
        )
    )
    return cfg


def test_concurrent_migrations_apply_once_then_nothing(
    fresh_db_url: str, tmp_path: pathlib.Path
) -> None:
    cfg = config(tmp_path)
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        outs = list(pool.map(lambda _: cli(["migrate"], fresh_db_url, cfg), range(3)))
    assert all(o.returncode == 0 for o in outs), [o.stderr for o in outs]
    every = ", ".join(str(m.version) for m in sqlfile.load_migrations("supervisor"))
    assert sum(f"(applied {every})" in o.stdout for o in outs) == 1, [o.stdout for o in outs]
    again = cli(["migrate"], fresh_db_url, cfg)
    assert again.returncode == 0 and "already current" in again.stdout


def test_newer_schema_is_refused_with_a_clear_message(db_url: str, tmp_path: pathlib.Path) -> None:
    async def bump() -> None:
        conn = await asyncpg.connect(db_url)
        try:
            await conn.execute(
                "INSERT INTO supervisor.schema_migrations (version, name) "
                "VALUES (999, 'from_the_future')"
            )
        finally:
            await conn.close()

    asyncio.run(bump())
    cfg = config(tmp_path)
    for verb in ("migrate", "run"):
        out = cli([verb], db_url, cfg)
        assert out.returncode == 78, (verb, out.stdout, out.stderr)
        assert "is at version 999" in out.stderr and "only knows versions up to" in out.stderr
