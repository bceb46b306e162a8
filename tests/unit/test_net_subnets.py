"""A subnet per node: the choice, the conflict rule, and the CIDR checks."""

from __future__ import annotations

import ipaddress

import pytest

from pleaco.identity import Identity
from pleaco.net.addresses import HostNetwork
from pleaco.net.config import NetworkSettings
from pleaco.net.subnets import Claim, check_cidr, choose, holders, parse_claim
from pleaco.store import Store
from pleaco.store.hlc import Timestamp

CIDR = ipaddress.IPv4Network("10.210.0.0/16")
net = ipaddress.IPv4Network


def ts(ms: int, node: str) -> Timestamp:
    return Timestamp(ms, 0, node)


def test_the_first_node_takes_the_lowest_subnet_and_keeps_it() -> None:
    assert choose("a", [], CIDR, 24) == net("10.210.0.0/24")
    mine = Claim("a", net("10.210.7.0/24"), ts(1, "a"))
    assert choose("a", [mine], CIDR, 24) == net("10.210.7.0/24")


def test_a_new_node_takes_the_lowest_free_subnet() -> None:
    claims = [Claim("a", net("10.210.0.0/24"), ts(1, "a")), Claim("b", net("10.210.2.0/24"), ts(2, "b"))]
    assert choose("c", claims, CIDR, 24) == net("10.210.1.0/24")


def test_two_claims_of_one_subnet_the_later_moves_and_both_end_distinct() -> None:
    """Both nodes wrote 10.210.0.0/24 at once. Each decides from the same two records: the
    earlier HLC keeps it, the later moves to the lowest subnet nobody claims."""
    a = Claim("a", net("10.210.0.0/24"), ts(1000, "a"))
    b = Claim("b", net("10.210.0.0/24"), ts(1001, "b"))
    assert holders([a, b]) == {net("10.210.0.0/24"): a}
    assert choose("a", [a, b], CIDR, 24) == net("10.210.0.0/24")
    moved = choose("b", [a, b], CIDR, 24)
    assert moved == net("10.210.1.0/24")
    # The mover rewrites its record (a later timestamp); both keep their subnets after.
    b2 = Claim("b", moved, ts(1002, "b"))
    assert choose("a", [a, b2], CIDR, 24) == net("10.210.0.0/24")
    assert choose("b", [a, b2], CIDR, 24) == moved


def test_equal_wall_clocks_are_ordered_by_node_id() -> None:
    a = Claim("a", net("10.210.0.0/24"), ts(1000, "a"))
    b = Claim("b", net("10.210.0.0/24"), ts(1000, "b"))
    assert choose("a", [b, a], CIDR, 24) == net("10.210.0.0/24")
    assert choose("b", [b, a], CIDR, 24) != net("10.210.0.0/24")


def test_three_racing_nodes_converge_on_distinct_subnets() -> None:
    """Three nodes claim one subnet at once, then keep applying the rule on what they see:
    it settles with three distinct subnets within a few rounds."""
    claims = {n: Claim(n, net("10.210.0.0/24"), ts(100, n)) for n in "abc"}
    clock = 100
    for _ in range(5):
        seen = list(claims.values())
        for node in "abc":
            wanted = choose(node, seen, CIDR, 24)
            assert wanted is not None
            if wanted != claims[node].subnet:
                clock += 1
                claims[node] = Claim(node, wanted, ts(clock, node))
    assert len({c.subnet for c in claims.values()}) == 3


