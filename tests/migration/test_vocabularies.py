"""The Python vocabularies are the database's: every status enum in
supervisor/states.py names exactly the values its CHECK constraint allows, so a
value added on one side only fails here, not as a constraint violation in an
outcome write."""

from __future__ import annotations

import asyncio
import enum
import re

import asyncpg
import pytest

from supervisor import states

CONSTRAINTS: dict[str, type[enum.StrEnum]] = {
    "batch_status_known": states.BatchStatus,
    "item_status_known": states.ItemStatus,
    "batch_callback_state_known": states.CallbackState,
    "pipeline_run_status_known": states.RunStatus,
    "pipeline_run_on_stage_failure_known": states.StageFailure,
}


async def _checks(dsn: str) -> dict[str, str]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT conname, pg_get_constraintdef(oid) AS def FROM pg_constraint "
            "WHERE conname = ANY($1::text[])",
            list(CONSTRAINTS),
        )
    finally:
        await conn.close()
    return {r["conname"]: r["def"] for r in rows}


@pytest.mark.parametrize("name", sorted(CONSTRAINTS))
def test_each_status_enum_matches_its_check_constraint(db_url: str, name: str) -> None:
    definition = asyncio.run(_checks(db_url))[name]
    allowed = set(re.findall(r"'([a-z_]+)'::text", definition))
    assert allowed, definition
    assert {v.value for v in CONSTRAINTS[name]} == allowed, definition


async def _indexdef(dsn: str, name: str) -> str:
    conn = await asyncpg.connect(dsn)
    try:
        definition: str = await conn.fetchval(
            "SELECT indexdef FROM pg_indexes WHERE schemaname = 'supervisor' AND indexname = $1",
            name,
        )
    finally:
        await conn.close()
    return definition


def test_the_exclusive_key_index_releases_exactly_the_terminal_statuses(db_url: str) -> None:
    """A key is held while its batch is in any status but a terminal one or
    waiting (a waiting batch checks the key when released): a status terminal in
    states.py but missing here would hold the key forever."""
    definition = asyncio.run(_indexdef(db_url, "batches_exclusive"))
    assert definition.startswith("CREATE UNIQUE INDEX"), definition
    assert "(tenant, exclusive_key) WHERE" in definition, definition
    assert "<> ALL" in definition, definition  # NOT IN: every other status holds the key
    released = set(re.findall(r"'([a-z_]+)'::text", definition))
    waiting = states.BatchStatus.WAITING.value
    assert released == {s.value for s in states.BATCH_TERMINAL} | {waiting}, definition
