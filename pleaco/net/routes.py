"""Routes to other nodes' container subnets, in the calling process's network namespace.

Every route pleaco makes carries its own routing protocol number (``network.route_protocol``,
as ``ip route ... proto N`` shows it): after a restart, the routes of nodes that left while
the agent was down are found by that number and removed, and no route anyone else made
(the kernel's, DHCP's, the engine's, an operator's) is ever touched.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from pleaco import logs

log = logs.get("pleaco.net")

MAIN_TABLE = 254
RTN_UNICAST = 1


class RouteError(RuntimeError):
    """The kernel refused a route (not root, no such device, a bad gateway)."""


@dataclass(frozen=True)
class Route:
    """A route to one peer's subnet: through its host address (``gateway``, host-gw) or
    into an interface (``dev``, WireGuard), with ``src`` the address the host's own packets
    leave with (None: the kernel's choice)."""

    dst: ipaddress.IPv4Network
    gateway: str | None = None
    dev: str | None = None
    src: str | None = None


def on_link(host: str) -> bool:
    """True when ``host`` is on one of our directly connected links: the kernel reaches it
    without a gateway, on an interface other than loopback (host-gw can point at it)."""
    try:
        addr = ipaddress.IPv4Address(host)
    except ValueError:
        return False
    if addr.is_loopback or addr.is_unspecified:
        return False
    with IPRoute() as ipr:
        try:
            got = ipr.route("get", dst=str(addr))
        except NetlinkError:  # unreachable
            return False
    return bool(got) and got[0]["type"] == RTN_UNICAST and got[0].get("gateway") is None


def local_address_in(net: ipaddress.IPv4Network) -> str | None:
    """One of this host's addresses inside ``net`` (a Docker network's gateway), or None."""
    with IPRoute() as ipr:
        for msg in ipr.get_addr(family=2):
            addr = msg.get("address")
            if addr and ipaddress.IPv4Address(addr) in net:
                return str(addr)
    return None


class RouteTable:
    """The routes of one protocol number in the main table, made to match a list."""

    def __init__(self, proto: int) -> None:
        if not 5 <= proto <= 254:  # 0-4 are the kernel's own (unspec, redirect, kernel, boot, static)
            raise ValueError(f"route protocol must be 5..254, got {proto}")
        self.proto = proto

    def current(self) -> list[Route]:
        with IPRoute() as ipr:
            msgs = ipr.route("dump", table=MAIN_TABLE, proto=self.proto, family=2)
            names = {link["index"]: link.get("ifname") for link in ipr.get_links()}
        out = []
        for m in msgs:
            if m["proto"] != self.proto or m.get("table") != MAIN_TABLE:
                continue
            dst = ipaddress.IPv4Network(f"{m.get('dst') or '0.0.0.0'}/{m['dst_len']}")
            gw = m.get("gateway")
            out.append(Route(dst, gateway=gw, dev=None if gw else names.get(m.get("oif")),
                             src=m.get("prefsrc")))
        return out

    def sync(self, wanted: Sequence[Route]) -> None:
        """Add the missing, replace the changed, delete ours that are not wanted."""
        have = {r.dst: r for r in self.current()}
        want = {r.dst: r for r in wanted}
        with IPRoute() as ipr:
            for dst, r in have.items():
                if dst not in want:
                    self._call(ipr, "del", r)
                    log.info("mesh.route_removed", dst=str(dst))
            for dst, r in want.items():
                if have.get(dst) != r:
                    self._call(ipr, "replace", r)
                    log.info("mesh.route_set", dst=str(dst), via=r.gateway or "", dev=r.dev or "")

    def clear(self) -> None:
        self.sync([])

    def _call(self, ipr: IPRoute, op: str, r: Route) -> None:
        spec: dict[str, object] = {"dst": str(r.dst), "table": MAIN_TABLE, "proto": self.proto}
        if r.gateway:
            spec["gateway"] = r.gateway
        if r.dev:
            idx = ipr.link_lookup(ifname=r.dev)
            if not idx:
                raise RouteError(f"route to {r.dst}: no interface {r.dev!r}")
            spec["oif"] = idx[0]
            spec["scope"] = 253  # link: the peer's subnet is behind the tunnel, no gateway
        if r.src:
            spec["prefsrc"] = r.src
        try:
            ipr.route(op, **spec)
        except NetlinkError as exc:
            if op == "del" and exc.code == 3:  # ESRCH: already gone
                return
            raise RouteError(f"cannot {op} the route to {r.dst} ({exc})") from exc
