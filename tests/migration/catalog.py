"""A database schema as comparable text: what "a fresh install and an upgraded one
are identical" means, read from PostgreSQL's catalogs."""

from __future__ import annotations

import asyncpg

_QUERIES = {
    "columns": """
        SELECT c.relname || '.' || a.attname || ' ' || format_type(a.atttypid, a.atttypmod)
               || CASE WHEN a.attnotnull THEN ' NOT NULL' ELSE '' END
               || coalesce(' DEFAULT ' || pg_get_expr(d.adbin, d.adrelid), '')
          FROM pg_attribute a
          JOIN pg_class c ON c.oid = a.attrelid
          JOIN pg_namespace n ON n.oid = c.relnamespace
          LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
         WHERE n.nspname = $1 AND c.relkind IN ('r', 'p', 'v') AND a.attnum > 0
           AND NOT a.attisdropped""",
    "constraints": """
        SELECT conrelid::regclass::text || ' ' || conname || ' ' || pg_get_constraintdef(c.oid)
          FROM pg_constraint c JOIN pg_namespace n ON n.oid = c.connamespace
         WHERE n.nspname = $1""",
    "indexes": "SELECT indexdef FROM pg_indexes WHERE schemaname = $1",
    "functions": """
        SELECT pg_get_functiondef(p.oid)
          FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
         WHERE n.nspname = $1""",
    "triggers": """
        SELECT pg_get_triggerdef(t.oid)
          FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
          JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname = $1 AND NOT t.tgisinternal""",
    "sequences": """
        SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname = $1 AND c.relkind = 'S'""",
}


async def describe(dsn: str, schema: str = "supervisor") -> dict[str, list[str]]:
    """Every column, constraint, index, function, trigger and sequence of ``schema``,
    sorted, plus the migration versions recorded."""
    conn = await asyncpg.connect(dsn)
    try:
        out = {
            kind: sorted(r[0] for r in await conn.fetch(sql, schema))
            for kind, sql in _QUERIES.items()
        }
        rows = await conn.fetch(f'SELECT version, name FROM "{schema}".schema_migrations')
        out["migrations"] = sorted(f"{r['version']} {r['name']}" for r in rows)
        return out
    finally:
        await conn.close()
