"""The agent's side of systemd: NOTIFY_SOCKET parsing, notify messages (sent over a real
datagram socket), the watchdog's interval and its withholding while a loop is stuck, and
when the agent asks systemd to start docker.service."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from pleaco.host.systemd import (
    Notifier,
    NotifyAddressError,
    Supervision,
    ensure_docker,
    notify_address,
    notify_message,
    status_line,
    watchdog_interval,
)


def test_notify_socket_is_a_path_or_an_abstract_name() -> None:
    assert notify_address("/run/systemd/notify") == "/run/systemd/notify"
    assert notify_address("@/org/freedesktop/systemd1/notify/1") == "\0/org/freedesktop/systemd1/notify/1"
    assert notify_address("") is None
    for bad in ("@", "relative/path", "vsock:2:1234"):
        with pytest.raises(NotifyAddressError, match="NOTIFY_SOCKET"):
            notify_address(bad)


def test_a_message_is_one_line_per_field_and_a_value_never_breaks_its_line() -> None:
    assert notify_message({"READY": 1, "STATUS": "2 apps, 3 replicas, cluster of 1"}) == \
        b"READY=1\nSTATUS=2 apps, 3 replicas, cluster of 1\n"
    assert notify_message({"STATUS": "a\nb\rc"}) == b"STATUS=a b c\n"
    with pytest.raises(ValueError, match="upper-case"):
        notify_message({"status": "x"})
    assert status_line(2, 5, 3) == "2 apps, 5 replicas, cluster of 3"


def test_the_watchdog_pings_at_half_its_timeout_and_only_for_its_own_pid() -> None:
    me = os.getpid()
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}, me) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(me)}, me) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(me + 1)}, me) is None  # a parent's
    assert watchdog_interval({}, me) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}, me) is None
    assert watchdog_interval({"WATCHDOG_USEC": "soon"}, me) is None


POLL = 0.01  # seconds between looks at a condition (polled with a deadline)


class Listener:
    """systemd's end: a datagram socket at NOTIFY_SOCKET's address."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(5.0)

    def messages(self) -> list[dict[str, str]]:
        """Every message received so far (none waiting: an empty list)."""
        out = []
        self.sock.setblocking(False)
        try:
            while True:
                out.append(dict(line.split("=", 1) for line in self.sock.recv(4096).decode().splitlines()))
        except BlockingIOError:
            return out
        finally:
            self.sock.settimeout(5.0)


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[Listener]:
    lst = Listener(str(tmp_path / "notify"))
    yield lst
    lst.sock.close()


def test_messages_reach_a_path_socket_and_an_abstract_one(listener: Listener) -> None:
    path = listener.sock.getsockname()
    assert Notifier({"NOTIFY_SOCKET": path}).send(READY=1, STATUS="up")
    assert listener.messages() == [{"READY": "1", "STATUS": "up"}]
    name = f"pleaco-test-notify-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as abstract:
        abstract.bind("\0" + name)
        assert Notifier({"NOTIFY_SOCKET": "@" + name}).send(STOPPING=1)
        assert abstract.recv(4096) == b"STOPPING=1\n"


def test_without_notify_socket_nothing_is_sent_and_nothing_fails() -> None:
    n = Notifier({})
    assert not n.enabled and not n.send(READY=1)
    assert not Notifier({"NOTIFY_SOCKET": "/nonexistent/notify"}).send(READY=1)  # gone: logged, not raised


def test_the_watchdog_is_withheld_while_a_loop_is_stuck_and_resumes_after(
        listener: Listener, caplog: pytest.LogCaptureFixture) -> None:
    stuck: list[str] = []
    seen: list[float] = []
    replicas = [3]

    def stuck_at(now: float) -> list[str]:
        seen.append(now)
        return list(stuck)

    env = {"NOTIFY_SOCKET": listener.sock.getsockname(), "WATCHDOG_USEC": "4000000"}
    sup = Supervision(Notifier(env), lambda: status_line(1, replicas[0], 1), stuck_at, env, clock=lambda: 1234.5)
    assert sup.ping_every == 2.0
    sup.ready()
    assert listener.messages() == [{"READY": "1", "STATUS": "1 apps, 3 replicas, cluster of 1"}]

    tick = sup.tick()
    assert tick.pinged and seen == [1234.5]  # the clock's time is what stuck() is asked about
    assert listener.messages() == [{"WATCHDOG": "1"}]  # STATUS unchanged: not repeated

    stuck.append("apps")
    replicas[0] = 4
    with caplog.at_level(logging.INFO, logger="pleaco"):
        for _ in range(3):
            tick = sup.tick()
            assert not tick.pinged and tick.withheld == ("apps",)
        assert listener.messages() == [{"STATUS": "1 apps, 4 replicas, cluster of 1"}]  # no WATCHDOG=1
        withheld = [r for r in caplog.records if r.getMessage() == "systemd.watchdog_withheld"]
        assert len(withheld) == 1 and withheld[0].fields == {"loop": "apps"}  # type: ignore[attr-defined]

        stuck.clear()
        assert sup.tick().pinged
        assert listener.messages() == [{"WATCHDOG": "1"}]
        assert [r.getMessage() for r in caplog.records][-1] == "systemd.watchdog_resumed"


def test_without_a_watchdog_only_the_status_is_sent(listener: Listener) -> None:
    env = {"NOTIFY_SOCKET": listener.sock.getsockname()}
    sup = Supervision(Notifier(env), lambda: "0 apps, 0 replicas, cluster of 1", lambda now: ["apps"], env)
    tick = sup.tick()
    assert not tick.pinged and tick.withheld == ()
    assert listener.messages() == [{"STATUS": "0 apps, 0 replicas, cluster of 1"}]


def test_stop_says_stopping_and_ends_the_pings(listener: Listener) -> None:
    env = {"NOTIFY_SOCKET": listener.sock.getsockname(), "WATCHDOG_USEC": "20000"}  # a ping every 10 ms

    async def main() -> None:
        sup = Supervision(Notifier(env), lambda: "s", lambda now: [], env)
        sup.start()
        task = sup._task
        assert task is not None
        deadline = asyncio.get_running_loop().time() + 5.0
        got: list[dict[str, str]] = []
        while not any("WATCHDOG" in m for m in got):
            assert asyncio.get_running_loop().time() < deadline, "no ping"
            await asyncio.sleep(POLL)
            got += listener.messages()
        await sup.stop()
        assert task.cancelled()  # the pinging task is over
        assert listener.messages()[-1] == {"STOPPING": "1", "STATUS": "stopping"}

    asyncio.run(main())


def _down() -> None:
    raise ConnectionRefusedError("engine down")


def test_docker_service_is_started_only_for_its_own_engine_and_under_systemd() -> None:
    started: list[str] = []

    def start() -> str:
        started.append("docker.service")
        return "/org/freedesktop/systemd1/job/7"

    url = "unix:///var/run/docker.sock"
    service = {"INVOCATION_ID": "0123abcd"}
    assert ensure_docker(lambda: None, url, service, start) == "up"
    assert ensure_docker(_down, "unix:///tmp/other.sock", service, start) == "other_engine"
    assert ensure_docker(_down, url, {}, start) == "not_systemd"
    assert started == []
    assert ensure_docker(_down, url, service, start) == "started"
    assert started == ["docker.service"]

    def refused() -> str:
        raise PermissionError("access denied")

    assert ensure_docker(_down, url, service, refused) == "start_failed"
