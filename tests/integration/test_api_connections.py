"""The API under idle connections: a real agent with 1024 open files (the default limit
that an outage hit), 2000 idle clients, and clients that never finish a request."""

from __future__ import annotations

import contextlib
import json
import socket
import urllib.request
from collections.abc import Callable, Iterator

import pytest
from agentproc import AgentProcess, wait_for

# prlimit(1) runs the agent with this open-files limit, soft and hard.
NOFILE = 1024


@pytest.fixture
def sockets() -> Iterator[list[socket.socket]]:
    opened: list[socket.socket] = []
    yield opened
    for s in opened:
        s.close()


def healthz(agent: AgentProcess) -> bool:
    with urllib.request.urlopen(agent.url + "/healthz", timeout=5) as resp:
        return bool(json.loads(resp.read())["ok"])


def closed_by_server(s: socket.socket) -> bool:
    """True once the server has closed ``s`` (data received on the way is dropped)."""
    s.settimeout(0.2)
    try:
        while data := s.recv(65536):
            del data
        return True
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def test_healthz_answers_while_2000_idle_connections_are_open(
    agent_factory: Callable[..., AgentProcess], sockets: list[socket.socket]
) -> None:
    agent = agent_factory(prefix=["prlimit", f"--nofile={NOFILE}:{NOFILE}"])
    for _ in range(2000):
        s = socket.socket()
        sockets.append(s)
        s.setblocking(False)
        # Non-blocking: once the agent stops accepting, a full backlog would block connect().
        with contextlib.suppress(BlockingIOError):
            s.connect((agent.host, agent.port))
    # /healthz answers although 2000 idle clients want more connections than the agent has files.
    assert wait_for(lambda: healthz(agent), 30, "/healthz to answer beside 2000 idle connections")
    assert agent.client.status()["node_id"] == agent.node_id
    log = agent.log_path.read_text()
    assert "Traceback" not in log and "out of system resource" not in log


def test_idle_and_slow_connections_are_closed(
    agent_factory: Callable[..., AgentProcess], sockets: list[socket.socket]
) -> None:
    agent = agent_factory(env={"PLEACO_API_IDLE_TIMEOUT": "1", "PLEACO_API_HEADER_TIMEOUT": "1"})
    silent, slow, kept = (socket.create_connection((agent.host, agent.port), timeout=5) for _ in range(3))
    sockets.extend([silent, slow, kept])
    slow.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # headers never finished
    kept.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")  # a keep-alive request, then nothing
    answer = b""
    while b'"ok": true' not in answer:
        answer += kept.recv(65536)
    assert answer.startswith(b"HTTP/1.1 200")
    for name, s in (("a silent connection", silent), ("unfinished headers", slow), ("an idle keep-alive", kept)):
        wait_for(lambda s=s: closed_by_server(s), 30, f"the agent to close {name}")  # type: ignore[misc]
    assert healthz(agent)
