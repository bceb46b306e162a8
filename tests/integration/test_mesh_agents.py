"""The mesh as the agents run it, over WireGuard: three hosts, each a network namespace with
its own Docker Engine and agent (network on, ``mesh = "wireguard"``). Each agent announces
its signed WireGuard key in its node record, the others verify it and make it their peer;
a replica on one node answers from the others through the tunnel; an app container
cannot open the agents' API or gossip ports; a node that dies loses
its WireGuard peer and route on the others within the failure detection; an agent that
stops leaves no interface, route or rule behind."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Callable
from pathlib import Path

import nethosts
import pytest
from agentproc import AgentProcess, wait_for

from pleaco.net import wireguard

Factory = Callable[..., AgentProcess]
GATEWAY = "10.77.74.1"  # the hosts' bridge in the test's namespace
POLL = 0.1

pytestmark = pytest.mark.skipif(subprocess.run(["which", "wireguard-go"], capture_output=True).returncode != 0,
                                reason="wireguard-go is not installed (make deps)")


def iface(h: nethosts.EngineHost) -> str:
    # wireguard-go's control sockets (/var/run/wireguard/NAME.sock) are shared by all namespaces.
    return f"plmw-wg{h.index}"


def wg_peers(h: nethosts.EngineHost) -> set[str]:
    res = h.sh("wg", "show", iface(h), "peers", check=False)
    return set(res.stdout.split()) if res.returncode == 0 else set()


def mesh_routes(h: nethosts.EngineHost) -> str:
    return h.sh("ip", "route", "show", "proto", "210").stdout


def test_agents_make_a_wireguard_mesh_that_follows_membership(agent_factory: Factory) -> None:
    with nethosts.engine_hosts(3, "mw", 74) as hosts:
        try:
            agents: list[AgentProcess] = []
            token = ""
            for h in hosts:
                h.sh("ip", "route", "add", "default", "via", GATEWAY)
                env = {**h.env, "PLEACO_NETWORK_ENABLED": "true", "PLEACO_NETWORK_MESH": "wireguard",
                       "PLEACO_NETWORK_WIREGUARD_INTERFACE": iface(h)}
                args = ["--gossip-listen", f"{h.ip}:7401"] + (["--join-token", token] if token else [])
                agents.append(agent_factory(f"n{h.index}", host=h.ip, prefix=h.prefix, env=env, extra_args=args))
                if not token:
                    agents[0].client.request("POST", "/v1/cluster/init")
                    token = agents[0].client.request("GET", "/v1/cluster/token")["token"]
            keys = [wireguard.load_or_create_key(a.data_dir).public for a in agents]

            # Every node has the two others as WireGuard peers, by the keys in their data dirs.
            for i, h in enumerate(hosts):
                others = {k for j, k in enumerate(keys) if j != i}
                wait_for(lambda h=h, others=others: wg_peers(h) == others, 40, f"{h.ns}'s WireGuard peers")  # type: ignore[misc]

            agents[0].client.deploy("hello", {"image": "pleaco/hello:latest", "replicas": 3, "port": 8080,
                                              "health": "/healthz"})
            wait_for(lambda: agents[0].client.app("hello")["healthy"] == 3, 60, "3 healthy replicas")
            by_id = {a.node_id: i for i, a in enumerate(agents)}
            far = next(i for i in agents[0].client.app("hello")["instances"] if by_id[i["node"]] != 0)
            held = {n["id"]: n.get("subnet", "") for n in agents[0].client.nodes()}
            assert f"{held[far['node']]} dev {iface(hosts[0])}" in mesh_routes(hosts[0])
            answer = hosts[0].sh("curl", "-sf", "--max-time", "5", f"http://{far['address']}/").stdout
            assert answer.strip(), far
            # It went through the tunnel: the counters of that peer moved.
            transfer = hosts[0].sh("wg", "show", iface(hosts[0]), "transfer").stdout.split("\n")
            far_key = keys[by_id[far["node"]]]
            assert any(ln.split()[:1] == [far_key] and int(ln.split()[2]) > 0 for ln in transfer if ln), transfer

            # An app container on node 0's network: the agents' API and gossip ports refuse it
            # (its own host's and another node's), another node's replica answers it.
            probe = hosts[0].docker().containers.run("pleaco/busybox:latest", ["sleep", "120"], network="pleaco",
                                                     detach=True)
            try:
                for target in (f"{hosts[0].ip} {agents[0].port}", f"{hosts[0].ip} 7401",
                               f"{hosts[1].ip} {agents[1].port}"):
                    out = probe.exec_run(["sh", "-c", f"echo | nc -w 2 {target}"]).output.decode()
                    assert "refused" in out, (target, out)
                page = probe.exec_run(["wget", "-q", "-O", "-", f"http://{far['address']}/"]).output.decode()
                assert page.strip() == answer.strip(), page
            finally:
                probe.remove(force=True)

            # Node 2 dies: the others drop its peer and route once they declare it dead.
            gone = agents[2]
            gone.kill()
            for h in hosts[:2]:
                wait_for(lambda h=h: keys[2] not in wg_peers(h) and held[gone.node_id] not in mesh_routes(h),  # type: ignore[misc]
                         40, f"{h.ns} forgets node 2")
            assert wg_peers(hosts[0]) == {keys[1]}

            # Node 1 stops: nothing of the mesh is left on its host.
            agents[1].stop()
            assert mesh_routes(hosts[1]) == ""
            assert iface(hosts[1]) not in hosts[1].sh("ip", "-o", "link").stdout
            assert "PLEACO-MESH" not in hosts[1].sh("iptables-save").stdout
            assert not Path(f"/var/run/wireguard/{iface(hosts[1])}.sock").exists()
        finally:
            # A killed agent leaves its wireguard-go; its interface going ends it.
            for h in hosts:
                with contextlib.suppress(Exception):
                    h.sh("ip", "link", "del", iface(h), check=False)
