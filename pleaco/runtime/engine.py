"""What the loops need of a container engine: the ``Engine`` protocol.

Two implementations: ``pleaco.runtime.docker.DockerRuntime`` (Docker Engine, what the agent
and the integration tests run) and ``pleaco.runtime.memory.MemoryEngine`` (an in-memory
twin for unit tests). The protocol holds exactly the calls the app loop, the proxy loop and
the API server make, with the adapter's signatures; every call is blocking (the loops run
them through ``Loop.blocking``).

The errors every implementation raises, and nothing else for the engine's own failures:

- ``EngineUnavailable``: the engine does not answer (down, socket missing, timed out);
- ``NotFound``: the container or image does not exist;
- ``Conflict``: a container of that name exists already;
- ``PermissionError``: the container is not the given node's (the calls that take a
  ``node_id`` refuse to touch anything else: several agents may share one engine);
- ``RuntimeError``: any other error the engine reports.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from pleaco.runtime.docker import (
    ContainerInfo,
    DockerRuntime,
    ExitInfo,
    InfraInfo,
    InfraSpec,
    NetworkInfo,
    NetworkSpec,
    RunSpec,
)


class Engine(Protocol):
    # Where the engine is reached, for ``agent status`` ("memory://" for the twin).
    base_url: str

    # -- app replicas: only containers carrying the four pleaco labels -----------------------

    def list_managed(self, node_id: str, app: str | None = None) -> list[ContainerInfo]:
        """Every container (any state) labelled as pleaco's and as ``node_id``'s, newest first."""
        ...

    def run(self, spec: RunSpec) -> str:
        """Create and start a replica's container named ``spec.name``; returns its id.
        Conflict when the name is taken, NotFound when the image is missing."""
        ...

    def start(self, container_id: str) -> None:
        """Start a created or exited container (no-op when it runs); NotFound when gone."""
        ...

    def exit_info(self, container_id: str) -> ExitInfo:
        """Why a container stopped: its exit code, and whether it was OOM-killed; NotFound
        when gone."""
        ...

    def stop(self, container_id: str, node_id: str, stop_timeout: int = 10) -> None:
        """Stop, not remove, one of ``node_id``'s containers; PermissionError for another's."""
        ...

    def remove(self, container_id: str, node_id: str, stop_timeout: int = 10) -> None:
        """Stop and remove one of ``node_id``'s containers; PermissionError for another's,
        NotFound when it does not exist."""
        ...

    def logs(self, container_id: str, tail: int | str = "all", follow: bool = False) -> Iterator[bytes]:
        """The container's output; with ``follow`` an endless stream (close() it to stop)."""
        ...

    # -- images ----------------------------------------------------------------------------

    def image_exists(self, ref: str) -> bool:
        ...

    # -- infrastructure containers (the proxy): ``pleaco.role`` + ``pleaco.node`` labels ------

    def find_infra(self, node_id: str, role: str) -> InfraInfo | None:
        """``node_id``'s container of that role, in any state (the newest if several)."""
        ...

    def list_infra(self, role: str) -> list[InfraInfo]:
        """Every node's containers of that role on this engine, in any state (callers decide
        by labels and mounts which are theirs to touch)."""
        ...

    def run_infra(self, spec: InfraSpec) -> str:
        """Create and start an infrastructure container (host network); returns its id."""
        ...

    def remove_infra(self, container_id: str, node_id: str, role: str) -> None:
        """Remove ``node_id``'s container of that role; PermissionError for any other."""
        ...


class NetworkEngine(Protocol):
    """What the network loop needs of the engine: the node's own bridge network, and
    enough to leave replicas of an old subnet (remove) and to check the cluster CIDR
    against the engine's other networks."""

    def find_network(self, name: str) -> NetworkInfo | None:
        ...

    def network_subnets(self) -> list[tuple[str, str]]:
        ...

    def create_network(self, spec: NetworkSpec) -> str:
        ...

    def remove_network(self, name: str) -> None:
        ...

    def remove(self, container_id: str, node_id: str, stop_timeout: int = 10) -> None:
        ...

    def list_managed(self, node_id: str, app: str | None = None) -> list[ContainerInfo]:
        ...

    def connect_network(self, network: str, container_id: str, node_id: str) -> None:
        ...


# The adapter satisfies the protocol (checked by mypy here, where the agent's code is).
_docker_is_an_engine: type[Engine] = DockerRuntime
_docker_has_networks: type[NetworkEngine] = DockerRuntime
