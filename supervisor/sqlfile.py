"""Loads the SQL shipped in the package: named queries, numbered migrations and
the transition functions.

Migrations (``sql/migrations/NNNN_name.sql``) change tables, indexes and data, and
are applied once each. Functions (``sql/functions/<name>.sql``, one
``CREATE OR REPLACE FUNCTION`` per file) have one current definition, which
``migrate`` applies after the migrations every time: a fix is an edit of that
file, not a copy in a new migration. See ``sql/functions/README.md`` for the
rules (signature changes, the pinned digest).

Schema names are configurable, so the files say ``@schema`` (replaced by the
quoted identifier) and ``@sname`` (the bare, validated name, used in channel and
lock names). Nothing else is ever interpolated into SQL.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from importlib import resources
from importlib.resources.abc import Traversable

_NAME = re.compile(r"^--\s*name:\s*(\w+)\s*$")
_MIGRATION = re.compile(r"^(\d{4})_(\w+)\.sql$")
_SCHEMA = re.compile(r"^[a-z_][a-z0-9_]{0,40}$")


def render(sql: str, schema: str) -> str:
    if not _SCHEMA.match(schema):
        raise ValueError(f"invalid schema name {schema!r}")
    return sql.replace("@sname", schema).replace("@schema", f'"{schema}"')


def _read(name: str) -> str:
    return resources.files("supervisor").joinpath("sql", name).read_text(encoding="utf-8")


def parse_queries(text: str) -> dict[str, str]:
    """Split a file of ``-- name: x`` blocks into {name: sql}."""
    queries: dict[str, str] = {}
    current: str | None = None
    lines: list[str] = []
    for line in text.splitlines():
        m = _NAME.match(line)
        if m:
            if current is not None:
                queries[current] = "\n".join(lines).strip()
            current, lines = m.group(1), []
            if current in queries:
                raise ValueError(f"duplicate query name {current!r}")
        elif current is not None and not (line.startswith("--") and not lines):
            lines.append(line)
    if current is not None:
        queries[current] = "\n".join(lines).strip()
    return queries


def load_queries(schema: str) -> dict[str, str]:
    return {k: render(v, schema) for k, v in parse_queries(_read("queries.sql")).items()}


@dataclasses.dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def has_statements(self) -> bool:
        """False for a comment-only migration (a function body change is one:
        the body itself lives in sql/functions/); PostgreSQL rejects an empty query."""
        return any(
            line.strip() and not line.lstrip().startswith("--") for line in self.sql.splitlines()
        )


@dataclasses.dataclass(frozen=True)
class Function:
    name: str
    sql: str


def _function_files() -> list[Traversable]:
    """The files of sql/functions/, one function each, in name order."""
    folder = resources.files("supervisor").joinpath("sql", "functions")
    return sorted((e for e in folder.iterdir() if e.name.endswith(".sql")), key=lambda e: e.name)


def load_functions(schema: str) -> list[Function]:
    """Every transition function's current definition, in name order."""
    return [
        Function(entry.name.removesuffix(".sql"), render(entry.read_text("utf-8"), schema))
        for entry in _function_files()
    ]


def functions_digest() -> str:
    """SHA-256 over the function files as shipped (before rendering), pinned in
    ``sql/functions/DIGEST`` with the migration version it belongs to."""
    h = hashlib.sha256()
    for entry in _function_files():
        h.update(entry.name.encode() + b"\0" + entry.read_bytes() + b"\0")
    return h.hexdigest()


def load_migrations(schema: str) -> list[Migration]:
    out = []
    for entry in resources.files("supervisor").joinpath("sql", "migrations").iterdir():
        m = _MIGRATION.match(entry.name)
        if m:
            out.append(
                Migration(int(m.group(1)), m.group(2), render(entry.read_text("utf-8"), schema))
            )
    return sorted(out, key=lambda mig: mig.version)
