"""The host's own addresses and networks, as the kernel's tables say (pyroute2).

Two questions are answered here, both from one read of the main routing table and the
IPv4 addresses (``read_host_tables``), and both as pure functions of that read so they are
tested with hand-made tables:

- which address this node advertises to the cluster when none is configured: the source
  address of the default route (``default_source``), the address the kernel itself would
  send from towards other machines. ``gethostbyname(hostname)``, used before, is 127.0.1.1
  on a stock Debian machine (its /etc/hosts says so), which made clusters gossip over
  loopback;
- which networks the host already uses (``host_networks``), so that a cluster CIDR
  overlapping one is refused before anything is made.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Collection, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

# The kernel's main routing table (RT_TABLE_MAIN): where the default route and the
# interfaces' own networks are. The local table holds the host's addresses as /32s, which
# the address dump gives already.
MAIN_TABLE = 254
RTN_UNICAST = 1
AF_INET = 2


@dataclass(frozen=True)
class RouteEntry:
    """One IPv4 route of the main table."""

    dst: ipaddress.IPv4Network
    ifname: str = ""
    gateway: str = ""
    prefsrc: str = ""  # the source address the route names, "" when it names none
    oif: int = 0
    priority: int = 0  # the metric: the lowest wins among routes to the same destination


@dataclass(frozen=True)
class AddressEntry:
    """One IPv4 address of an interface, with its network."""

    interface: ipaddress.IPv4Interface
    index: int
    ifname: str


@dataclass(frozen=True)
class HostTables:
    routes: tuple[RouteEntry, ...]
    addresses: tuple[AddressEntry, ...]


def read_host_tables() -> HostTables:
    """The main table's IPv4 unicast routes and every IPv4 address, from the kernel.
    Raises OSError when netlink cannot be read. Callable from the agent's event loop:
    pyroute2 (0.9) drives netlink with an asyncio loop of its own, which cannot run in a
    thread whose loop runs already, so the read gets a short-lived thread of its own."""
    with ThreadPoolExecutor(1, thread_name_prefix="netlink") as pool:
        return pool.submit(_read_host_tables).result()


def _read_host_tables() -> HostTables:
    from pyroute2 import IPRoute  # imported here: only the agent needs netlink, not the CLI

    with IPRoute() as ipr:
        names = {int(link["index"]): str(link.get_attr("IFLA_IFNAME") or "") for link in ipr.get_links()}
        routes = []
        for r in ipr.get_routes(family=AF_INET):
            table = r.get_attr("RTA_TABLE") or r.get("table")
            if table != MAIN_TABLE or r.get("type") != RTN_UNICAST:
                continue
            oif = int(r.get_attr("RTA_OIF") or 0)
            dst = ipaddress.IPv4Network(f"{r.get_attr('RTA_DST') or '0.0.0.0'}/{int(r.get('dst_len') or 0)}",
                                        strict=False)
            routes.append(RouteEntry(dst, names.get(oif, ""), str(r.get_attr("RTA_GATEWAY") or ""),
                                     str(r.get_attr("RTA_PREFSRC") or ""), oif, int(r.get_attr("RTA_PRIORITY") or 0)))
        addresses = [
            AddressEntry(ipaddress.IPv4Interface(f"{a.get_attr('IFA_ADDRESS')}/{int(a['prefixlen'])}"),
                         int(a["index"]), names.get(int(a["index"]), ""))
            for a in ipr.get_addr(family=AF_INET) if a.get_attr("IFA_ADDRESS")
        ]
    return HostTables(tuple(routes), tuple(addresses))


def default_source(tables: HostTables) -> str | None:
    """The source address of the default route (the lowest metric if several): its
    ``prefsrc`` when it names one, else the address of its interface on the gateway's
    network (what the kernel picks), else that interface's first address. None when there
    is no default route, or its interface has no IPv4 address."""
    defaults = sorted((r for r in tables.routes if r.dst.prefixlen == 0), key=lambda r: r.priority)
    for route in defaults:
        if route.prefsrc:
            return route.prefsrc
        own = [a.interface for a in tables.addresses if a.index == route.oif and not a.interface.ip.is_loopback]
        if route.gateway:
            gateway = ipaddress.IPv4Address(route.gateway)
            for iface in own:
                if gateway in iface.network:
                    return str(iface.ip)
        if own:
            return str(own[0].ip)
    return None


@dataclass(frozen=True)
class HostNetwork:
    """A network the host uses, and where it was seen (for the error that names it)."""

    network: ipaddress.IPv4Network
    source: str  # "route 10.77.70.0/24 dev eth0", "address 10.77.70.2/24 on eth0"


def host_networks(tables: HostTables, ignore_interfaces: Collection[str] = (),
                  ignore_routes_in: ipaddress.IPv4Network | None = None,
                  ignore_prefix: int = 0) -> list[HostNetwork]:
    """The networks of the host's routes (the default route aside) and addresses (loopback
    aside), except what pleaco made itself: anything on ``ignore_interfaces`` (its bridge,
    its WireGuard interface), and routes through a gateway to one node subnet
    (``ignore_prefix`` long, inside ``ignore_routes_in``: the mesh's host-gw routes to the
    other nodes, through their host addresses)."""
    found: list[HostNetwork] = []
    for r in tables.routes:
        if r.dst.prefixlen == 0 or r.ifname in ignore_interfaces or r.dst.is_loopback:
            continue
        if (ignore_routes_in is not None and r.gateway and r.dst.prefixlen == ignore_prefix
                and r.dst.subnet_of(ignore_routes_in)):
            continue
        via = f" via {r.gateway}" if r.gateway else ""
        found.append(HostNetwork(r.dst, f"route {r.dst}{via} dev {r.ifname or r.oif}"))
    for a in tables.addresses:
        if a.ifname in ignore_interfaces or a.interface.ip.is_loopback:
            continue
        found.append(HostNetwork(a.interface.network, f"address {a.interface} on {a.ifname or a.index}"))
    return found


def overlapping(cidr: ipaddress.IPv4Network, networks: Iterable[HostNetwork]) -> list[HostNetwork]:
    return [n for n in networks if n.network.overlaps(cidr)]


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def loopback_mismatch(own_host: str, others: Iterable[str], who: str = "this node") -> str | None:
    """Why ``own_host`` must not be advertised to a cluster whose members (``others``, their
    hosts) are reached at these addresses: a loopback address among non-loopback members
    would have every other machine gossip with itself. None when it is fine (a cluster on
    one machine, all on loopback, is)."""
    if not is_loopback(own_host):
        return None
    remote = sorted({h for h in others if h and not is_loopback(h)})
    if not remote:
        return None
    return (f"{who} would advertise the loopback address {own_host} to a cluster whose members are "
            f"on other machines ({', '.join(remote[:3])}); set `advertise` (or --advertise) to an address "
            "they reach, or give this host a default route")