def test_a_race_between_two_real_stores_ends_with_distinct_subnets(tmp_path: object) -> None:
    """Two nodes' stores, each claiming before it saw the other's record, then merging
    (what gossip does): the later claim moves."""
    from pathlib import Path
    root = Path(str(tmp_path))
    stores = []
    for name in ("a", "b"):
        (root / name).mkdir()
        ident = Identity.load_or_create(root / name)
        stores.append(Store(root / name / "state.db", ident))
    try:
        for s in stores:
            s.put("node", s.identity.node_id, {"public_key": s.identity.public_key.hex()})
        for s, other in ((stores[0], stores[1]), (stores[1], stores[0])):
            other.apply(s.get("node", s.identity.node_id))  # type: ignore[arg-type]
        first = [s.put("subnet", s.identity.node_id, {"subnet": "10.210.0.0/24"}) for s in stores]
        for s in stores:
            for rec in first:
                s.apply(rec)

        def decide(s: Store) -> ipaddress.IPv4Network | None:
            claims = [c for r in s.records("subnet") if (c := parse_claim(r.key, r.value, r.ts))]
            return choose(s.identity.node_id, claims, CIDR, 24)

        decided = [decide(s) for s in stores]
        assert len(set(decided)) == 2
        loser = 0 if first[0].ts > first[1].ts else 1
        assert decided[1 - loser] == net("10.210.0.0/24")
        assert decided[loser] == net("10.210.1.0/24")
    finally:
        for s in stores:
            s.close()


def test_a_claim_outside_the_cidr_or_of_another_size_moves() -> None:
    stale = Claim("a", net("10.99.0.0/24"), ts(1, "a"))
    assert choose("a", [stale], CIDR, 24) == net("10.210.0.0/24")
    wide = Claim("a", net("10.210.0.0/23"), ts(1, "a"))
    assert choose("a", [wide], CIDR, 24) == net("10.210.0.0/24")


def test_no_subnet_is_left_in_a_full_cidr() -> None:
    small = net("10.210.0.0/23")
    claims = [Claim("a", net("10.210.0.0/24"), ts(1, "a")), Claim("b", net("10.210.1.0/24"), ts(2, "b"))]
    assert choose("c", claims, small, 24) is None


def test_a_malformed_or_deleted_record_claims_nothing() -> None:
    assert parse_claim("a", None, ts(1, "a")) is None
    assert parse_claim("a", {"subnet": "10.210.0.1/24"}, ts(1, "a")) is None  # host bits set
    assert parse_claim("a", {"subnet": 7}, ts(1, "a")) is None


def test_a_cidr_overlapping_the_hosts_network_is_named() -> None:
    settings = NetworkSettings(cidr="10.77.0.0/16")
    problems = check_cidr(settings, [HostNetwork(net("10.77.70.0/24"), "address 10.77.70.2/24 on eth0")], [], 1)
    assert problems == ["network.cidr 10.77.0.0/16 overlaps the host's address 10.77.70.2/24 on eth0; "
                        "choose a range the host does not use"]


def test_a_cidr_overlapping_a_docker_network_is_named() -> None:
    settings = NetworkSettings(cidr="172.16.0.0/12")
    problems = check_cidr(settings, [], [("bridge", "172.17.0.0/16"), ("v6", "fd00::/64")], 1)
    assert len(problems) == 1 and "Docker network 'bridge' (172.17.0.0/16)" in problems[0]


def test_a_cidr_too_small_for_the_cluster_is_named() -> None:
    settings = NetworkSettings(cidr="10.210.0.0/23", subnet_prefix=24)
    assert check_cidr(settings, [], [], 2) == []
    problems = check_cidr(settings, [], [], 3)
    assert problems == ["network.cidr 10.210.0.0/23 holds 2 subnets of /24, too few for the cluster's 3 nodes; "
                        "choose a larger cidr or a longer subnet_prefix"]


def test_a_cidr_clear_of_everything_passes() -> None:
    host = [HostNetwork(net("192.0.2.0/24"), "route"), HostNetwork(net("172.17.0.0/16"), "route")]
    assert check_cidr(NetworkSettings(), host, [("bridge", "172.17.0.0/16")], 3) == []


@pytest.mark.parametrize("cidr", ["10.210.0.0/16", "10.210.0.0/20"])
def test_every_subnet_is_of_the_configured_size(cidr: str) -> None:
    got = choose("a", [], net(cidr), 26)
    assert got is not None and got.prefixlen == 26 and got.subnet_of(net(cidr))
