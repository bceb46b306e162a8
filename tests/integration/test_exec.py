"""`pleaco apps exec` against real agents and Docker Engine: a command's output and exit
code, standard input piped through, a chosen replica, an interactive session on a
pseudo-terminal (keys, window size, exit code), a replica on another node refused with
its node's name and address, and bad input (unknown app or replica, no command, no token)."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Callable
from typing import Any

import pytest
from agentproc import REPO, AgentProcess, form_cluster, wait_for
from conftest import HELLO

from pleaco.api.client import Client
from pleaco.api.errors import ApiError


def cli(agent: AgentProcess, *args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "pleaco", "--api", agent.url, "--token", agent.token, *args],
                          input=stdin, capture_output=True, timeout=60, cwd=REPO)


def running(agent: AgentProcess, app: str, n: int) -> list[dict[str, Any]]:
    def ready() -> list[dict[str, Any]] | None:
        found = [i for i in agent.client.app(app)["instances"] if i["state"] == "running"]
        return found if len(found) == n else None

    return wait_for(ready, 40, f"{n} running replicas of {app}")  # type: ignore[return-value]


def read_until(fd: int, needle: bytes, timeout: float = 20) -> bytes:
    """What the terminal shows until ``needle``."""
    seen = b""
    deadline = time.monotonic() + timeout
    while needle not in seen:
        left = deadline - time.monotonic()
        assert left > 0, f"{needle!r} not in {seen!r}"
        if select.select([fd], [], [], left)[0]:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                chunk = b""
            assert chunk, f"the session ended before {needle!r}: {seen!r}"
            seen += chunk
    return seen


def test_exec_output_input_replica_and_bad_input(agent: AgentProcess) -> None:
    agent.client.deploy("web", {"image": HELLO, "replicas": 2, "port": 8080})
    replicas = {i["replica"]: i for i in running(agent, "web", 2)}

    done = cli(agent, "apps", "exec", "web", "--", "sh", "-c", "echo out; echo err >&2; exit 3")
    assert done.returncode == 3, done.stderr
    assert sorted(done.stdout.decode().split()) == ["err", "out"]
    piped = cli(agent, "apps", "exec", "web", "--replica", "1", "--", "sh", "-c", "cat; hostname",
                stdin=b"piped\n")
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout.decode().split() == ["piped", replicas[1]["container"][:12]]

    nope = cli(agent, "apps", "exec", "nope", "--", "true")
    assert nope.returncode == 1 and b"app 'nope' does not exist" in nope.stderr, nope.stderr
    missing = cli(agent, "apps", "exec", "web", "--replica", "7", "--", "true")
    assert missing.returncode == 1 and b"has no replica 7" in missing.stderr, missing.stderr
    empty = cli(agent, "apps", "exec", "web", "--")
    assert empty.returncode == 2 and b"give the command after --" in empty.stderr
    with pytest.raises(ApiError) as err:
        agent.client.request("GET", "/v1/apps/web/exec?tty=1")
    assert err.value.status == 400 and "cmd" in err.value.message
    with pytest.raises(ApiError) as err:
        agent.client.request("GET", "/v1/apps/web/exec?cmd=true&replica=x")
    assert err.value.status == 400 and "replica" in err.value.message
    with pytest.raises(ApiError) as err:
        Client(agent.url, "wrong").request("GET", "/v1/apps/web/exec?cmd=true")
    assert err.value.status == 401


def test_an_interactive_session_on_a_terminal(agent: AgentProcess) -> None:
    agent.client.deploy("web", {"image": HELLO, "replicas": 1, "port": 8080})
    running(agent, "web", 1)
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 33, 101, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "pleaco", "--api", agent.url, "--token", agent.token,
                             "apps", "exec", "web", "--", "sh"], stdin=slave, stdout=slave, stderr=slave,
                            cwd=REPO, start_new_session=True)
    os.close(slave)
    try:
        os.write(master, b"echo $((6 * 7))x\n")
        read_until(master, b"42x")
        os.write(master, b"stty size\n")
        read_until(master, b"33 101")
        # The window follows the terminal's.
        fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", 20, 70, 0, 0))
        os.kill(proc.pid, signal.SIGWINCH)
        deadline = time.monotonic() + 20
        while True:
            os.write(master, b"stty size; echo done\n")
            if b"20 70" in read_until(master, b"done\r\n"):
                break
            assert time.monotonic() < deadline, "the window size did not follow the terminal's"
        os.write(master, b"exit 4\n")
        assert proc.wait(20) == 4
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        os.close(master)


def test_a_replica_on_another_node_names_it(agent_factory: Callable[..., AgentProcess]) -> None:
    a, b = form_cluster(agent_factory, 2)
    a.client.deploy("web", {"image": HELLO, "replicas": 1, "port": 8080})
    (instance,) = running(a, "web", 1)
    here = a if instance["node"] == a.node_id else b
    there = b if here is a else a
    wait_for(lambda: any(i["node"] == here.node_id for i in there.client.app("web")["instances"]), 20,
             "the replica seen by the other node")
    refused = cli(there, "apps", "exec", "web", "--replica", "0", "--", "true")
    assert refused.returncode == 1
    assert f"runs on node {here.data_dir.name}".encode() in refused.stderr, refused.stderr
    assert f"--api http://{here.host}:{here.port}".encode() in refused.stderr
    with pytest.raises(ApiError) as err:
        there.client.request("GET", "/v1/apps/web/exec?cmd=true")
    assert err.value.status == 409 and err.value.code == "replica_elsewhere"
    done = cli(here, "apps", "exec", "web", "--", "sh", "-c", "exit 0")
    assert done.returncode == 0, done.stderr
