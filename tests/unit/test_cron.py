"""The cron parser (pleaco/stacks/cron.py): fields, ranges, steps, lists, names, bad input
named by field, and the next tick."""

from __future__ import annotations

import datetime as dt

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pleaco.cron import CronError, parse


def tick_of(*args: int) -> int:
    return int(dt.datetime(*args, tzinfo=dt.UTC).timestamp()) // 60


def test_fields_ranges_steps_lists_and_names() -> None:
    c = parse("*/15 9-17/4 1,15 jan-mar mon-fri")
    assert c.minutes == {0, 15, 30, 45}
    assert c.hours == {9, 13, 17}
    assert c.days == {1, 15}
    assert c.months == {1, 2, 3}
    assert c.weekdays == {1, 2, 3, 4, 5}
    assert parse("5/20 * * * *").minutes == {5, 25, 45}
    assert parse("* * * * 7").weekdays == {0}  # 7 is Sunday too
    assert parse("0  0 * * *").text == "0 0 * * *"


@pytest.mark.parametrize(("expr", "field"), [
    ("60 * * * *", "minute"), ("* 24 * * *", "hour"), ("* * 0 * *", "day-of-month"),
    ("* * * 13 *", "month"), ("* * * * 8", "day-of-week"), ("*/0 * * * *", "minute"),
    ("* 5-2 * * *", "hour"), ("* * * foo *", "month"), ("* * * * 1,,2", "day-of-week"),
    ("x * * * *", "minute"), ("* * 30 2 *", "day-of-month"), ("* * * * * *", "expected 5"),
    ("* * * *", "expected 5"), ("", "expected 5"), ("*/a * * * *", "minute"), ("* * * * ٣", "day-of-week"),
])
def test_bad_input_names_the_field(expr: str, field: str) -> None:
    with pytest.raises(CronError, match=field):
        parse(expr)


def test_not_a_string() -> None:
    with pytest.raises(CronError, match="expected a string"):
        parse(5)


def test_next_tick() -> None:
    c = parse("30 2 * * *")
    assert c.next_after(tick_of(2026, 1, 1, 2, 30)) == tick_of(2026, 1, 2, 2, 30)
    assert c.next_after(tick_of(2026, 1, 1, 2, 29)) == tick_of(2026, 1, 1, 2, 30)
    # Feb 29 only: the next leap year.
    assert parse("0 0 29 2 *").next_after(tick_of(2026, 3, 1)) == tick_of(2028, 2, 29)
    # Either day rule when both are restricted (Vixie cron): the 13th or a Friday.
    either = parse("0 0 13 * fri")
    assert either.next_after(tick_of(2026, 2, 1)) == tick_of(2026, 2, 6)  # a Friday before the 13th
    assert either.matches(tick_of(2026, 2, 13))
    assert parse("0 0 * * mon").next_after(tick_of(2026, 11, 30)) == tick_of(2026, 12, 7)  # 30 Nov 2026 is a Monday


EXPRS = ["* * * * *", "*/7 * * * *", "0 */3 * * *", "15 4 1 * *", "0 0 * * 0", "5-10/2 1,2 * 2-4 mon-wed",
         "0 12 13 * 5", "59 23 31 12 *", "0 0 29 2 *"]


@settings(max_examples=300, deadline=None)
@given(expr=st.sampled_from(EXPRS), now=st.integers(0, 130 * 365 * 24 * 60))
def test_next_tick_is_after_now_matches_and_is_the_first(expr: str, now: int) -> None:
    c = parse(expr)
    nxt = c.next_after(now)
    assert nxt is not None
    assert nxt > now
    assert c.matches(nxt)
    # Nothing between: checked minute by minute over a bounded stretch.
    assert not any(c.matches(t) for t in range(now + 1, min(nxt, now + 3000)))
