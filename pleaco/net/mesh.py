"""The kernel mesh: routes (host-gw) and WireGuard to every peer's subnet, chosen per peer.

For each peer: a route through its host address when that address is on one of our links
(host-gw: no tunnel, no encryption, the full speed of the link), WireGuard when it is not,
or for every peer with ``network.encrypt = true`` or ``network.mesh = "wireguard"``. A peer
that can be reached neither way (not on our links and no verified WireGuard key) gets no
route, and a warning.

Docker masquerades what its containers send outside their bridge; between cluster subnets
a NAT rule of ours comes first and leaves the container's own address on the packet, so the
peer (and the app behind it) sees which container spoke. A rule in DOCKER-USER lets the
cluster's subnets into ours (the engine drops forwarded traffic to a bridge it did not
publish a port for).
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from pleaco import logs
from pleaco.net import firewall, routes, wireguard
from pleaco.net.config import NetworkSettings
from pleaco.net.isolation import Isolation
from pleaco.net.peer import Peer
from pleaco.net.subnets import gateway_of

log = logs.get("pleaco.net")

HOST_GW = "host-gw"
WIREGUARD = "wireguard"
NAT_CHAIN = "PLEACO-MESH-nat"
FWD_CHAIN = "PLEACO-MESH-fwd"


def choose(settings: NetworkSettings, peer: Peer, on_link: bool) -> str | None:
    """How this host reaches ``peer``'s subnet: HOST_GW, WIREGUARD, or None (it cannot)."""
    has_key = bool(peer.wg_key) and peer.wg_port > 0
    if settings.mesh == HOST_GW:
        return HOST_GW if on_link else None
    if settings.mesh == WIREGUARD or settings.encrypt:
        # Never falls back to plain routes: encrypt means encrypted or nothing.
        return WIREGUARD if has_key else None
    if on_link:
        return HOST_GW
    return WIREGUARD if has_key else None


@dataclass(frozen=True)
class Plan:
    """What the kernel should hold for one peer list."""

    routes: list[routes.Route] = field(default_factory=list)
    wg_peers: list[wireguard.WgPeer] = field(default_factory=list)
    unreachable: list[str] = field(default_factory=list)  # node ids


def plan(settings: NetworkSettings, me: Peer, peers: Sequence[Peer], on_link: Callable[[str], bool],
         src: str | None = None) -> Plan:
    """The routes and WireGuard peers for ``peers`` as seen from ``me``. ``src``: our own
    address in our subnet, that the host's own packets into the tunnel leave with (so the
    answers come back through it)."""
    out = Plan()
    seen: set[ipaddress.IPv4Network] = {me.subnet}
    for p in sorted(peers, key=lambda p: p.node_id):
        if p.node_id == me.node_id:
            continue
        if any(p.subnet.overlaps(s) for s in seen):
            log.warning("mesh.subnet_overlap", member=p.node_id, subnet=str(p.subnet))
            out.unreachable.append(p.node_id)
            continue
        how = choose(settings, p, on_link(p.host))
        if how == HOST_GW:
            out.routes.append(routes.Route(p.subnet, gateway=p.host))
        elif how == WIREGUARD:
            out.wg_peers.append(wireguard.WgPeer(p.wg_key, f"{p.host}:{p.wg_port}", p.subnet))
            out.routes.append(routes.Route(p.subnet, dev=settings.wireguard_interface, src=src))
        else:
            out.unreachable.append(p.node_id)
            continue
        seen.add(p.subnet)
    return out


def other_hosts(me: Peer, peers: Sequence[Peer]) -> list[str]:
    """The addresses of the other nodes that our containers must not open connections to
    (pleaco/net/isolation.py): each one's host address, and its bridge's address on its
    subnet. The mesh routes the latter to that node, which answers it as its own: its
    INPUT isolation covers only what comes from its own bridge, so a container here would
    otherwise reach every service listening on all of that node's addresses."""
    out: list[str] = []
    for p in peers:
        if p.node_id != me.node_id:
            out += [p.host, str(gateway_of(p.subnet))]
    return out


