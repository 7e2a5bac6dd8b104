"""Slot arithmetic of schedules: next slots in a time zone across DST changes,
which due slots fire and which count as missed, and the configuration checks."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from supervisor import config, schedules
from supervisor.errors import ConfigError

ZURICH = ZoneInfo("Europe/Zurich")
HANDLERS = {"echo": {"type": "python", "target": "supervisor.examples:echo"}}


def sched(cron: str, tz: str = "UTC", **kw: Any) -> config.ScheduleConfig:
    return config.ScheduleConfig(name="s", cron=cron, timezone=tz, handler="echo", **kw)


def local(*args: int) -> datetime:
    y, mo, d, h, mi = args
    return datetime(y, mo, d, h, mi, tzinfo=ZURICH)


def slots(s: config.ScheduleConfig, start: datetime, n: int) -> list[datetime]:
    out: list[datetime] = []
    t = start
    for _ in range(n):
        nxt = schedules.next_slot(s, t)
        assert nxt is not None
        out.append(nxt)
        t = nxt
    return out


def test_a_nightly_slot_is_at_the_local_time_on_both_sides_of_a_dst_change() -> None:
    s = sched("0 2 * * *", "Europe/Zurich")
    got = slots(s, local(2026, 10, 23, 12, 0), 4)
    # Summer time ends at 03:00 CEST on 25 October 2026: 02:00 that night is
    # still +02:00, the next night's is +01:00, so that day is 25 hours long.
    assert [t.astimezone(ZURICH).hour for t in got] == [2, 2, 2, 2]
    assert got[:3] == [
        datetime(2026, 10, 24, 0, 0, tzinfo=UTC),
        datetime(2026, 10, 25, 0, 0, tzinfo=UTC),
        datetime(2026, 10, 26, 1, 0, tzinfo=UTC),
    ]
    assert got[2] - got[1] == timedelta(hours=25)


def test_a_slot_in_the_skipped_spring_hour_fires_once_right_after_it() -> None:
    # 29 March 2026: 02:00 CET jumps to 03:00 CEST; 02:30 does not exist that
    # night, and it fires at 03:00 instead (as Debian's cron does), once.
    s = sched("30 2 * * *", "Europe/Zurich")
    got = slots(s, local(2026, 3, 28, 12, 0), 3)
    assert got == [
        datetime(2026, 3, 29, 1, 0, tzinfo=UTC),  # 03:00 CEST
        datetime(2026, 3, 30, 0, 30, tzinfo=UTC),  # 02:30 CEST
        datetime(2026, 3, 31, 0, 30, tzinfo=UTC),
    ]


def test_a_slot_in_the_repeated_autumn_hour_fires_once() -> None:
    # 25 October 2026: 02:30 happens twice (CEST, then CET); the job runs once.
    s = sched("30 2 * * *", "Europe/Zurich")
    got = slots(s, local(2026, 10, 24, 12, 0), 2)
    assert got[0].astimezone(ZURICH).replace(tzinfo=None) == datetime(2026, 10, 25, 2, 30)
    assert got[1].astimezone(ZURICH).replace(tzinfo=None) == datetime(2026, 10, 26, 2, 30)


def test_an_hourly_slot_counts_real_hours_through_the_repeated_hour() -> None:
    s = sched("0 * * * *", "Europe/Zurich")
    got = slots(s, datetime(2026, 10, 24, 23, 30, tzinfo=UTC), 4)
    assert [g - got[0] for g in got] == [timedelta(hours=h) for h in range(4)]


def test_the_latest_slot_at_or_before_includes_the_instant_itself() -> None:
    s = sched("*/5 * * * *")
    t = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
    assert schedules.slot_at_or_before(s, t) == t
    assert schedules.slot_at_or_before(s, t + timedelta(microseconds=1)) == t
    assert schedules.slot_at_or_before(s, t - timedelta(microseconds=1)) == t - timedelta(minutes=5)
    zurich = sched("30 2 * * *", "Europe/Zurich")
    spring = datetime(2026, 3, 29, 1, 0, tzinfo=UTC)  # the 03:00 that stands in for 02:30
    assert schedules.slot_at_or_before(zurich, spring + timedelta(hours=1)) == spring


def test_seconds_field_fires_every_second() -> None:
    s = sched("* * * * * *")
    t = datetime(2026, 1, 1, 12, 0, 0, 300000, tzinfo=UTC)
    assert slots(s, t, 2) == [
        datetime(2026, 1, 1, 12, 0, 1, tzinfo=UTC),
        datetime(2026, 1, 1, 12, 0, 2, tzinfo=UTC),
    ]


T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def test_the_slot_just_passed_fires_as_scheduled() -> None:
    s = sched("* * * * *")
    due = schedules.due_slots(s, cursor=T0, now=T0 + timedelta(minutes=1, seconds=2))
    assert due == [schedules.Due(T0 + timedelta(minutes=1), "scheduled")]
    assert schedules.due_slots(s, cursor=T0, now=T0 + timedelta(seconds=59)) == []


def test_after_an_outage_latest_fires_the_newest_missed_slot_once_skip_records_it() -> None:
    now = T0 + timedelta(minutes=10, seconds=5)  # slots 12:01 .. 12:10 passed
    latest = schedules.due_slots(sched("* * * * *", catch_up="latest"), cursor=T0, now=now)
    assert latest == [
        schedules.Due(T0 + timedelta(minutes=9), "catch_up"),
        schedules.Due(T0 + timedelta(minutes=10), "scheduled"),
    ]
    skip = schedules.due_slots(sched("* * * * *", catch_up="skip"), cursor=T0, now=now)
    assert skip == [
        schedules.Due(T0 + timedelta(minutes=9), "missed"),
        schedules.Due(T0 + timedelta(minutes=10), "scheduled"),
    ]


def test_a_slot_older_than_grace_is_missed_not_fired_late() -> None:
    # A nightly job whose daemons came back at 09:00: 02:00 is not run at 09:00
    # as if on time; catch_up decides.
    s = sched("0 2 * * *", catch_up="skip", grace_s=60.0)
    cursor = datetime(2026, 1, 1, 2, 0, tzinfo=UTC)
    now = datetime(2026, 1, 2, 9, 0, tzinfo=UTC)
    assert schedules.due_slots(s, cursor=cursor, now=now) == [
        schedules.Due(datetime(2026, 1, 2, 2, 0, tzinfo=UTC), "missed")
    ]
    late = sched("0 2 * * *", catch_up="latest", grace_s=60.0)
    assert schedules.due_slots(late, cursor=cursor, now=now) == [
        schedules.Due(datetime(2026, 1, 2, 2, 0, tzinfo=UTC), "catch_up")
    ]
    within = datetime(2026, 1, 2, 2, 0, 30, tzinfo=UTC)
    assert schedules.due_slots(s, cursor=cursor, now=within) == [
        schedules.Due(datetime(2026, 1, 2, 2, 0, tzinfo=UTC), "scheduled")
    ]


def problems(raw: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        config.from_mapping({"handlers": HANDLERS, **raw})
    return exc.value.problems


def test_schedule_configuration_problems_name_their_key() -> None:
    got = problems(
        {
            "schedules": {
                "a": {"cron": "61 * * * *", "handler": "echo", "items": [1]},
                "b": {"cron": "0 2 * * *", "timezone": "Mars/Olympus", "handler": "echo"},
                "c": {"cron": "0 2 * * *", "handler": "ecko", "items": [1], "overlap": "wait"},
                "d": {"cron": "0 2 * * *", "handler": "echo", "items": [1], "catchup": "x"},
            }
        }
    )
    text = "\n".join(got)
    assert "schedules.a.cron: '61 * * * *' is not a cron expression" in text
    assert "schedules.b.timezone: unknown time zone 'Mars/Olympus'" in text
    assert "schedules.b: exactly one of items" in text
    assert "schedules.c.handler: no handler 'ecko' (did you mean 'echo'?)" in text
    assert "schedules.c.overlap: must be one of skip, queue, cancel" in text
    assert "schedules.d.catchup: unknown key (did you mean 'catch_up'?)" in text


def test_static_items_are_validated_as_the_api_would_before_the_daemon_starts() -> None:
    cfg = config.from_mapping(
        {
            "handlers": HANDLERS,
            "schedules": {
                "n": {
                    "cron": "0 2 * * *",
                    "handler": "echo",
                    "items": [{"key": "a", "payload": 1}, {"key": "a", "payload": 2}],
                }
            },
        }
    )
    with pytest.raises(ConfigError) as exc:
        schedules.build_all(cfg)
    assert exc.value.problems == [
        "schedules.n.items: /items/1/key: duplicate key 'a' (also /items/0/key)"
    ]


def test_items_from_must_import() -> None:
    cfg = config.from_mapping(
        {
            "handlers": HANDLERS,
            "schedules": {
                "n": {"cron": "0 2 * * *", "handler": "echo", "items_from": "supervisor:nope"}
            },
        }
    )
    with pytest.raises(ConfigError) as exc:
        schedules.build_all(cfg)
    assert "schedules.n.items_from: module 'supervisor' has no attribute 'nope'" in str(exc.value)
