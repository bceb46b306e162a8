"""Integration fixtures: a real Docker Engine, the offline images, real agent processes."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from agentproc import CLEANED_NODES, REPO, AgentProcess, docker_client, remove_node_containers
from slotagents import ReleaseKit

HELLO = "pleaco/hello:latest"
BUSYBOX = "pleaco/busybox:latest"


@pytest.fixture(scope="session", autouse=True)
def engine() -> None:
    """Docker Engine must answer, and the offline images must exist (made if missing)."""
    try:
        docker_client().ping()
    except Exception as exc:
        pytest.fail(f"Docker Engine does not answer on /var/run/docker.sock ({exc}); run `make test`", pytrace=False)
    subprocess.run([str(REPO / "scripts" / "images.sh")], check=True, cwd=REPO)


@pytest.fixture(scope="session", autouse=True)
def final_sweep() -> Iterator[None]:
    """Remove, once more at the end, the containers of every node the tests cleaned up."""
    yield
    for node in sorted(CLEANED_NODES):
        remove_node_containers(node)


@pytest.fixture(scope="session", autouse=True)
def build_network() -> Iterator[None]:
    """Remove, at the end, the isolated build network (and its firewall rules) the agents'
    builds made: on a node it stays, like docker0."""
    yield
    from pleaco.builds.engine import BuildEngine
    from pleaco.builds.network import BuildNetwork

    engine = BuildEngine("unix:///var/run/docker.sock", 30, "tests")
    try:
        BuildNetwork(engine).remove()
    finally:
        engine.close()


@pytest.fixture(scope="session")
def release_kit(tmp_path_factory: pytest.TempPathFactory) -> ReleaseKit:
    """Release bundles and shared start slots for the upgrade tests, each made once a
    session: a bundle build takes seconds and a slot's install tens of seconds."""
    return ReleaseKit(tmp_path_factory.mktemp("release-kit"))


@pytest.fixture
def agent_factory(tmp_path: Path) -> Iterator[Callable[..., AgentProcess]]:
    """Start agents on demand; each is killed and its containers removed after the test."""
    agents: list[AgentProcess] = []

    def make(name: str = "node", extra_args: list[str] | None = None, env: dict[str, str] | None = None,
             start: bool = True, host: str = "127.0.0.1", prefix: list[str] | None = None) -> AgentProcess:
        agent = AgentProcess(tmp_path / name, extra_args=list(extra_args or []), env=dict(env or {}),
                             host=host, prefix=list(prefix or []))
        agents.append(agent)
        return agent.start() if start else agent

    yield make
    # Every agent is cleaned up whatever one's cleanup raises (a leaked agent would hold
    # its addresses and containers for the rest of the session); the first error is raised.
    errors: list[Exception] = []
    for agent in agents:
        print(f"==== log of agent {agent.data_dir.name} ====\n{agent.log_tail(200)}")
        try:
            agent.cleanup()
        except Exception as exc:
            errors.append(exc)
    if errors:
        raise errors[0]


@pytest.fixture
def agents(agent_factory: Callable[..., AgentProcess]) -> Iterator[Callable[..., AgentProcess]]:
    """``agent_factory``, and at the end the Docker volumes of its agents removed (after
    their containers, which hold them)."""
    made: list[AgentProcess] = []

    def make(*args: Any, **kwargs: Any) -> AgentProcess:
        agent = agent_factory(*args, **kwargs)
        made.append(agent)
        return agent

    yield make
    for agent in made:
        agent.cleanup()
        for v in docker_client().volumes.list(filters={"label": f"pleaco.node={agent.node_id}"}):
            v.remove(force=True)


@pytest.fixture
def agent(agent_factory: Callable[..., AgentProcess]) -> AgentProcess:
    return agent_factory()
