"""What a service name resolves to: the cluster addresses of the app's serving replicas on
every live node (pleaco.net.names asks this for each ``NAME.SUFFIX`` question).

This node's own replicas come from its view (fresher than its own route records), the other
nodes' from their ``route`` records: the same two sources and the same definition of
serving as ``apps show`` and the proxy, so a name never points where the proxy would not.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

from pleaco import hostport
from pleaco.reconcile.routes import RouteTable
from pleaco.reconcile.status import local_instances
from pleaco.reconcile.view import NodeView


def service_lookup(view: NodeView, routes: RouteTable,
                   live_nodes: Callable[[], Collection[str]]) -> Callable[[str], list[str] | None]:
    """``lookup(app)``: the hosts of its serving replicas' addresses (each once, in a stable
    order; the server shuffles them), [] when none serves, None when there is no such app."""

    def lookup(app: str) -> list[str] | None:
        spec = view.apps.get(app)
        if spec is None:
            return None
        hosts = set()
        for inst in local_instances(view, spec) + routes.instances(app, set(live_nodes())):
            if inst.serving and inst.address:
                try:
                    hosts.add(hostport.host_of(inst.address))
                except hostport.HostPortError:
                    continue  # another node's record we cannot read: not an answer
        return sorted(hosts)

    return lookup
