"""Progress reports: argument checks, the exec control-line protocol, and the
in-memory side of the progress writer (no database needed)."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest

from supervisor import progress
from supervisor.handlers.exec import STDOUT_LIMIT, _Stdout
from supervisor.models import Item, Progress


class Recorder:
    """Stands in for the dispatcher: records what an attempt asked for."""

    def __init__(self) -> None:
        self.reports: list[Progress] = []
        self.extends: list[float] = []
        self.added: list[Any] = []

    def report_progress(self, item: Item, p: Progress) -> None:
        self.reports.append(p)

    def extend(self, item: Item, seconds: float) -> float:
        self.extends.append(seconds)
        return seconds

    def add_items(self, item: Item, entries: Any) -> int:
        self.added.extend(entries)
        return len(entries)


def item(controls: Any = None) -> Item:
    return Item("1", "b", None, {}, 1, 3, "h", {}, controls=controls)


def test_progress_arguments_are_checked_and_named() -> None:
    rec = Recorder()
    it = item(rec)
    it.progress(3, 10, note="page 3")
    it.progress(0.5)
    assert rec.reports == [Progress(3, 10, "page 3"), Progress(0.5, None, None)]
    cases: list[tuple[tuple[Any, Any], str]] = [
        (("3", 10), "progress done must be a number, not str"),
        ((True, 10), "progress done must be a number, not bool"),
        ((-1, 10), "progress done must be a finite number >= 0"),
        ((1, float("nan")), "progress total must be a finite number >= 0"),
        ((10**400, None), "progress done must be a finite number >= 0"),
    ]
    for bad, message in cases:
        with pytest.raises((TypeError, ValueError), match=message):
            it.progress(*bad)
    with pytest.raises(TypeError, match="progress note must be a str or None, not int"):
        it.progress(1, 2, note=5)  # type: ignore[arg-type]
    it.progress(1, 2, note="x" * 1000)
    assert rec.reports[-1].note == "x" * 200  # long notes are cut


def test_progress_is_awaitable_and_a_no_op_outside_a_daemon() -> None:
    it = item()
    gen = it.progress(1, 2).__await__()
    with pytest.raises(StopIteration):
        next(gen)  # already done: `await` returns at once
    assert it.extend(5) == 5.0
    with pytest.raises(ValueError, match="extend seconds must be a finite number >= 0"):
        it.extend(float("inf"))


def feed(chunks: list[bytes]) -> tuple[bytes, Recorder]:
    rec = Recorder()
    out = _Stdout(item(rec))
    for c in chunks:
        out._take(c)
    out.data += out._line  # what drain() does at EOF
    return bytes(out.data), rec


def test_exec_control_lines_are_acted_on_and_left_out_of_the_result() -> None:
    text = (
        b'::bsv-progress {"done": 1, "total": 4, "note": "one"}\n'
        b"line one ::bsv-progress {} stays (not at a line start)\n"
        b"::bsv-extend 60\n"
        b'::bsv-add-items [{"key": "a", "payload": 1}, 2]\n'
        b'::bsv-add-items {"not": "an array"}\n'
        b":: not ours\n"
        b"::bsv-progress not json\n"
        b'{"ok": true}'
    )
    for size in (len(text), 1, 3, 7):  # however the pipe splits it
        chunks = [text[i : i + size] for i in range(0, len(text), size)]
        data, rec = feed(chunks)
        assert data == (
            b'line one ::bsv-progress {} stays (not at a line start)\n:: not ours\n{"ok": true}'
        ), size
        assert rec.reports == [Progress(1, 4, "one")] and rec.extends == [60.0]
        assert rec.added == [{"key": "a", "payload": 1}, 2]


def test_exec_a_control_line_without_newline_at_eof_or_too_long_is_output() -> None:
    data, rec = feed([b"x\n::bsv-extend 5"])
    assert data == b"x\n::bsv-extend 5" and rec.extends == []
    long = b"::bsv-progress " + b" " * 70_000 + b"\n"
    data, rec = feed([long])
    assert data == long and rec.reports == []
    assert STDOUT_LIMIT > len(long)


def test_reports_keep_the_latest_per_attempt_and_escape_the_note() -> None:
    r = progress.Reports(None, uuid.uuid4())  # type: ignore[arg-type]  # no flush here
    r.report(7, 1, "h", Progress(1, 10, "a"))
    r.report(7, 1, "h", Progress(2, 10, "nul \x00 here"))
    ((attempt, text),) = r._pending.values()
    stored = json.loads(text)
    assert attempt == 1 and stored["done"] == 2 and stored["note"] == "nul \\u0000 here"
    assert stored["attempt"] == 1 and stored["reported_at"].endswith("Z")
    assert set(r.stalled_s()) == {"h"}
    r.ended(7)
    assert r.stalled_s() == {}
