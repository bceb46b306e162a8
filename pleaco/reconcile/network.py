"""The network loop: this node holds a subnet of the cluster CIDR, runs its replicas on a
Docker network of its own on that subnet, and tells the mesh where every other node is.

Each step (every ``INTERVAL`` seconds, or sooner when a ``subnet`` or ``node`` record or the
membership changes):
1. reads the ``subnet`` records and decides the subnet this node holds
   (pleaco.net.subnets: the earlier claim keeps a subnet, the later moves), and rewrites its
   own record when that changed;
2. makes the Docker network ``pleaco`` (bridge ``pleaco0``) match it: created when missing,
   adopted when it is right already, and re-made when the subnet moved (this node's
   replicas on the old one are removed first; the app loop starts them again on the new);
3. connects this node's running replicas that are not on it (made by an earlier version,
   on the engine's default bridge) without restarting them;
4. hands the view the network's name once it is right (until then the app loop starts no
   replica), and the mesh the list of live peers with their subnets (``Mesh.apply``).

Every step is safe to run again: each part compares what is with what should be.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pleaco import hostport, logs
from pleaco.net import wireguard
from pleaco.net.addresses import HostTables, host_networks
from pleaco.net.config import BRIDGE, DOCKER_NETWORK, NetworkSettings
from pleaco.net.peer import Mesh, Peer
from pleaco.net.subnets import KIND, Claim, check_cidr, choose, gateway_of, holders, parse_claim
from pleaco.reconcile.loop import Loop
from pleaco.reconcile.view import NodeView
from pleaco.runtime.docker import LABEL_NODE, LABEL_ROLE, NetworkInfo, NetworkSpec, NotFound
from pleaco.runtime.engine import NetworkEngine
from pleaco.store import Store

log = logs.get("pleaco.reconcile.network")

# Seconds between steps when nothing wakes the loop: record and membership changes wake it
# at once, so this only bounds how long a network removed by hand stays missing.
INTERVAL = 5.0
ROLE = "network"


class NetworkError(RuntimeError):
    """The node's network cannot be made as it should (logged by the runner, retried)."""


@dataclass(frozen=True)
class LiveMember:
    """A live member as the network needs it: its id and advertised (gossip) address."""

    node_id: str
    addr: str  # HOST:PORT


def check_host(settings: NetworkSettings, tables: HostTables, docker_subnets: Sequence[tuple[str, str]],
               nodes: int) -> list[str]:
    """The start-time check of the cluster CIDR on this host (pleaco.net.subnets.check_cidr),
    with what pleaco made itself set aside: its bridge and WireGuard interface, the mesh's
    routes to other nodes' subnets, and its own Docker network."""
    cidr = ipaddress.IPv4Network(settings.cidr)
    host = host_networks(tables, ignore_interfaces={BRIDGE, settings.wireguard_interface},
                         ignore_routes_in=cidr, ignore_prefix=settings.subnet_prefix)
    return check_cidr(settings, host, [(n, s) for n, s in docker_subnets if n != DOCKER_NETWORK], nodes)


def mesh_fields(node_id: str, node_record: dict[str, object]) -> tuple[str, int]:
    """A peer's WireGuard public key and port, from its ``node`` record, verified against
    the node's identity (pleaco.net.wireguard). ("", 0) for a node that runs no WireGuard
    or whose key does not check."""
    return wireguard.verified_key(node_id, node_record)


