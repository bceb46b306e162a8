"""The network's tunables: the ``[network]`` table of pleaco.toml (env ``PLEACO_NETWORK_<NAME>``).

Checks that need the host (a CIDR overlapping the host's own networks or Docker's) are
made by the network loop at start, where the kernel's tables can be read; these are the
ones that need nothing but the values.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

MESH_MODES = ("auto", "host-gw", "wireguard")

# The Docker network replicas run on, and its Linux bridge (its own, not docker0: the
# default bridge's subnet and rules are the engine's, and a bridge of our name is easy to
# tell apart in `ip link`). Fixed names, not settings: every node's is the same, and other
# parts (service names, isolation rules) find them here.
DOCKER_NETWORK = "pleaco"
BRIDGE = "pleaco0"


@dataclass(frozen=True)
class NetworkSettings:
    # Whether the agent manages the network at all: its own Docker network, routes,
    # WireGuard, service names and isolation rules. Off, replicas run on the engine's
    # default bridge and are reached through published ports (pleaco before the network
    # existed): for hosts whose network someone else owns, and for test agents that share
    # one engine and one network namespace.
    enabled: bool = True
    # The cluster's container address space; each node claims one subnet of it. A /16 of
    # the 10/8 private range that Docker (172.17/16 and up), home routers (192.168/16) and
    # the common cloud VPC defaults (10.0/16, 172.31/16) do not use.
    cidr: str = "10.210.0.0/16"
    # The size of each node's subnet. A /24 holds 253 replicas per node, more than a node
    # runs, and a /16 holds 256 nodes, more than a cluster of equals gossiping among
    # themselves is meant for.
    subnet_prefix: int = 24
    # Apps resolve as NAME.SUFFIX from every container. "internal" is the name space
    # Uncloud and Docker Desktop use, and ICANN reserved .internal for private use (2024).
    suffix: str = "internal"
    # Seconds a resolver may keep a service name's answer. One: replicas come and go with
    # every rollout, failure and autoscale step, and a container should stop dialling a
    # gone replica within about the failure-detection time, not a cache lifetime later;
    # the server is on the container's own node, so asking again each second costs a
    # local round trip (the proxy's upstream DNS uses 1 s for the same reason).
    names_ttl: int = 1
    # Seconds a query for another name may wait on the host's resolvers (all of them, in
    # resolv.conf order, each an equal share) before the container gets SERVFAIL. Under
    # Docker's embedded DNS, which waits 4 s for us, and glibc's 5 s per try, so the
    # client hears a failure instead of timing out itself.
    names_forward_timeout: float = 3.0
    # Forwards in flight at once (each holds a socket until answered or timed out); a
    # query beyond them is dropped, and its client asks again. 256 covers a busy node's
    # containers several times over and keeps the sockets well under the agent's 1024
    # file descriptor default, even with the upstreams down.
    names_max_forwards: int = 256
    # TCP connections open at once (clients retrying a truncated answer, or asking over
    # TCP): a connection beyond them is closed at once.
    names_tcp_clients: int = 64
    # Encrypt traffic between nodes (WireGuard) even where they share an L2 segment.
    encrypt: bool = False
    # How nodes reach each other's subnets: "auto" (a route through the peer's host
    # address when it is on one of our links, WireGuard otherwise or when encrypt is set),
    # "host-gw" or "wireguard" for every peer.
    mesh: str = "auto"
    # WireGuard's UDP port and interface name on every node.
    wireguard_port: int = 51820
    wireguard_interface: str = "pleaco-wg"
    # The routing protocol number on every route the mesh makes (``ip route ... proto
    # 210``): how the agent finds its own routes after a restart and never touches anyone
    # else's. 210 is unassigned in iproute2's rt_protos (the routing daemons use 8-18, 42,
    # 99 and 186-192) and recalls the default cidr.
    route_protocol: int = 210
    # Publish app ports on the host as well. Off (the default) while the network is
    # enabled: proxies dial replicas on their cluster addresses through the mesh, so no
    # host port is needed and the client IP still reaches the app. With the network
    # disabled ports are always published (the only way in).
    publish_ports: bool = False

    def validate(self) -> list[str]:
        problems: list[str] = []
        try:
            net = ipaddress.IPv4Network(self.cidr, strict=True)
        except ValueError as exc:
            return [f"network.cidr: {self.cidr!r} is not an IPv4 network ({exc})"]
        if not net.is_private:
            problems.append(f"network.cidr: {self.cidr} is not a private range (RFC 1918)")
        if not net.prefixlen < self.subnet_prefix <= 28:
            problems.append(f"network.subnet_prefix: must be longer than the cidr's /{net.prefixlen} "
                            f"and at most 28, got {self.subnet_prefix}")
        if not re.fullmatch(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*",
                            self.suffix):
            problems.append(f"network.suffix: {self.suffix!r} is not a DNS name (lower-case labels)")
        if not 0 <= self.names_ttl <= 3600:
            problems.append(f"network.names_ttl: must be 0..3600 seconds, got {self.names_ttl}")
        if not 0 < self.names_forward_timeout <= 30:
            problems.append("network.names_forward_timeout: must be more than 0 and at most 30 seconds, "
                            f"got {self.names_forward_timeout}")
        if not 1 <= self.names_max_forwards <= 4096:
            problems.append(f"network.names_max_forwards: must be 1..4096, got {self.names_max_forwards}")
        if not 1 <= self.names_tcp_clients <= 1024:
            problems.append(f"network.names_tcp_clients: must be 1..1024, got {self.names_tcp_clients}")
        if self.mesh not in MESH_MODES:
            problems.append(f"network.mesh: expected one of {', '.join(MESH_MODES)}, got {self.mesh!r}")
        if not 1 <= self.wireguard_port <= 65535:
            problems.append(f"network.wireguard_port: must be 1..65535, got {self.wireguard_port}")
        if not re.fullmatch(r"[A-Za-z0-9_=+.-]{1,15}", self.wireguard_interface):
            problems.append(f"network.wireguard_interface: {self.wireguard_interface!r} is not an "
                            "interface name (1-15 letters, digits, _=+.-)")
        if self.encrypt and self.mesh == "host-gw":
            problems.append('network.encrypt = true needs WireGuard, but network.mesh = "host-gw" never makes it '
                            '(use mesh = "auto" or "wireguard")')
        if not 5 <= self.route_protocol <= 254:
            problems.append(f"network.route_protocol: must be 5..254 (0-4 are the kernel's), got {self.route_protocol}")
        return problems
