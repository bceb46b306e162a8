"""The kernel mesh between three hosts, each a network namespace with its own Docker Engine:
containers on different hosts reach each other by IP over host-gw routes and over
WireGuard (wireguard-go here), the receiving container sees the sender's own address,
a peer left out of the list loses its route and WireGuard peer, close() leaves nothing;
and an app container cannot open the host's own services (isolation)."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pleaco.net import mesh, wireguard
from pleaco.net.peer import Peer
from tests.integration.agentproc import wait_for
from tests.integration.meshhosts import run_mesh
from tests.integration.nethosts import EngineHost, engine_hosts

pytestmark = pytest.mark.skipif(subprocess.run(["which", "wireguard-go"], capture_output=True).returncode != 0,
                                reason="wireguard-go is not installed (make deps)")

POLL = 0.05
NETWORK = "plms"
BRIDGE = "plms-br"
LISTEN = 7000

ISOLATE = """
import json, sys
from pleaco.net.isolation import Isolation
a = json.loads(sys.argv[1])
iso = Isolation(a["bridge"])
if a["op"] == "apply":
    iso.apply(a["hosts"])
else:
    iso.close()
"""


def subnet(i: int) -> str:
    return f"10.210.{71 + i}.0/24"


class Node:
    def __init__(self, host: EngineHost, data: Path) -> None:
        self.host = host
        self.data = data
        self.wg_key = wireguard.load_or_create_key(data).public
        self.iface = f"plms-wg{host.index}"
        client = host.docker()
        client.networks.create(NETWORK, driver="bridge", ipam={"Config": [{"Subnet": subnet(host.index)}]},
                               options={"com.docker.network.bridge.name": BRIDGE})
        # A server that answers each connection with its connection table: the sender's
        # address as the receiver saw it.
        self.container = client.containers.run("pleaco/busybox:latest", ["nc", "-ll", "-p", str(LISTEN), "-e",
                                                                        "netstat", "-tn"],
                                               network=NETWORK, detach=True, name=f"plms-c{host.index}")
        self.container.reload()
        self.ip: str = self.container.attrs["NetworkSettings"]["Networks"][NETWORK]["IPAddress"]
        client.close()

    def peer(self) -> dict[str, Any]:
        return {"node_id": f"node{self.host.index}", "host": self.host.ip, "subnet": subnet(self.host.index),
                "wg_key": self.wg_key, "wg_port": 51820}

    def peer_obj(self) -> Peer:
        return Peer(f"node{self.host.index}", self.host.ip, ipaddress.IPv4Network(subnet(self.host.index)))

    def mesh(self, op: str, peers: list[Node] | None = None, mode: str = "auto") -> None:
        run_mesh(self.host, self.data, op, self.peer(), [p.peer() for p in peers or []],
                 {"mesh": mode, "wireguard_interface": self.iface})

    def isolate(self, op: str, hosts: list[str] | None = None) -> None:
        args = {"op": op, "bridge": BRIDGE, "subnet": subnet(self.host.index), "hosts": hosts or []}
        res = self.host.sh(sys.executable, "-c", ISOLATE, json.dumps(args), check=False)
        assert res.returncode == 0, res.stderr

    def ask(self, ip: str, port: int = LISTEN) -> str:
        """What the server at ``ip`` answers a connection from this node's container."""
        res = self.container.exec_run(["sh", "-c", f"echo | nc -w 2 {ip} {port}"])
        return str(res.output.decode(errors="replace"))

    def routes(self) -> str:
        return self.host.sh("ip", "route", "show", "proto", "210").stdout

    def wg_peers(self) -> list[str]:
        res = self.host.sh("wg", "show", self.iface, "peers", check=False)
        return res.stdout.split() if res.returncode == 0 else []

    def leftovers(self) -> list[str]:
        """Everything of the mesh still in the kernel."""
        out = [ln for ln in self.routes().splitlines() if ln]
        out += [ln for ln in self.host.sh("ip", "-o", "link").stdout.splitlines() if self.iface in ln]
        for table in ("nat", "filter"):
            out += [ln for ln in self.host.sh("iptables", "-t", table, "-S").stdout.splitlines() if "PLEACO" in ln]
        if Path(f"/var/run/wireguard/{self.iface}.sock").exists():
            out.append(f"/var/run/wireguard/{self.iface}.sock")
        return out


@pytest.fixture(scope="module")
def nodes() -> Iterator[list[Node]]:
    with engine_hosts(3, "ms", 71, images=("pleaco/busybox:latest",)) as hosts, \
            tempfile.TemporaryDirectory(prefix="pl-ms-") as tmp:
        made: list[Node] = []
        try:
            for h in hosts:
                # As on a stock Docker host (the engine sets it when it turns forwarding on;
                # in these namespaces forwarding was on already, so it left ACCEPT).
                h.sh("iptables", "-P", "FORWARD", "DROP")
                made.append(Node(h, Path(tmp) / f"n{h.index}"))
            yield made
        finally:
            for n in made:
                with contextlib.suppress(Exception):
                    n.mesh("close")
                with contextlib.suppress(Exception):
                    n.isolate("close")


