"""This node's observed state: one object, one writer, one definition of healthy and serving.

The app loop is the only writer: each pass it lists the node's containers, probes them,
and records what it saw here. The proxy, the rollout guard, the route records and the API
read it; none of them reaches into the loop. What it holds is memory only (lost on
restart by design: a restarted agent gives every replica a fresh start and probes again).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pleaco import hostport
from pleaco.apps import AppSpec, AppStore
from pleaco.net.config import DOCKER_NETWORK
from pleaco.reconcile.backoff import Backoff
from pleaco.reconcile.drain import Drain
from pleaco.reconcile.publish import is_loopback, local_dial_host, mesh_address, publish_host
from pleaco.runtime import ContainerInfo

ReplicaKey = tuple[str, int]  # (app, replica index)


@dataclass
class ReplicaState:
    """What this node remembers about one replica between passes."""

    backoff: Backoff
    restarts: int = 0
    last_exit_code: int | None = None
    last_error: str = ""
    crash_seen: str = ""  # id of the exited container already counted as a crash
    stop_reason: str = ""  # why pleaco itself stopped the container, if it did
    # Why the engine refused to make the replica's container ("release N: ..."), until
    # one is made: a limit the engine refuses leaves no container to show it on.
    start_error: str = ""
    healthy: bool = False
    health_failures: int = 0
    running_since: float = 0.0
    container_id: str = ""


@dataclass
class ImageState:
    present: bool
    checked: float


@dataclass
class Observation:
    """The last pass's view of the engine."""

    engine_ok: bool = False
    engine_error: str = "not checked yet"
    containers: list[ContainerInfo] = field(default_factory=list)
    at: float = 0.0  # wall time of the pass; 0.0 before the first one


class NodeView:
    def __init__(self, node_id: str, apps: AppStore, drain: Drain, advertise_host: str = "127.0.0.1",
                 configured_publish_host: str = "", cluster_network: bool = False) -> None:
        self.node_id = node_id
        self.apps = apps
        self.drain = drain
        self.advertise_host = advertise_host
        # Where replicas' ports are published (pleaco.reconcile.publish).
        self.publish_host = publish_host(configured_publish_host, advertise_host)
        # Whether replicas run on the agent's own network (pleaco.reconcile.network) and are
        # dialled on their cluster address (container IP and port); else on the engine's
        # default bridge, dialled on their published port (the network disabled).
        self.cluster_network = cluster_network
        # The Docker network replicas run on, once the network loop made it on this node's
        # subnet ("" until then: replicas wait for it); always "" without the cluster network.
        self.network = ""
        # The resolvers replicas on that network get (HostConfig Dns): the network's gateway,
        # where the agent's service-name server listens (pleaco.reconcile.names); set by the
        # network loop with ``network``, so no replica starts on it without them.
        self.resolvers: tuple[str, ...] = ()
        # The service names' suffix ([network] suffix), set with them: a stack's replicas
        # search ``STACK.SUFFIX`` (pleaco.stacks.service).
        self.names_suffix = "internal"
        # Why it is not there, as the network loop last said ("" when it is, or no error yet).
        self.network_error = ""
        # Whether replicas' ports are published on the host as well ([network] publish_ports).
        self.publish_ports = not cluster_network
        self.observed = Observation()
        self.replicas: dict[ReplicaKey, ReplicaState] = {}
        self.images: dict[str, ImageState] = {}
        # Containers that passed health while their release was current: an older
        # release's container serves on during a rollout only if it was proven (a failed
        # release rolled back must not get traffic).
        self.proven: set[str] = set()
        self.passes = 0  # whole passes of the app loop since start
        # app -> its replicas that fit on no live node's memory, as the last pass planned.
        self.unplaced: dict[str, int] = {}
        # App -> why none of its replicas can be placed: no live node meets its constraints.
        self.unschedulable: dict[str, str] = {}
        # App -> why its replicas wait: the node that holds its volumes is down, or not
        # chosen yet (pleaco.stacks.volumes).
        self.volume_waits: dict[str, str] = {}

    # -- the one definition of healthy and serving -----------------------------------------

    def healthy(self, c: ContainerInfo, spec: AppSpec | None) -> bool:
        """A running replica of the current release whose probe passed (or that has no
        health path), as the app loop last saw it."""
        if spec is None or not c.running or c.release != spec.revision:
            return False
        st = self.replicas.get((c.app, c.replica))
        return bool(st and st.container_id == c.id and st.healthy)

    def serving(self, c: ContainerInfo, spec: AppSpec | None) -> bool:
        """Whether this node's container takes traffic: what this node's proxy routes to and
        what its ``route`` record tells the other nodes' proxies."""
        if spec is None or spec.port is None or not c.running or not self.address(c, spec):
            return False
        if self.drain.draining(c.id):
            return False
        if c.release == spec.revision:
            return self.healthy(c, spec)
        return c.id in self.proven

    # -- where a replica is reached ---------------------------------------------------------

    def address(self, c: ContainerInfo, spec: AppSpec | None) -> str:
        """Where proxies (this node's and the others', through the mesh) dial a replica
        (HOST:PORT), "" when it cannot be dialled: on the cluster network its container
        address and port, there only; else the address its port is published on."""
        if self.cluster_network:
            # By the network's fixed name, not ``network``: that is set by the network
            # loop's first step, and at an agent start the app loop's first pass (and the
            # proxy's routes) must not take the running replicas out of service.
            ip = c.address_on(DOCKER_NETWORK)
            return f"{ip}:{spec.port}" if ip and spec is not None and spec.port else ""
        return mesh_address(c.host_ip, c.host_port, self.advertise_host) if c.host_port else ""

    def probe_target(self, c: ContainerInfo, spec: AppSpec) -> tuple[str, int] | None:
        """Where this node probes a replica's health: where it dials it."""
        if self.cluster_network:
            address = self.address(c, spec)
            return hostport.split(address) if address else None
        return (local_dial_host(self.publish_host), c.host_port) if c.host_port else None

    # -- other reads ---------------------------------------------------------------------

    @property
    def warm(self) -> bool:
        """True once the app loop finished a whole pass (it saw the containers and probed
        them). Before that the view is empty or unprobed, and routing by it would take
        every replica out of the proxy for a moment at each agent start."""
        return self.passes > 0

    def containers_of(self, app: str) -> list[ContainerInfo]:
        return [c for c in self.observed.containers if c.app == app]

    def image_missing(self, image: str) -> bool:
        known = self.images.get(image)
        return known is not None and not known.present

    def reachable(self, address: str) -> bool:
        """Another node's loopback address is only ours too when we share one machine (then
        our advertised address is a loopback one as well); dialled from elsewhere it would
        reach whatever listens on that port here."""
        return not is_loopback(hostport.host_of(address)) or is_loopback(self.advertise_host)
