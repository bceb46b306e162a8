"""The API's limits without a server: JSON nesting, the connection guard's timeouts and
cap (fake transports), accept errors logged once per burst, and the error tree's mapping."""

from __future__ import annotations

import asyncio
import io
import logging
from typing import Any

import pytest

from pleaco import logs
from pleaco.api.config import ApiConfig
from pleaco.api.connections import ACCEPT_FAILED, AcceptErrorLog, ConnectionGuard
from pleaco.api.errors import ApiError
from pleaco.api.jsonbody import loads, nesting_depth
from pleaco.apps import NoEarlierRelease, NotFound, ValidationError
from pleaco.errors import Conflict, InvalidInput, PleacoError, Unavailable
from pleaco.runtime import EngineCallFailed, EngineError, EngineUnavailable
from pleaco.runtime import NotFound as EngineNotFound

POLL = 0.01  # seconds between looks at a condition polled with a deadline


def test_nesting_depth_ignores_brackets_in_strings() -> None:
    assert nesting_depth(b'{"a": [1, {"b": "[[[[{{"}], "c": "\\"["}', 64) == 3
    assert nesting_depth(b"42", 64) == 0
    assert nesting_depth(b"[" * 100_000, 64) == 65  # stops counting past the limit


def test_loads_refuses_past_the_limit_and_parses_within() -> None:
    assert loads(b"[" * 5 + b"]" * 5, 5) == [[[[[]]]]]
    with pytest.raises(ApiError) as err:
        loads(b"[" * 6 + b"]" * 6, 5)
    assert (err.value.status, err.value.code) == (400, "invalid_json")
    assert err.value.message == "request body nests deeper than 5 levels (the limit)"
    with pytest.raises(ApiError, match="not valid JSON"):
        loads(b"{nope", 5)


class FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.closed = False

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True


class FakeProtocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.received: list[bytes] = []

    def data_received(self, data: bytes) -> None:
        self.received.append(data)


def guard(**kw: Any) -> ConnectionGuard:
    g = ConnectionGuard(ApiConfig(**kw))
    g._factory = FakeProtocol
    return g


def test_idle_and_unfinished_requests_are_closed_busy_ones_kept() -> None:
    g = guard(idle_timeout=10, header_timeout=5)
    silent, slow, busy = FakeTransport(), FakeTransport(), FakeTransport()
    protos = []
    for t in (silent, slow, busy):
        p = g.protocol()
        p.connection_made(t)
        protos.append(p)
    protos[1].data_received(b"GET / HTTP/1.1\r\n")
    conn = g._conns[busy]
    conn.in_flight = 1  # as the middleware marks a request being handled
    start = conn.last_seen
    g.sweep(start + 6)
    assert (silent.closed, slow.closed, busy.closed) == (False, True, False)
    g.sweep(start + 11)
    assert (silent.closed, busy.closed) == (True, False)
    assert g.closed["idle"] == 1 and g.closed["slow_headers"] == 1 and len(g) == 1


def test_at_the_cap_the_longest_idle_connection_makes_room() -> None:
    g = guard(max_connections=2, reserved_fds=0)
    first, second, third = FakeTransport(), FakeTransport(), FakeTransport()
    for t in (first, second):
        g.protocol().connection_made(t)
    g._conns[first].last_seen -= 5  # idle the longest
    g.protocol().connection_made(third)
    assert first.closed and not second.closed and not third.closed and len(g) == 2
    # Every connection busy: the newcomer is the one refused.
    for conn in g._conns.values():
        conn.in_flight = 1
    fourth = FakeTransport()
    g.protocol().connection_made(fourth)
    assert fourth.closed and g.closed == {"idle": 0, "slow_headers": 0, "evicted": 1, "refused": 1}


def test_accept_errors_are_logged_once_per_burst_with_a_count() -> None:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logs.LogfmtFormatter())
    logging.getLogger("pleaco").addHandler(handler)
    others: list[dict[str, Any]] = []
    loop = asyncio.new_event_loop()
    try:
        loop.set_exception_handler(lambda _loop, ctx: others.append(ctx))
        errors = AcceptErrorLog(window=0.05)
        errors.install(loop)

        async def failing_accepts() -> None:  # as the loop reports them, from inside it
            for _ in range(500):
                loop.call_exception_handler({"message": ACCEPT_FAILED, "exception": OSError(24, "Too many open files")})
            loop.call_exception_handler({"message": "something else"})
            deadline = loop.time() + 5
            while "repeated=" not in out.getvalue():
                assert loop.time() < deadline, "the burst was never reported"
                await asyncio.sleep(POLL)

        loop.run_until_complete(failing_accepts())
        errors.uninstall(loop)
    finally:
        loop.close()
        logging.getLogger("pleaco").removeHandler(handler)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2, lines
    assert "event=api.accept_failed" in lines[0] and "Too many open files" in lines[0]
    assert "repeated=499" in lines[1]
    assert [c["message"] for c in others] == ["something else"]


@pytest.mark.parametrize(("exc", "base", "builtin", "status", "code"), [
    (ValidationError("port", "bad"), InvalidInput, ValueError, 400, "invalid"),
    (NotFound("app 'x' does not exist"), PleacoError, LookupError, 404, "not_found"),
    (NoEarlierRelease("only one"), Conflict, RuntimeError, 409, "no_earlier_release"),
    (EngineUnavailable("down"), Unavailable, RuntimeError, 503, "engine_unreachable"),
    (EngineNotFound("no such container"), EngineError, LookupError, 404, "not_found"),
    (EngineCallFailed("docker engine: 500"), EngineError, RuntimeError, 502, "engine_error"),
])
def test_errors_carry_status_and_code_and_keep_their_builtin_base(
    exc: PleacoError, base: type, builtin: type, status: int, code: str
) -> None:
    assert isinstance(exc, base) and isinstance(exc, builtin) and isinstance(exc, PleacoError)
    assert (exc.status, exc.code) == (status, code)
