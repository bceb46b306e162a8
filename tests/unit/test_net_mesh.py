"""The mesh's decisions without a kernel: the per-peer choice, the plan for a peer list,
the signed WireGuard key, and the firewall rule sets."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

import pytest

from pleaco.identity import Identity
from pleaco.net import mesh, wireguard
from pleaco.net.config import NetworkSettings
from pleaco.net.isolation import Isolation
from pleaco.net.peer import Peer

NET = ipaddress.IPv4Network


def peer(i: int, key: str = "k" * 43 + "=", port: int = 51820) -> Peer:
    return Peer(f"node{i}", f"192.168.1.{i}", NET(f"10.210.{i}.0/24"), key, port)


ME = peer(1)


@pytest.mark.parametrize(("settings", "on_link", "key", "want"), [
    (NetworkSettings(), True, True, mesh.HOST_GW),
    (NetworkSettings(), False, True, mesh.WIREGUARD),
    (NetworkSettings(), False, False, None),          # neither way: no route
    (NetworkSettings(encrypt=True), True, True, mesh.WIREGUARD),
    (NetworkSettings(encrypt=True), True, False, None),  # encrypt never falls back to plain
    (NetworkSettings(mesh="wireguard"), True, True, mesh.WIREGUARD),
    (NetworkSettings(mesh="host-gw"), True, False, mesh.HOST_GW),
    (NetworkSettings(mesh="host-gw"), False, True, None),
])
def test_choice_per_peer(settings: NetworkSettings, on_link: bool, key: bool, want: str | None) -> None:
    p = peer(2) if key else peer(2, key="", port=0)
    assert mesh.choose(settings, p, on_link) == want


def test_plan_mixes_routes_and_tunnels_and_skips_me_and_overlaps() -> None:
    far = Peer("node3", "172.30.0.3", NET("10.210.3.0/24"), "x" * 43 + "=", 51821)
    clash = Peer("node4", "192.168.1.4", NET("10.210.1.0/25"))  # inside my subnet
    p = mesh.plan(NetworkSettings(), ME, [ME, peer(2), far, clash], lambda h: h.startswith("192.168."),
                  src="10.210.1.1")
    assert p.routes == [mesh.routes.Route(NET("10.210.2.0/24"), gateway="192.168.1.2"),
                        mesh.routes.Route(NET("10.210.3.0/24"), dev="pleaco-wg", src="10.210.1.1")]
    assert p.wg_peers == [wireguard.WgPeer(far.wg_key, "172.30.0.3:51821", far.subnet)]
    assert p.unreachable == ["node4"]


def test_isolation_refuses_the_other_nodes_host_and_bridge_addresses() -> None:
    # A bridge's address is routed to its node by the mesh and answered there as the
    # node's own: a container must not reach that node's services through it either.
    assert mesh.other_hosts(ME, [ME, peer(2), peer(3)]) == ["192.168.1.2", "10.210.2.1", "192.168.1.3", "10.210.3.1"]


def test_nat_rule_keeps_container_addresses_between_cluster_subnets() -> None:
    assert mesh.nat_rules(NET("10.210.1.0/24"), "10.210.0.0/16") == [
        "-A PLEACO-MESH-nat -s 10.210.1.0/24 -d 10.210.0.0/16 -j ACCEPT"]
    assert mesh.forward_rules(NET("10.210.1.0/24"), "10.210.0.0/16") == [
        "-A PLEACO-MESH-fwd -s 10.210.0.0/16 -d 10.210.1.0/24 -j ACCEPT"]


def test_isolation_rules() -> None:
    inp, fwd = Isolation("pleaco", [53]).rules(["192.168.1.3", "192.168.1.2"])
    assert inp == [
        "-A PLEACO-pleaco-in -m conntrack --ctstate ESTABLISHED,RELATED -j RETURN",
        "-A PLEACO-pleaco-in -p udp -m udp --dport 53 -j RETURN",
        "-A PLEACO-pleaco-in -p tcp -m tcp --dport 53 -j RETURN",
        "-A PLEACO-pleaco-in -p tcp -j REJECT --reject-with tcp-reset",
        "-A PLEACO-pleaco-in -j REJECT",
    ]
    assert fwd[:3] == ["-A PLEACO-pleaco-fwd -m conntrack --ctstate ESTABLISHED,RELATED -j RETURN",
                       "-A PLEACO-pleaco-fwd -p udp -m udp --dport 53 -j RETURN",
                       "-A PLEACO-pleaco-fwd -p tcp -m tcp --dport 53 -j RETURN"]
    assert fwd[3:5] == ["-A PLEACO-pleaco-fwd -d 192.168.1.2/32 -p tcp -j REJECT --reject-with tcp-reset",
                        "-A PLEACO-pleaco-fwd -d 192.168.1.2/32 -j REJECT"]
    assert len(fwd) == 7


def test_isolation_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="not-an-ip"):
        Isolation("pleaco").rules(["not-an-ip"])
    for port in (0, 70000):
        with pytest.raises(ValueError, match=f"port {port} is not"):
            Isolation("pleaco", [port])


def test_isolation_refuses_a_bad_bridge_name() -> None:
    with pytest.raises(ValueError, match="1-15 characters"):
        Isolation("a-bridge-name-too-long")


def test_wireguard_key_is_made_once_and_kept_secret(tmp_path: Path) -> None:
    first = wireguard.load_or_create_key(tmp_path)
    assert os.stat(tmp_path / wireguard.KEY_FILE).st_mode & 0o777 == 0o600
    assert wireguard.load_or_create_key(tmp_path) == first
    assert first.public != first.private


def test_wireguard_key_broken_file_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / wireguard.KEY_FILE).write_text("not base64!\n")
    with pytest.raises(wireguard.WireGuardError, match="does not hold a WireGuard private key"):
        wireguard.load_or_create_key(tmp_path)


def test_signed_key_is_verified_and_a_bad_signature_refused(tmp_path: Path) -> None:
    ident = Identity.generate()
    other = Identity.generate()
    key = wireguard.load_or_create_key(tmp_path).public

    def record(signer: Identity, owner: Identity, **extra: object) -> dict[str, object]:
        return {"public_key": owner.public_key.hex(), **wireguard.record_fields(signer, key, 51820), **extra}

    good = record(ident, ident)
    assert good["wg_port"] == "51820"
    assert wireguard.verified_key(ident.node_id, good) == (key, 51820)
    assert wireguard.verified_key(ident.node_id, {**good, "wg_port": 51820}) == (key, 51820)
    # Signed by another node, a record whose key is not the node id's, claimed for
    # another node, tampered with, or missing: refused.
    assert wireguard.verified_key(ident.node_id, record(other, ident)) == ("", 0)
    assert wireguard.verified_key(ident.node_id, record(other, other)) == ("", 0)
    assert wireguard.verified_key(other.node_id, good) == ("", 0)
    assert wireguard.verified_key(ident.node_id, {**good, "wg_port": "51821"}) == ("", 0)
    assert wireguard.verified_key(ident.node_id, {**good, "wg_key": "A" * 43 + "="}) == ("", 0)
    assert wireguard.verified_key(ident.node_id, {**good, "wg_sig": "%%%"}) == ("", 0)
    assert wireguard.verified_key(ident.node_id, {**good, "wg_port": True}) == ("", 0)
    assert wireguard.verified_key(ident.node_id, {"public_key": ident.public_key.hex()}) == ("", 0)
    assert wireguard.verified_key(ident.node_id, {}) == ("", 0)


def test_route_protocol_is_validated() -> None:
    assert NetworkSettings().validate() == []
    assert "network.route_protocol" in NetworkSettings(route_protocol=2).validate()[0]
    assert "network.encrypt = true needs WireGuard" in NetworkSettings(encrypt=True, mesh="host-gw").validate()[0]
