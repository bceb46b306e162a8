"""The agent owns the network: three hosts, each a network namespace with its own Docker
Engine and its own agent (network enabled), get distinct subnets of the cluster CIDR, make
the `pleaco` Docker network on them and run replicas there; the advertised address is the
default route's source; a bad CIDR is refused and changes nothing."""

from __future__ import annotations

import ipaddress
import subprocess
from collections.abc import Callable

import docker.errors
import nethosts
import pytest
from agentproc import AgentProcess, wait_for

from pleaco.identity import Identity

Factory = Callable[..., AgentProcess]
GATEWAY = "10.77.70.1"  # the hosts' bridge in the test's namespace
GOSSIP = "0.0.0.0:7401"
CADDY = "pleaco/caddy:latest"  # a wildcard: the advertised address comes from the route table


def network_env(h: nethosts.EngineHost, **extra: str) -> dict[str, str]:
    return {**h.env, "PLEACO_NETWORK_ENABLED": "true", **extra}


def pleaco_subnet(h: nethosts.EngineHost) -> str | None:
    client = h.docker()
    try:
        net = client.networks.get("pleaco")
    except docker.errors.NotFound:
        return None
    finally:
        client.close()
    if net.name != "pleaco":
        return None
    config = net.attrs["IPAM"]["Config"]
    return str(config[0]["Subnet"]) if config else None


def subnets(agent: AgentProcess) -> dict[str, str]:
    return {n["id"]: n.get("subnet", "") for n in agent.client.nodes()}