def answered(text: str) -> bool:
    """Whether the server answered (its connection table: netstat's "tcp" lines)."""
    return "tcp " in text


def test_host_gw_keeps_the_container_address_and_follows_the_list(nodes: list[Node]) -> None:
    a, _, c = nodes
    assert not answered(a.ask(c.ip))  # no route yet
    # A route someone else made, inside the cluster CIDR: the mesh never touches it.
    foreign = "10.210.99.0/24 via 10.77.71.1 dev eth0"
    a.host.sh("ip", "route", "add", *foreign.split())
    try:
        for n in nodes:
            n.mesh("apply", nodes)
        assert f"{c.ip.rsplit('.', 1)[0]}.0/24 via {c.host.ip}" in a.routes()
        seen = a.ask(c.ip)
        # The receiver's connection table shows the sender's container address, not its host's.
        assert f"{a.ip}:" in seen, seen
        assert a.host.ip not in seen
        assert not a.wg_peers()  # all on one link: no tunnel
        # Host 2 leaves the list: its route goes, the other stays.
        a.mesh("apply", nodes[:2])
        assert subnet(2) not in a.routes() and subnet(1) in a.routes()
        assert not answered(a.ask(c.ip))
        a.mesh("apply", nodes[:2])  # again: nothing changes, nothing fails
        assert subnet(1) in a.routes()
        assert foreign in a.host.sh("ip", "route").stdout
    finally:
        for n in nodes:
            n.mesh("close")
        a.host.sh("ip", "route", "del", "10.210.99.0/24", check=False)
    for n in nodes:
        assert n.leftovers() == []


def test_wireguard_between_containers(nodes: list[Node]) -> None:
    a, b, c = nodes
    try:
        for n in nodes:
            n.mesh("apply", nodes, mode="wireguard")
        assert f"{subnet(2)} dev {a.iface}" in a.routes()
        assert sorted(a.wg_peers()) == sorted([b.wg_key, c.wg_key])
        seen = a.ask(c.ip)
        assert f"{a.ip}:" in seen, seen
        # The packets really went through the tunnel: its transfer counters moved.
        dump = a.host.sh("wg", "show", a.iface, "transfer").stdout
        assert any(ln.split()[0] == c.wg_key and int(ln.split()[2]) > 0 for ln in dump.splitlines()), dump
        a.mesh("apply", [a, b], mode="wireguard")
        assert a.wg_peers() == [b.wg_key]
        assert subnet(2) not in a.routes()
        assert not answered(a.ask(c.ip))
    finally:
        for n in nodes:
            n.mesh("close")
    for n in nodes:
        assert n.leftovers() == []


def test_isolation_refuses_the_host_services_not_other_containers(nodes: list[Node]) -> None:
    a, b, _ = nodes
    gateway = str(next(ipaddress.IPv4Network(subnet(0)).hosts()))
    # Stand-ins for the agent API (7070) and the proxy admin API (2019), listening on all
    # addresses of host 0, and for host 1's agent API.
    servers = [subprocess.Popen([*h.host.prefix, "busybox", "nc", "-ll", "-p", str(port), "-e", "echo", "service"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
               for h, port in ((a, 7070), (a, 2019), (b, 7070))]
    neighbour = a.host.docker().containers.run(
        "pleaco/busybox:latest", ["nc", "-ll", "-p", str(LISTEN), "-e", "netstat", "-tn"], network=NETWORK,
        detach=True, name="plms-neighbour")
    neighbour.reload()
    neighbour_ip = neighbour.attrs["NetworkSettings"]["Networks"][NETWORK]["IPAddress"]
    # Host 1's bridge address: the mesh routes it to host 1, which answers it as its own.
    b_gateway = str(next(ipaddress.IPv4Network(subnet(1)).hosts()))
    targets = [(gateway, 7070), (gateway, 2019), (a.host.ip, 7070), (a.host.ip, 2019), (b.host.ip, 7070),
               (b_gateway, 7070)]
    # What the agent's mesh hands its isolation: the other nodes' host and bridge addresses.
    others = mesh.other_hosts(a.peer_obj(), [n.peer_obj() for n in nodes if n is not a and n is not nodes[2]])
    assert others == [b.host.ip, b_gateway]
    try:
        for n in nodes:
            n.mesh("apply", nodes)
        # Without the rules every one of them answers the container.
        for ip, port in targets:
            wait_for(lambda ip=ip, port=port: "service" in a.ask(ip, port), 10, f"{ip}:{port}",  # type: ignore[misc]
                     interval=POLL)
        a.isolate("apply", hosts=others)
        for _ in range(2):  # and again: the same rules, nothing fails
            for ip, port in targets:
                answer = a.ask(ip, port)
                assert "service" not in answer and "refused" in answer, (ip, port, answer)
            # Other containers, here and on another node, still answer.
            assert answered(a.ask(b.ip))
            assert answered(a.ask(neighbour_ip))
            a.isolate("apply", hosts=others)
        a.isolate("close")
        assert "service" in a.ask(gateway, 7070)
    finally:
        for srv in servers:
            srv.kill()
            srv.wait()
        neighbour.remove(force=True)
        for n in nodes:
            n.mesh("close")
        a.isolate("close")
    assert a.leftovers() == []
