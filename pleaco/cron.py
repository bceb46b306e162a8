"""Standard 5-field cron expressions: ``minute hour day-of-month month day-of-week``.

Each field is ``*``, a number, a range ``a-b``, a step ``*/n`` or ``a-b/n`` or ``a/n`` (from
``a`` to the field's end), or a comma list of these; months and days of week also take
their English three-letter names (``jan``, ``mon``), and day of week 7 is Sunday like 0.
As in Vixie cron, when both day-of-month and day-of-week are restricted (neither starts
with ``*``), a day matching either runs. Times are UTC.

Time is counted in *ticks*: tick N is minute N since the epoch when a tick is 60 s (the
default); the scheduler ([jobs] tick_seconds) may make a tick shorter, so that the same
expressions run faster in tests. Everything here works on tick numbers.

No dependency: the grammar is small and a bad expression must say which field is wrong.
"""

from __future__ import annotations

import calendar
import datetime as dt
from dataclasses import dataclass

from pleaco.errors import InvalidInput

# (name, lowest, highest) of each field, in order.
FIELDS = (("minute", 0, 59), ("hour", 0, 23), ("day-of-month", 1, 31), ("month", 1, 12), ("day-of-week", 0, 7))
_MONTHS = {name.lower(): i for i, name in enumerate(calendar.month_abbr) if name}
_DAYS = {name: i for i, name in enumerate(("sun", "mon", "tue", "wed", "thu", "fri", "sat"))}
# Longest expression accepted: far above any real one, and it keeps a pasted file out.
MAX_CHARS = 256
# Days searched for the next tick: covers a 29 February every 4 years, and the 8-year gap
# around 2100 (not a leap year).
_HORIZON_DAYS = 366 * 9
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


class CronError(InvalidInput, ValueError, code="invalid_cron"):
    """A cron expression is invalid; the message names the field."""


def _value(field: str, text: str, lo: int, hi: int) -> int:
    names = _MONTHS if field == "month" else _DAYS if field == "day-of-week" else {}
    if text.lower() in names:
        return names[text.lower()]
    if not text.isdigit() or not text.isascii():
        raise CronError(f"cron {field}: {text!r} is not a number" + (" or a name" if names else ""))
    n = int(text)
    if not lo <= n <= hi:
        raise CronError(f"cron {field}: {n} is out of range {lo}-{hi}")
    return n


def _field(field: str, text: str, lo: int, hi: int) -> frozenset[int]:
    out: set[int] = set()
    for item in text.split(","):
        if not item:
            raise CronError(f"cron {field}: empty item in {text!r}")
        base, slash, step_text = item.partition("/")
        step = 1
        if slash:
            if not step_text.isdigit() or not step_text.isascii() or int(step_text) < 1:
                raise CronError(f"cron {field}: step {step_text!r} must be a whole number of at least 1")
            step = int(step_text)
        if base == "*":
            first, last = lo, hi
        elif "-" in base:
            a, _, b = base.partition("-")
            first, last = _value(field, a, lo, hi), _value(field, b, lo, hi)
            if first > last:
                raise CronError(f"cron {field}: range {base!r} goes backwards")
        else:
            first = _value(field, base, lo, hi)
            last = hi if slash else first  # "a/n": from a to the field's end
        out.update(range(first, last + 1, step))
    return frozenset(out)


@dataclass(frozen=True)
class Cron:
    text: str
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]  # 0 = Sunday
    days_restricted: bool
    weekdays_restricted: bool

    def _day_matches(self, day: dt.date) -> bool:
        if day.month not in self.months:
            return False
        in_month = day.day in self.days
        in_week = (day.isoweekday() % 7) in self.weekdays
        if self.days_restricted and self.weekdays_restricted:
            return in_month or in_week
        return in_month and in_week

    def matches(self, tick: int) -> bool:
        """Whether tick ``tick`` (minute ``tick`` since the epoch, in cron's time) is one."""
        t = _EPOCH + dt.timedelta(minutes=tick)
        return t.minute in self.minutes and t.hour in self.hours and self._day_matches(t.date())

    def next_after(self, tick: int) -> int | None:
        """The first tick after ``tick`` that matches; None when none does in the next
        nine years (an expression such as ``0 0 30 2 *`` never matches)."""
        start = _EPOCH + dt.timedelta(minutes=tick + 1)
        day = start.date()
        for n in range(_HORIZON_DAYS):
            if n:
                day += dt.timedelta(days=1)
            if not self._day_matches(day):
                continue
            for hour in sorted(self.hours):
                for minute in sorted(self.minutes):
                    t = dt.datetime(day.year, day.month, day.day, hour, minute, tzinfo=dt.UTC)
                    if t >= start:
                        return int((t - _EPOCH).total_seconds()) // 60
        return None


def parse(text: object) -> Cron:
    """Parse a cron expression, or raise CronError naming the field that is wrong."""
    if not isinstance(text, str):
        raise CronError(f"cron: expected a string such as '*/5 * * * *', got {text!r}")
    if len(text) > MAX_CHARS:
        raise CronError(f"cron: {len(text)} characters, at most {MAX_CHARS}")
    parts = text.split()
    if len(parts) != len(FIELDS):
        raise CronError(f"cron: {text!r} has {len(parts)} fields; expected 5: minute hour day-of-month "
                        "month day-of-week")
    sets = [_field(name, part, lo, hi) for (name, lo, hi), part in zip(FIELDS, parts, strict=True)]
    weekdays = frozenset(d % 7 for d in sets[4])
    cron = Cron(text=" ".join(parts), minutes=sets[0], hours=sets[1], days=sets[2], months=sets[3],
                weekdays=weekdays, days_restricted=not parts[2].startswith("*"),
                weekdays_restricted=not parts[4].startswith("*"))
    if cron.days_restricted and not cron.weekdays_restricted and not any(
            d <= (29 if m == 2 else calendar.monthrange(2001, m)[1]) for m in cron.months for d in cron.days):
        raise CronError(f"cron day-of-month: {parts[2]!r} never occurs in month {parts[3]!r}")
    return cron