def test_three_nodes_get_their_own_subnets_and_run_replicas_there(agent_factory: Factory) -> None:
    with nethosts.engine_hosts(3, "nw", 70) as hosts:
        # Host 2 first, without a default route: it has only loopback to advertise, and a
        # cluster on other machines refuses that rather than gossiping over it.
        for h in hosts[:2]:
            h.sh("ip", "route", "add", "default", "via", GATEWAY)
        # n0 runs a proxy (its own namespace: the default addresses are free there).
        subprocess.run(f"docker save {CADDY} | docker -H {hosts[0].docker_url} load -q", shell=True, check=True,
                       capture_output=True)
        first = agent_factory("n0", host=hosts[0].ip, prefix=hosts[0].prefix, env=network_env(hosts[0]),
                              extra_args=["--gossip-listen", GOSSIP, "--proxy-image", CADDY])
        first.client.request("POST", "/v1/cluster/init")
        token = first.client.request("GET", "/v1/cluster/token")["token"]
        loner = agent_factory("n2", host=hosts[2].ip, prefix=hosts[2].prefix,
                              env=network_env(hosts[2], PLEACO_NETWORK_CIDR="10.77.0.0/16"),
                              extra_args=["--gossip-listen", GOSSIP, "--join-token", token], start=False)
        # A cluster CIDR overlapping the host's own network: refused, naming it.
        with pytest.raises((AssertionError, RuntimeError)) as overlap:
            loner.start()
        assert "network.cidr 10.77.0.0/16 overlaps the host's route 10.77.70.0/24 dev eth0" in str(overlap.value)
        del loner.env["PLEACO_NETWORK_CIDR"]
        with pytest.raises((AssertionError, RuntimeError)) as refused:
            loner.start()
        assert "would advertise the loopback address 127.0.0.1" in str(refused.value)
        # Both refused before anything was made: no network, no bridge, not admitted.
        assert pleaco_subnet(hosts[2]) is None
        assert "pleaco0" not in hosts[2].sh("ip", "-o", "link").stdout
        assert Identity.load_or_create(loner.data_dir).node_id not in {n["id"] for n in first.client.nodes()}

        hosts[2].sh("ip", "route", "add", "default", "via", GATEWAY)
        agents = [first, agent_factory("n1", host=hosts[1].ip, prefix=hosts[1].prefix, env=network_env(hosts[1]),
                                       extra_args=["--gossip-listen", GOSSIP, "--join-token", token])]
        agents.append(loner.start())
        ids = {a.node_id for a in agents}

        # The advertised (gossip) address of each is its default route's source: its eth0.
        def advertised() -> dict[str, str]:
            return {n["id"]: n["gossip"] for n in first.client.nodes() if n["state"] == "alive"}

        wait_for(lambda: set(advertised()) == ids, 40, "3 nodes alive")
        assert advertised() == {a.node_id: f"{h.ip}:7401" for a, h in zip(agents, hosts, strict=True)}

        # Distinct subnets of 10.210.0.0/16, the same in every node's view, and each
        # engine's `pleaco` network on its node's.
        def settled() -> bool:
            views = [subnets(a) for a in agents]
            return all(v == views[0] for v in views) and all(views[0].get(i) for i in ids)

        wait_for(settled, 30, "every node's subnet known everywhere")
        held = subnets(first)
        assert len(set(held.values())) == 3, held
        assert all(ipaddress.IPv4Network(s).subnet_of(ipaddress.IPv4Network("10.210.0.0/16"))
                   and ipaddress.IPv4Network(s).prefixlen == 24 for s in held.values())
        for a, h in zip(agents, hosts, strict=True):
            wait_for(lambda h=h, a=a: pleaco_subnet(h) == held[a.node_id], 20, f"{h.ns}'s pleaco network")  # type: ignore[misc]

        # Replicas run on it, with an address in their node's subnet, which `apps show`
        # lists, and answer there (from their host), with no host port published.
        first.client.deploy("hello", {"image": "pleaco/hello:latest", "replicas": 3, "port": 8080,
                                      "health": "/healthz"})
        wait_for(lambda: first.client.app("hello")["healthy"] == 3, 40, "3 healthy replicas")
        instances = first.client.app("hello")["instances"]
        by_node = {a.node_id: h for a, h in zip(agents, hosts, strict=True)}
        assert len(instances) == 3
        for inst in instances:
            ip, _, port = inst["address"].rpartition(":")
            assert port == "8080" and inst["host_port"] is None, inst
            assert ipaddress.IPv4Address(ip) in ipaddress.IPv4Network(held[inst["node"]]), (inst, held)
            h = by_node[inst["node"]]
            answer = h.sh("curl", "-sf", "--max-time", "5", f"http://{inst['address']}/").stdout
            assert answer.strip(), inst
            # And from the other nodes, through the mesh (pleaco/net/mesh.py).
            for other in hosts:
                answer = other.sh("curl", "-sf", "--max-time", "5", f"http://{inst['address']}/").stdout
                assert answer.strip(), (inst, other.ns)
        # n0's proxy dials every replica, its own and the other nodes', at those addresses
        # (reaching the others' is the mesh's part: routes, tests of its own).
        cluster_addresses = sorted(i["address"] for i in instances)

        def proxied() -> list[str]:
            routes = first.client.request("GET", "/v1/proxy")["routes"]
            return sorted(u for r in routes if r["app"] == "hello" for u in r["upstreams"])

        wait_for(lambda: proxied() == cluster_addresses, 30, "the proxy's upstreams at the cluster addresses")

        # A CIDR too small for the cluster's three nodes: n2 refuses to start, naming it,
        # and its network stays as it was.
        loner.stop()
        # Its route goes from the others' tables once it left; it leaves no route behind.
        wait_for(lambda: held[loner.node_id] not in hosts[0].sh("ip", "route", "show", "proto", "210").stdout, 20,
                 "n2's route gone from n0")
        assert hosts[2].sh("ip", "route", "show", "proto", "210").stdout == ""
        before = pleaco_subnet(hosts[2])
        loner.env["PLEACO_NETWORK_CIDR"] = "10.210.0.0/23"
        with pytest.raises((AssertionError, RuntimeError)) as small:
            loner.start()
        assert "network.cidr 10.210.0.0/23 holds 2 subnets of /24, too few for the cluster's 3 nodes" \
            in str(small.value)
        assert pleaco_subnet(hosts[2]) == before
        # Removed from the cluster, its subnet is free again.
        first.client.request("DELETE", f"/v1/nodes/{loner.node_id}")
        wait_for(lambda: subnets(first)[loner.node_id] == "" and subnets(agents[1])[loner.node_id] == "", 20,
                 "the removed node's subnet record deleted")
        for a in agents:
            a.kill()