def nat_rules(subnet: ipaddress.IPv4Network, cidr: str) -> list[str]:
    # ACCEPT in the nat table ends NAT for the packet: the engine's MASQUERADE below never sees it.
    return [f"-A {NAT_CHAIN} -s {subnet} -d {cidr} -j ACCEPT"]


def forward_rules(subnet: ipaddress.IPv4Network, cidr: str) -> list[str]:
    # Only in. Out, the engine's rules let our subnet's packets through after some ten
    # rules of its own; accepting them here first saved 3-9 % of a stream's CPU, but it
    # would also let new connections past the isolation chain whenever this chain's jump
    # comes first in DOCKER-USER (after a restart), and limited to established
    # connections the saving was within the noise (benchmarks/README.md, network).
    return [f"-A {FWD_CHAIN} -s {cidr} -d {subnet} -j ACCEPT"]


class KernelMesh:
    """The Mesh of pleaco/net/peer.py, in the calling process's network namespace."""

    def __init__(self, settings: NetworkSettings, data_dir: Path, isolation: Isolation | None = None) -> None:
        self.settings = settings
        # The app network's isolation, applied with the peers' host addresses at each pass
        # (their services are refused too); left in place by close(), see isolation.py.
        self.isolation = isolation
        self.table = routes.RouteTable(settings.route_protocol)
        self.key = wireguard.load_or_create_key(data_dir)
        self.wg = wireguard.Interface(settings.wireguard_interface, settings.wireguard_port,
                                      data_dir / wireguard.KEY_FILE)
        self._unreachable: set[str] = set()

    def apply(self, me: Peer, peers: Sequence[Peer]) -> None:
        p = plan(self.settings, me, peers, routes.on_link, routes.local_address_in(me.subnet))
        for node in set(p.unreachable) - self._unreachable:
            log.warning("mesh.peer_unreachable", member=node, mesh=self.settings.mesh,
                        error="not on our links and no verified WireGuard key")
        self._unreachable = set(p.unreachable)
        # The interface before the routes into it; the routes out before the interface goes.
        if p.wg_peers:
            self.wg.ensure()
            self.wg.sync(p.wg_peers)
        self.table.sync(p.routes)
        if not p.wg_peers:
            self.wg.remove()
        self._rules(me.subnet)
        if self.isolation is not None:
            self.isolation.apply(other_hosts(me, peers))

    def _rules(self, subnet: ipaddress.IPv4Network) -> None:
        cidr = str(ipaddress.IPv4Network(self.settings.cidr))
        firewall.restore("iptables-restore", [NAT_CHAIN], nat_rules(subnet, cidr), "the mesh's NAT rules",
                         table="nat")
        firewall.hook("iptables", "POSTROUTING", NAT_CHAIN, table="nat", first=True)
        firewall.restore("iptables-restore", [FWD_CHAIN], forward_rules(subnet, cidr), "the mesh's forward rules")
        firewall.hook("iptables", firewall.forward_parent(), FWD_CHAIN)

    def close(self) -> None:
        """Remove the routes, the WireGuard interface and the mesh's rules. Callable from
        an event loop's thread (the agent's stop): pyroute2's synchronous API runs an event
        loop of its own, which cannot start there, so the work goes to a thread then."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            self._close()
            return
        with ThreadPoolExecutor(1, thread_name_prefix="mesh-close") as pool:
            pool.submit(self._close).result()

    def _close(self) -> None:
        self.table.clear()
        self.wg.remove()
        firewall.remove("iptables", "POSTROUTING", NAT_CHAIN, table="nat")
        for parent in ("DOCKER-USER", "FORWARD"):
            firewall.remove("iptables", parent, FWD_CHAIN)
        log.info("mesh.closed")

