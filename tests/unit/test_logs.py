"""Structured logs: one logfmt line per event, with the whole traceback of an error."""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Iterator

import pytest

from pleaco import logs


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logs.LogfmtFormatter())
    root = logging.getLogger("pleaco")
    root.addHandler(handler)
    level = root.level
    root.setLevel(logging.DEBUG)
    yield out
    root.removeHandler(handler)
    root.setLevel(level)


def _unquote(value: str) -> str:
    return re.sub(r'\\(.)', lambda m: {"n": "\n", "r": "\r"}.get(m.group(1), m.group(1)), value[1:-1])


def fields(line: str) -> dict[str, str]:
    pairs = re.findall(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)', line)
    return {k: _unquote(v) if v.startswith('"') else v for k, v in pairs}


def inner(n: int) -> None:
    if n == 0:
        raise ValueError('bad "spec"\nsecond line')
    inner(n - 1)


def test_an_error_keeps_its_whole_traceback_on_one_line(captured: io.StringIO) -> None:
    try:
        inner(3)
    except ValueError:
        logs.get("pleaco.test").error("reconcile.failed", exc_info=True, app="web")
    lines = captured.getvalue().splitlines()
    assert len(lines) == 1
    got = fields(lines[0])
    assert got["event"] == "reconcile.failed" and got["app"] == "web"
    assert got["error"] == "second line"  # the last line, as before
    trace = got["traceback"]
    assert trace.startswith("Traceback (most recent call last):")
    assert trace.count("in inner") == 4  # every frame of the stack, not just the last line
    assert trace.endswith('ValueError: bad "spec"\nsecond line')


def test_values_with_line_breaks_stay_on_one_line(captured: io.StringIO) -> None:
    logs.get("pleaco.test").info("x.y", note="a\r\nb c", plain="ok")
    line = captured.getvalue()
    assert line.count("\n") == 1 and "\r" not in line
    got = fields(line.strip())
    assert (got["event"], got["note"], got["plain"]) == ("x.y", "a\r\nb c", "ok")
