"""All SQL lives in supervisor/sql; every named query is used; transitions table is sane."""

from __future__ import annotations

import pathlib
import re

from supervisor import sqlfile, states

PKG = pathlib.Path(__file__).resolve().parents[2] / "supervisor"


def test_every_named_query_is_used_by_the_code() -> None:
    names = set(sqlfile.parse_queries((PKG / "sql" / "queries.sql").read_text()))
    code = "\n".join(p.read_text() for p in PKG.rglob("*.py"))
    unused = sorted(n for n in names if f'"{n}"' not in code)
    assert not unused, f"named queries nobody runs: {unused}"


def test_named_queries_are_run_only_by_the_typed_layer() -> None:
    """supervisor/store.py is the one caller of the named queries (db.py runs the
    migration ledger's own): everything else goes through its typed methods."""
    names = set(sqlfile.parse_queries((PKG / "sql" / "queries.sql").read_text()))
    call = re.compile(r"\.(?:fetch|fetchrow|fetchval|execute)\(\s*\"(\w+)\"")
    offenders = [
        f"{path.relative_to(PKG)}: {name}"
        for path in PKG.rglob("*.py")
        if path.name not in ("store.py", "db.py")
        for name in call.findall(path.read_text())
        if name in names
    ]
    assert not offenders, offenders


def test_no_sql_strings_outside_the_sql_directory() -> None:
    pattern = re.compile(r"\b(SELECT|INSERT INTO|UPDATE|DELETE FROM)\b\s+[\w*]", re.I)
    offenders = []
    for path in PKG.rglob("*.py"):
        if path.name in ("embedded.py", "embedded_auth.py"):
            continue  # bootstrap the server, its roles and passwords; no application SQL
        for i, line in enumerate(path.read_text().splitlines(), 1):
            stripped = line.strip()
            if stripped.startswith("#") or '"""' in stripped:
                continue
            if pattern.search(line) and ('"' in line or "'" in line):
                offenders.append(f"{path.name}:{i}: {stripped}")
    assert not offenders, offenders


def test_schema_token_rendering_is_safe() -> None:
    assert sqlfile.render("@schema.items @sname_wake", "jobs") == '"jobs".items jobs_wake'
    for bad in ("a;b", "A", "x y", ""):
        try:
            sqlfile.render("@schema", bad)
        except ValueError:
            continue
        raise AssertionError(f"accepted schema name {bad!r}")


def test_migrations_are_numbered_and_contiguous() -> None:
    versions = [m.version for m in sqlfile.load_migrations("supervisor")]
    assert versions == list(range(1, len(versions) + 1))


def test_transition_table_matches_the_spec() -> None:
    t = states.item_transition_allowed
    S = states.ItemStatus
    assert t(S.QUEUED, S.RUNNING) and t(S.QUEUED, S.CANCELLED)
    assert t(S.RUNNING, S.QUEUED) and t(S.RUNNING, S.SUCCEEDED) and t(S.RUNNING, S.FAILED)
    assert t(S.SUCCEEDED, S.QUEUED)  # only by an item retry (a rerun)
    assert not t(S.QUEUED, S.SUCCEEDED) and not t(S.SUCCEEDED, S.FAILED)


def test_function_bodies_change_only_with_the_schema_version() -> None:
    """Daemons re-apply their function bodies at start, so one schema version must
    mean one set of bodies (see supervisor/sql/functions/README.md)."""
    latest = sqlfile.load_migrations("supervisor")[-1].version
    pinned = (PKG / "sql" / "functions" / "DIGEST").read_text().strip()
    expected = f"{latest} {sqlfile.functions_digest()}"
    assert pinned == expected, (
        "supervisor/sql/functions changed: add a migration for the change (a comment-only "
        f"file is fine) and write this line to supervisor/sql/functions/DIGEST: {expected}"
    )


def test_every_function_file_defines_the_function_it_is_named_after() -> None:
    for fn in sqlfile.load_functions("supervisor"):
        heads = re.findall(r'^CREATE OR REPLACE FUNCTION "supervisor"\.(\w+)\(', fn.sql, re.M)
        assert heads == [fn.name], (fn.name, heads)


def test_only_the_status_rule_writes_a_batch_status() -> None:
    """_settle_batches (and repair_batch, by the same _batch_status rule) is the one writer
    of batches.status; a control sets its input (stop_reason, paused) instead."""
    sql = PKG / "sql"
    offenders = []
    for path in [*sorted((sql / "functions").glob("*.sql")), sql / "queries.sql"]:
        for update in path.read_text().split("UPDATE @schema.batches")[1:]:
            set_clause = re.split(r"\bWHERE\b", update, maxsplit=1)[0]
            if re.search(r"\bstatus\s*=", set_clause) and path.name not in (
                "_settle_batches.sql",
                "repair_batch.sql",
            ):
                offenders.append(f"{path.name}: UPDATE batches{set_clause.strip()[:60]}")
    assert not offenders, offenders
