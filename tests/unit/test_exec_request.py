"""The exec route's request checks (pleaco/api/exec.py): every bad query is named."""

from __future__ import annotations

import pytest
from multidict import MultiDict

from pleaco.api.exec import ExecInputError, parse_request
from pleaco.apps import ValidationError


def q(*pairs: tuple[str, str]) -> MultiDict[str]:
    return MultiDict(pairs)


def test_a_good_request() -> None:
    req = parse_request("web", q(("cmd", "sh"), ("cmd", "-c"), ("cmd", "echo hi"), ("replica", "2"), ("tty", "1"),
                                 ("rows", "40"), ("cols", "120")))
    assert (req.app, req.command, req.replica, req.tty, req.rows, req.cols) == (
        "web", ("sh", "-c", "echo hi"), 2, True, 40, 120)
    assert parse_request("web", q(("cmd", "true"))).replica is None


@pytest.mark.parametrize(("query", "named"), [
    (q(), "cmd"), (q(("cmd", "")), "cmd"), (q(("cmd", "a\x00b")), "cmd"),
    (q(("cmd", "x"), ("replica", "-1")), "replica"), (q(("cmd", "x"), ("replica", "one")), "replica"),
    (q(("cmd", "x"), ("tty", "yes")), "tty"), (q(("cmd", "x"), ("rows", "0")), "rows"),
    (q(("cmd", "x"), ("cols", "99999")), "cols"), (q(*[("cmd", "x")] * 1025), "cmd"),
])
def test_bad_requests_are_named(query: MultiDict[str], named: str) -> None:
    with pytest.raises(ExecInputError, match=named):
        parse_request("web", query)


def test_a_bad_app_name() -> None:
    with pytest.raises(ValidationError, match="name"):
        parse_request("Web!", q(("cmd", "x")))