class NetworkLoop(Loop):
    name = "network"
    interval = INTERVAL

    def __init__(self, settings: NetworkSettings, store: Store, view: NodeView, runtime: NetworkEngine,
                 mesh: Mesh, advertised: Callable[[], str], live_members: Callable[[], list[LiveMember]],
                 ready: Callable[[], bool], on_ready: Callable[[], None]) -> None:
        super().__init__()
        self.settings = settings
        self.cidr = ipaddress.IPv4Network(settings.cidr)
        self.store = store
        self.view = view
        self.me = view.node_id
        self.runtime = runtime
        self.mesh = mesh
        # This node's advertised address (HOST:PORT): the mesh's own host.
        self.advertised = advertised
        # The other live members: whose subnets the mesh routes to.
        self.live_members = live_members
        # Whether this node has heard the cluster: before, it would claim a subnet another
        # node holds only because their records have not arrived yet.
        self.ready = ready
        self.on_ready = on_ready  # wakes the app loop once its network is there
        self.subnet: ipaddress.IPv4Network | None = None
        self.last_error = ""

    def claims(self) -> list[Claim]:
        out = []
        for rec in self.store.records(KIND):
            if self.store.revoked_at(rec.key) is not None:
                continue  # a removed node's claim (its delete may not have arrived yet)
            claim = parse_claim(rec.key, rec.value, rec.ts)
            if claim is not None:
                out.append(claim)
        return out

    async def step(self) -> str | None:
        try:
            return await self._step()
        except Exception as exc:
            # The runner logs it and retries; apps show says why replicas wait.
            self.view.network_error = f"{type(exc).__name__}: {exc}"
            raise

    async def _step(self) -> str | None:
        if not self.ready():
            return "waiting"
        claims = self.claims()
        subnet = choose(self.me, claims, self.cidr, self.settings.subnet_prefix)
        if subnet is None:
            self._fail(f"no free subnet of /{self.settings.subnet_prefix} is left in network.cidr {self.cidr} "
                       f"({len(claims)} claimed); choose a larger cidr or a longer subnet_prefix")
            return "no_subnet"
        mine = next((c for c in claims if c.node == self.me), None)
        if mine is None or mine.subnet != subnet:
            rec = self.store.put(KIND, self.me, {"subnet": str(subnet)})
            log.info("network.subnet_claimed", subnet=str(subnet),
                     moved_from=str(mine.subnet) if mine else "", reason="taken" if mine else "first claim")
            claims = [c for c in claims if c.node != self.me] + [Claim(self.me, subnet, rec.ts)]
        self.subnet = subnet
        ready = await self.blocking(self._ensure_network, subnet)
        network = DOCKER_NETWORK if ready else ""
        self.view.resolvers = (str(gateway_of(subnet)),) if ready else ()
        self.view.names_suffix = self.settings.suffix
        if network != self.view.network:
            self.view.network = network
            if network:
                log.info("network.ready", network=network, subnet=str(subnet))
                self.on_ready()
        if not ready:
            return "moving"
        await self.blocking(self._connect_replicas)
        self.last_error = self.view.network_error = ""
        me = Peer(self.me, hostport.host_of(self.advertised()), subnet, *self._mesh_fields(self.me))
        await self.blocking(self.mesh.apply, me, self.peers(claims))
        return None

    def peers(self, claims: list[Claim]) -> list[Peer]:
        """The live members with a subnet they hold, as the mesh needs them."""
        held = {c.node: c.subnet for c in holders(claims).values()}
        out = []
        for m in self.live_members():
            subnet = held.get(m.node_id)
            if m.node_id == self.me or subnet is None:
                continue
            out.append(Peer(m.node_id, hostport.host_of(m.addr), subnet, *self._mesh_fields(m.node_id)))
        return sorted(out, key=lambda p: p.node_id)

    def _mesh_fields(self, node_id: str) -> tuple[str, int]:
        return mesh_fields(node_id, self.store.value("node", node_id) or {})

    def _fail(self, error: str) -> None:
        if error != self.last_error:
            log.error("network.failed", error=error)
            self.last_error = error
        self.view.network, self.view.network_error = "", error

    # -- the Docker network --------------------------------------------------------------

    def _ensure_network(self, subnet: ipaddress.IPv4Network) -> bool:
        """Make the ``pleaco`` network sit on ``subnet``; True once it does. False while
        this node's replicas on an old subnet are being removed (the next step re-makes it)."""
        info = self.runtime.find_network(DOCKER_NETWORK)
        owner = info.labels.get(LABEL_NODE, "") if info is not None else ""
        if owner and owner != self.me:
            raise NetworkError(f"Docker network {DOCKER_NETWORK!r} on this engine is node {owner[:12]}'s: agents "
                               "that share one engine must run with [network] enabled = false")
        if info is not None and info.driver == "bridge" and info.subnets == (str(subnet),):
            return True  # right already (made by an earlier life of this agent, or adopted)
        if info is not None:
            if info.containers:
                self._leave(info, subnet)
                return False
            self.runtime.remove_network(DOCKER_NETWORK)
            log.info("network.removed", network=DOCKER_NETWORK, subnet=",".join(info.subnets))
        self.runtime.create_network(NetworkSpec(DOCKER_NETWORK, str(subnet), str(gateway_of(subnet)), BRIDGE,
                                                {LABEL_ROLE: ROLE, LABEL_NODE: self.me}))
        log.info("network.created", network=DOCKER_NETWORK, subnet=str(subnet), bridge=BRIDGE)
        return True

    def _leave(self, info: NetworkInfo, subnet: ipaddress.IPv4Network) -> None:
        """The subnet moved under running replicas: remove this node's (the app loop starts
        them again on the new network); anything else attached stays, and is an error."""
        self.view.network = ""  # no replica starts on the old network meanwhile
        foreign = []
        for cid in info.containers:
            try:
                self.runtime.remove(cid, self.me)
                log.info("network.replica_moved", container=cid[:12], old=",".join(info.subnets), new=str(subnet))
            except PermissionError:
                foreign.append(cid[:12])
        if foreign:
            raise NetworkError(f"Docker network {DOCKER_NETWORK!r} is on {','.join(info.subnets)} but this node "
                               f"holds {subnet}, and containers pleaco does not manage are attached to it "
                               f"({', '.join(foreign)}): disconnect them")

    def _connect_replicas(self) -> None:
        """Replicas made before the agent managed the network (on the engine's default
        bridge, an earlier version's) join it as well, running: they get a cluster address
        without a restart."""
        for c in self.runtime.list_managed(self.me):
            if c.running and not c.address_on(DOCKER_NETWORK):
                try:
                    self.runtime.connect_network(DOCKER_NETWORK, c.id, self.me)
                except NotFound:
                    continue  # removed meanwhile
                log.info("network.replica_connected", app=c.app, replica=c.replica, container=c.id[:12])

    def close(self) -> None:
        """At agent stop: the mesh removes its routes and tunnels. The Docker network
        stays, with the replicas on it (they outlive the agent)."""
        self.mesh.close()
