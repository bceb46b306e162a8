"""Test helpers: run real pleaco agents as processes, poll for conditions, clean up."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import docker

from pleaco.api.client import Client
from pleaco.runtime import LABEL_NODE

T = TypeVar("T")
REPO = Path(__file__).resolve().parents[2]


def wait_for(cond: Callable[[], T], timeout: float = 30.0, what: str = "condition", interval: float = 0.1) -> T:
    """Poll ``cond`` until it returns something truthy; fail with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while True:
        try:
            result = cond()
            if result:
                return result
        except Exception as exc:  # a condition may fail while things settle
            last_exc = exc
        if time.monotonic() > deadline:
            detail = f" (last error: {last_exc})" if last_exc else ""
            raise AssertionError(f"timed out after {timeout}s waiting for {what}{detail}")
        time.sleep(interval)


def wait_listening(proc: subprocess.Popen[bytes], host: str, port: int, timeout: float, what: str) -> None:
    """Poll until ``host:port`` accepts connections; fail at once if ``proc`` exits first."""

    def listening_or_exited() -> bool:
        if proc.poll() is not None:
            return True
        with socket.socket() as s:
            s.settimeout(0.2)
            return s.connect_ex((host, port)) == 0

    wait_for(listening_or_exited, timeout, f"{what} to listen on {host}:{port}", interval=0.05)
    if proc.poll() is not None:
        raise RuntimeError(f"{what} exited with {proc.returncode} before listening")


