"""The advertised address from the route table, the host's networks, and the loopback rule."""

from __future__ import annotations

import ipaddress

import pytest

from pleaco.cluster.config import ClusterSettings
from pleaco.cluster.service import advertise_address
from pleaco.net.addresses import (
    AddressEntry,
    HostTables,
    RouteEntry,
    default_source,
    host_networks,
    loopback_mismatch,
    read_host_tables,
)

net = ipaddress.IPv4Network
iface = ipaddress.IPv4Interface
LO = AddressEntry(iface("127.0.0.1/8"), 1, "lo")
ETH0 = AddressEntry(iface("192.0.2.2/24"), 4, "eth0")
ETH1 = AddressEntry(iface("198.51.100.7/24"), 5, "eth1")
DOCKER0 = AddressEntry(iface("172.17.0.1/16"), 6, "docker0")


def test_the_default_routes_preferred_source_wins() -> None:
    tables = HostTables((RouteEntry(net("0.0.0.0/0"), "eth0", "192.0.2.1", "192.0.2.9", 4),), (LO, ETH0))
    assert default_source(tables) == "192.0.2.9"


def test_without_a_preferred_source_the_interfaces_address_on_the_gateways_network() -> None:
    second = AddressEntry(iface("10.9.0.5/24"), 4, "eth0")  # listed first, not on the gateway's network
    tables = HostTables((RouteEntry(net("0.0.0.0/0"), "eth0", "192.0.2.1", "", 4),
                         RouteEntry(net("172.17.0.0/16"), "docker0", "", "172.17.0.1", 6)),
                        (LO, second, ETH0, DOCKER0))
    assert default_source(tables) == "192.0.2.2"


def test_the_lowest_metric_default_route_wins() -> None:
    tables = HostTables((RouteEntry(net("0.0.0.0/0"), "eth0", "192.0.2.1", "", 4, priority=600),
                         RouteEntry(net("0.0.0.0/0"), "eth1", "198.51.100.1", "", 5, priority=100)),
                        (LO, ETH0, ETH1))
    assert default_source(tables) == "198.51.100.7"


def test_no_default_route_no_address() -> None:
    tables = HostTables((RouteEntry(net("192.0.2.0/24"), "eth0", "", "192.0.2.2", 4),), (LO, ETH0))
    assert default_source(tables) is None


def test_a_wildcard_gossip_address_advertises_the_default_routes_source(tmp_path: object) -> None:
    tables = HostTables((RouteEntry(net("0.0.0.0/0"), "eth0", "192.0.2.1", "", 4),), (LO, ETH0))
    cfg = ClusterSettings(gossip_listen="0.0.0.0:7401")
    assert advertise_address(cfg, lambda: tables) == "192.0.2.2:7401"
    # No default route: loopback, which a cluster on other machines then refuses.
    assert advertise_address(cfg, lambda: HostTables((), (LO,))) == "127.0.0.1:7401"
    # Configured, or a listen address naming a host: those, as before.
    assert advertise_address(ClusterSettings(gossip_listen="0.0.0.0:7401", advertise="10.1.2.3"),
                             lambda: tables) == "10.1.2.3:7401"
    assert advertise_address(ClusterSettings(gossip_listen="127.0.0.1:7401"), lambda: tables) == "127.0.0.1:7401"


def test_host_networks_leave_out_the_default_route_loopback_and_pleacos_own() -> None:
    tables = HostTables(
        (RouteEntry(net("0.0.0.0/0"), "eth0", "192.0.2.1", "", 4),
         RouteEntry(net("192.0.2.0/24"), "eth0", "", "192.0.2.2", 4),
         RouteEntry(net("10.210.0.0/24"), "pleaco0", "", "10.210.0.1", 7),  # our bridge
         RouteEntry(net("10.210.3.0/24"), "eth0", "192.0.2.3", "", 4)),  # the mesh's route to a peer
        (LO, ETH0, AddressEntry(iface("10.210.0.1/24"), 7, "pleaco0")))
    found = host_networks(tables, ignore_interfaces={"pleaco0"}, ignore_routes_in=net("10.210.0.0/16"),
                          ignore_prefix=24)
    assert [n.network for n in found] == [net("192.0.2.0/24"), net("192.0.2.0/24")]
    assert found[0].source == "route 192.0.2.0/24 dev eth0"
    assert found[1].source == "address 192.0.2.2/24 on eth0"


def test_the_kernels_tables_read() -> None:
    """The real read (netlink) answers, with loopback among the addresses."""
    tables = read_host_tables()
    assert any(a.interface.ip.is_loopback for a in tables.addresses)


@pytest.mark.parametrize(("own", "others", "refused"), [
    ("127.0.0.1", ["127.0.0.1", "127.0.0.2"], False),  # one machine: fine
    ("127.0.0.1", [], False),  # alone
    ("127.0.1.1", ["10.77.70.2"], True),  # Debian's hostname address among real machines
    ("10.77.70.3", ["10.77.70.2"], False),
])
def test_a_loopback_address_is_never_advertised_to_other_machines(own: str, others: list[str],
                                                                 refused: bool) -> None:
    problem = loopback_mismatch(own, others)
    assert (problem is not None) == refused
    if problem:
        assert own in problem and "10.77.70.2" in problem and "advertise" in problem
