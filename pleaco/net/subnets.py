"""A subnet per node, cut from the cluster CIDR, and the rule that keeps them distinct.

Each node claims one subnet by writing its own ``subnet`` record (key: its node id, value
``{"subnet": "10.210.N.0/24"}``). Only the node writes its record, so last-writer-wins
never hides a claim: two nodes that claim one subnet at once both keep their records, and
every node sees both. The rule is leaderless and the same everywhere: the claim with the
earlier HLC timestamp (total order: ties broken by node id) keeps the subnet; the later one
moves to the lowest subnet nobody claims and rewrites its record. A node's record is
deleted when the node is removed from the cluster (``nodes rm``); a node that only stops
keeps it, since its replicas outlive the agent on that subnet.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass

from pleaco.errors import InvalidInput
from pleaco.net.addresses import HostNetwork, overlapping
from pleaco.net.config import NetworkSettings
from pleaco.store.hlc import Timestamp

KIND = "subnet"


class NetworkConfigError(InvalidInput, ValueError, code="invalid_network"):
    """The [network] settings cannot work on this host or for this cluster."""


@dataclass(frozen=True)
class Claim:
    """One node's ``subnet`` record."""

    node: str
    subnet: ipaddress.IPv4Network
    ts: Timestamp


def parse_claim(node: str, value: dict[str, object] | None, ts: Timestamp) -> Claim | None:
    """A record's claim; None for a deleted or malformed one (it claims nothing)."""
    raw = (value or {}).get("subnet")
    if not isinstance(raw, str):
        return None
    try:
        return Claim(node, ipaddress.IPv4Network(raw, strict=True), ts)
    except ValueError:
        return None


def subnets_of(cidr: ipaddress.IPv4Network, prefix: int) -> Iterator[ipaddress.IPv4Network]:
    """The cluster's subnets, lowest first."""
    return cidr.subnets(new_prefix=prefix)


def holders(claims: Iterable[Claim]) -> dict[ipaddress.IPv4Network, Claim]:
    """Who holds each claimed subnet: its earliest claim. A claim that overlaps an earlier
    one without being the same subnet (a record written under another subnet_prefix) loses
    as well."""
    held: dict[ipaddress.IPv4Network, Claim] = {}
    for claim in sorted(claims, key=lambda c: c.ts):
        if not any(claim.subnet.overlaps(other) for other in held):
            held[claim.subnet] = claim
    return held


def choose(me: str, claims: Collection[Claim], cidr: ipaddress.IPv4Network,
           prefix: int) -> ipaddress.IPv4Network | None:
    """The subnet node ``me`` should hold: the one it claims when its claim holds it (and it
    is one of the cluster's), else the lowest subnet of the CIDR that no claim names (not
    even a losing one, which is about to move itself). None when every subnet is taken."""
    mine = next((c for c in claims if c.node == me), None)
    if mine is not None and mine.subnet.prefixlen == prefix and mine.subnet.subnet_of(cidr):
        held = holders(claims)
        if held.get(mine.subnet) is mine:
            return mine.subnet
    taken = [c.subnet for c in claims if c.node != me]
    for subnet in subnets_of(cidr, prefix):
        if not any(subnet.overlaps(t) for t in taken):
            return subnet
    return None


def check_cidr(settings: NetworkSettings, host: Iterable[HostNetwork], docker: Iterable[tuple[str, str]],
               nodes: int) -> list[str]:
    """What makes the cluster CIDR unusable here: it overlaps one of the host's own networks
    (``host``) or one of Docker's (``docker``: (network name, subnet), pleaco's own aside),
    or holds fewer subnets than the cluster has ``nodes``. Empty when it is fine."""
    cidr = ipaddress.IPv4Network(settings.cidr, strict=True)
    problems = [f"network.cidr {cidr} overlaps the host's {n.source}; choose a range the host does not use"
                for n in overlapping(cidr, host)]
    for name, raw in docker:
        try:
            net = ipaddress.ip_network(raw, strict=False)
        except ValueError:
            continue
        if isinstance(net, ipaddress.IPv4Network) and net.overlaps(cidr):
            problems.append(f"network.cidr {cidr} overlaps Docker network {name!r} ({net}); "
                            "choose a range Docker does not use")
    room = 2 ** (settings.subnet_prefix - cidr.prefixlen)
    if nodes > room:
        problems.append(f"network.cidr {cidr} holds {room} subnets of /{settings.subnet_prefix}, too few for "
                        f"the cluster's {nodes} nodes; choose a larger cidr or a longer subnet_prefix")
    return problems


def gateway_of(subnet: ipaddress.IPv4Network) -> ipaddress.IPv4Address:
    """The bridge's own address on a node subnet: its first host address."""
    return next(subnet.hosts())
