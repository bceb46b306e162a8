"""The exec route's request checks (pleaco/api/exec.py): every bad query is named."""

from __future__ import annotations

import pytest
from multidict import MultiDict

from pleaco.api.exec import ExecInputError, node_api, parse_request
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


def test_the_node_a_client_is_sent_to() -> None:
    assert node_api("ab" * 16, {"name": "n2", "address": "10.0.0.2:7400"}) == ("n2", "10.0.0.2:7400")
    # An API on every address is named by the node's gossip host.
    assert node_api("ab" * 16, {"name": "n2", "address": "0.0.0.0:7400", "gossip": "10.0.0.2:7401"}) == (
        "n2", "10.0.0.2:7400")
    assert node_api("ab" * 16, {"api": "[::]:7400", "gossip": "[fd00::2]:7401"}) == ("abababababab", "[fd00::2]:7400")
    assert node_api("ab" * 16, None) == ("abababababab", "unknown")