# Ports below the kernel's ephemeral range (32768-60999 by default), each handed out once:
# a port the kernel picked (bind to 0) can be taken by any outgoing connection's local end
# between the moment it is picked and the moment the agent or proxy listens on it.
_PORTS = iter(random.Random().sample(range(20000, 32768), 32768 - 20000))


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, outside the ephemeral range, never given twice."""
    for port in _PORTS:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port left in 20000-32767")


def docker_client() -> docker.DockerClient:
    return docker.DockerClient(base_url="unix:///var/run/docker.sock", version="1.41")


def node_containers(node_id: str, app: str | None = None, all_states: bool = True) -> list[Any]:
    filters = {"label": [f"{LABEL_NODE}={node_id}"] + ([f"pleaco.app={app}"] if app else [])}
    return docker_client().containers.list(all=all_states, filters=filters, sparse=True)


# Every node whose containers a test removed: swept once more when the session ends, for a
# container an agent killed mid-call had asked for and the engine made after the cleanup.
CLEANED_NODES: set[str] = set()


def remove_node_containers(node_id: str) -> None:
    CLEANED_NODES.add(node_id)

    def removed() -> bool:
        # Removed again at every look: the engine may make a container the killed agent
        # asked for after the first look (its create was in flight).
        left = node_containers(node_id)
        for c in left:
            try:
                c.remove(force=True)
            except docker.errors.NotFound:
                pass
            except docker.errors.APIError as exc:
                # Another agent (one that found this node's proxy orphaned) is removing it already.
                if "already in progress" not in str(exc):
                    raise
        return not left

    wait_for(removed, 30, f"node {node_id}'s containers to be removed")


@dataclass
class AgentProcess:
    """A real ``pleaco agent`` subprocess with its own data dir, API port and node id."""

    data_dir: Path
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    gossip_port: int = field(default_factory=free_port)
    # Where the API listens, and a command prefix (e.g. ``ip netns exec NS`` to run the
    # agent on a test host in a network namespace).
    host: str = "127.0.0.1"
    prefix: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None
    node_id: str = ""
    starts: int = 0

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.data_dir.parent / f"{self.data_dir.name}-agent.log"

    @property
    def token(self) -> str:
        return (self.data_dir / "admin.token").read_text().strip()

    @property
    def client(self) -> Client:
        return Client(self.url, self.token, timeout=30)

    def start(self) -> AgentProcess:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.starts += 1
        # Each agent on a host holds its own addresses (a second one on the same gossip or
        # proxy address refuses to start): its own gossip port, and no proxy unless the test
        # asks for one. The test's own arguments come last and win.
        cmd = [*self.prefix, sys.executable, "-m", "pleaco", "agent", "--data-dir", str(self.data_dir),
               "--api-listen", f"{self.host}:{self.port}", "--name", self.data_dir.name,
               "--gossip-listen", f"{self.host}:{self.gossip_port}", "--proxy-image=", *self.extra_args]
        # The network off unless the test turns it on: agents here share one engine and one
        # network namespace, where each would claim the one `pleaco` network and bridge.
        env = {**os.environ, "PLEACO_LOG_LEVEL": "debug", "PLEACO_NETWORK_ENABLED": "false", **self.env}
        with open(self.log_path, "ab") as log:
            log.write(f"--- start {self.starts} ---\n".encode())
            log.flush()
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)

        try:
            # A generous bound: agents started side by side (agentproc.side_by_side) share
            # the machine's cores; five at once on a loaded 2-core machine took 15 s to listen.
            wait_listening(self.proc, self.host, self.port, 60, "the agent")
        except (AssertionError, RuntimeError) as exc:
            raise type(exc)(f"{exc}:\n{self.log_tail()}") from None
        self.node_id = self.client.status()["node_id"]
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text().splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        if self.node_id:
            remove_node_containers(self.node_id)


@contextlib.contextmanager
def shared_agent(data_dir: Path, what: str) -> Iterator[AgentProcess]:
    """One agent for a module's tests that each leave it as they found it (they only read,
    or are refused and check that nothing changed), rather than one started per test."""
    agent = AgentProcess(data_dir).start()
    try:
        yield agent
    finally:
        print(f"==== log of the {what} agent ====\n{agent.log_tail(200)}")
        agent.cleanup()


CADDY = "pleaco/caddy:latest"  # made by scripts/images.sh


@dataclass(frozen=True)
class ProxyPorts:
    """A proxy's addresses on 127.0.0.1 (and its activator's), each its own (agents on one
    host must not share them)."""

    http: int = field(default_factory=free_port)
    https: int = field(default_factory=free_port)
    admin: int = field(default_factory=free_port)
    activator: int = field(default_factory=free_port)

    def args(self, image: str = CADDY) -> list[str]:
        return ["--proxy-image", image, "--proxy-listen", f"127.0.0.1:{self.http}"]

    def env(self) -> dict[str, str]:
        return {"PLEACO_PROXY_HTTPS_LISTEN": f"127.0.0.1:{self.https}",
                "PLEACO_PROXY_ADMIN_LISTEN": f"127.0.0.1:{self.admin}",
                "PLEACO_PROXY_ACTIVATOR_LISTEN": f"127.0.0.1:{self.activator}"}


# -- clusters of agents on 127.0.0.x ---------------------------------------------------

def node_args(k: int) -> list[str]:
    # Each agent on its own loopback address, without a proxy (its own tests cover it).
    return ["--gossip-listen", f"127.0.0.{k}:{free_port()}", "--proxy-image=", "--discovery", "seeds"]


def side_by_side(calls: Sequence[Callable[[], T]]) -> list[T]:
    """Run ``calls`` at once, each in a thread, and answer their results in order; the first
    error is raised once every call has ended. For the starts of agents that do not join one
    another with a token (form_cluster's do so one by one): each waits seconds for its
    process to import and listen, and one at a time those seconds add up."""
    if not calls:
        return []
    with ThreadPoolExecutor(len(calls)) as pool:
        futures = [pool.submit(call) for call in calls]
    return [f.result() for f in futures]


def form_cluster(agent_factory: Callable[..., AgentProcess], n: int,
                 env: dict[str, str] | None = None) -> list[AgentProcess]:
    first = agent_factory("n0", extra_args=node_args(2), env=env)
    first.client.request("POST", "/v1/cluster/init")
    token = first.client.request("GET", "/v1/cluster/token")["token"]
    # The others join one after another, not side by side: joined at once, a node's view of
    # the others' records sometimes lagged by a push-pull interval (30 s), which cost more
    # than the few seconds of agent start it saved.
    agents = [first] + [agent_factory(f"n{i}", extra_args=[*node_args(i + 2), "--join-token", token], env=env)
                        for i in range(1, n)]
    ids = {x.node_id for x in agents}
    wait_for(lambda: all(alive_ids(a) == ids for a in agents), 40, f"{n} nodes alive everywhere")
    return agents


def states(agent: AgentProcess) -> dict[str, str]:
    return {n["id"]: n["state"] for n in agent.client.nodes()}


def alive_ids(agent: AgentProcess) -> set[str]:
    return {node for node, state in states(agent).items() if state == "alive"}


def metric(agent: AgentProcess, line_prefix: str) -> float:
    req = urllib.request.Request(agent.url + "/metrics", headers={"Authorization": f"Bearer {agent.token}"})
    text = urllib.request.urlopen(req, timeout=10).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(line_prefix))
