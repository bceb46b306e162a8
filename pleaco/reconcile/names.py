"""Service names on this node: the name server's loop, and what a name resolves to.

``service_lookup`` answers the name server (pleaco.net.names) for each ``NAME.SUFFIX``
question: the cluster addresses of the app's serving replicas on every live node.

This node's own replicas come from its view (fresher than its own route records), the other
nodes' from their ``route`` records: the same two sources and the same definition of
serving as ``apps show`` and the proxy, so a name never points where the proxy would not.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Collection

from pleaco import hostport, logs
from pleaco.apps import AppStore
from pleaco.metrics import Counter, Registry
from pleaco.net.config import NetworkSettings
from pleaco.net.names import PORT, Lookup, NameServer, StackLookup
from pleaco.net.subnets import gateway_of
from pleaco.reconcile.loop import Loop
from pleaco.reconcile.routes import RouteTable
from pleaco.reconcile.status import local_instances
from pleaco.reconcile.view import NodeView

log = logs.get("pleaco.reconcile.names")

# Seconds between steps when nothing wakes the loop: the network loop wakes it when the
# network is (re)made; this only paces the retries of a bind that failed.
INTERVAL = 5.0


def service_lookup(view: NodeView, routes: RouteTable, live_nodes: Callable[[], Collection[str]],
                   cidr: str) -> Callable[[str], list[str] | None]:
    """``lookup(app)``: the hosts of its serving replicas' addresses (each once, in a stable
    order; the server shuffles them), [] when none serves, None when there is no such app.
    Only cluster addresses (in ``cidr``) count: a node with the network off says where its
    port is published on its host, which the app's own port does not reach."""
    cluster = ipaddress.IPv4Network(cidr)

    def lookup(app: str) -> list[str] | None:
        spec = view.apps.get(app)
        if spec is None:
            return None
        hosts: set[str] = set()
        for inst in local_instances(view, spec) + routes.instances(app, set(live_nodes())):
            if inst.serving and inst.address:
                try:
                    host = ipaddress.IPv4Address(hostport.host_of(inst.address))
                except ValueError:  # HostPortError too: another node's record we cannot read
                    continue
                if host in cluster:
                    hosts.add(str(host))
        return sorted(hosts)

    return lookup


def stack_app(apps: AppStore) -> StackLookup:
    """``stack_app(stack, service)``: app ``STACK-SERVICE`` when it is that stack's service
    (its spec says so: an app of that name outside the stack is not found this way)."""

    def find(stack: str, service: str) -> str | None:
        spec = apps.get(f"{stack}-{service}")
        return spec.name if spec is not None and spec.stack == stack else None

    return find


class NameServerLoop(Loop):
    """Keeps the node's name server listening on its network's gateway (port 53), for the
    containers of its subnet: started once the network loop made the network, moved when
    the subnet moves, closed at agent stop. A bind that fails (port 53 of the gateway taken)
    is an error the runner logs and retries; replicas keep the gateway as their resolver
    meanwhile, so their lookups fail loudly rather than silently bypass the names."""

    name = "names"
    interval = INTERVAL

    def __init__(self, settings: NetworkSettings, view: NodeView, subnet: Callable[[], ipaddress.IPv4Network | None],
                 lookup: Lookup, registry: Registry | None = None, port: int = PORT,
                 stack_app: StackLookup | None = None) -> None:
        super().__init__()
        self.settings = settings
        self.view = view
        self.subnet = subnet  # the subnet this node holds (the network loop's), None before it has one
        self.lookup = lookup
        self.stack_app = stack_app
        self.port = port
        self.server: NameServer | None = None
        self.metric = registry.register(Counter(
            "pleaco_names_queries_total", "Queries to the service-name server by what became of them: answered "
            "(under the suffix), forwarded, malformed, foreign (not from the node's subnet: dropped), busy "
            "(beyond the forwards in flight: dropped), upstream_failed (SERVFAIL).", ("result",))) \
            if registry is not None else None

    async def step(self) -> str | None:
        subnet = self.subnet() if self.view.network else None
        if subnet is None:
            return "waiting"
        gateway = str(gateway_of(subnet))
        if self.server is not None and (self.server.listen_host, self.server.clients) != (gateway, [subnet]):
            await self.server.move(gateway, [str(subnet)])  # raises, still where it was, on failure
        if self.server is None:
            s = self.settings
            server = NameServer(gateway, self.port, self.lookup, s.suffix, None, clients=[str(subnet)], ttl=s.names_ttl,
                                forward_timeout=s.names_forward_timeout, max_forwards=s.names_max_forwards,
                                tcp_clients=s.names_tcp_clients, metric=self.metric,
                                stack_app=self.stack_app)
            await server.start()
            self.server = server
        return None

    async def teardown(self) -> None:
        if self.server is not None:
            await self.server.close()
            self.server = None
