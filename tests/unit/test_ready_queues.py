"""Claimed items waiting for a worker (supervisor.ready.ReadyQueues): handlers take
turns, a handler at its cap is skipped, and drops keep the rest in order."""

from __future__ import annotations

from supervisor.models import Item
from supervisor.ready import ReadyQueues


def item(n: int, handler: str, batch: str = "b") -> Item:
    return Item(str(n), batch, None, n, 1, 3, handler, {})


def test_handlers_take_turns_in_fifo_order() -> None:
    q = ReadyQueues(["a", "b"], {})
    for n in (1, 2, 3):
        q.put(item(n, "a"))
    q.put(item(4, "b"))
    taken = [q.take({}) for _ in range(4)]
    assert [t.id for t in taken if t] == ["1", "4", "2", "3"]
    assert q.take({}) is None and len(q) == 0


def test_a_handler_at_its_cap_is_skipped_until_it_has_room() -> None:
    q = ReadyQueues(["a", "b"], {"a": 1})
    q.put(item(1, "a"))
    q.put(item(2, "b"))
    first = q.take({"a": 1})  # one attempt of "a" runs already: its cap is reached
    assert first is not None and first.handler == "b"
    assert q.take({"a": 1}) is None and q.waiting("a") == 1
    again = q.take({"a": 0})
    assert again is not None and again.id == "1"


def test_drop_takes_what_it_selects_and_keeps_the_rest_in_order() -> None:
    q = ReadyQueues(["a"], {})
    for n, batch in ((1, "x"), (2, "y"), (3, "x"), (4, "y")):
        q.put(item(n, "a", batch))
    dropped = q.drop(lambda it: it.batch_id == "x")
    assert [d.id for d in dropped] == ["1", "3"]
    assert len(q) == 2 and q.ids() == {2, 4}
    rest = [q.take({}), q.take({})]
    assert [r.id for r in rest if r] == ["2", "4"]
