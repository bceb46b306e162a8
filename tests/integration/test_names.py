"""Service names from inside real containers: the agent's NameServer on a Docker bridge
network's gateway, containers made by the runtime adapter with it as their resolver, and
busybox's nslookup asking through the engine's embedded DNS (127.0.0.11)."""

from __future__ import annotations

import asyncio
import ipaddress
import re
import secrets
import struct
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any

import docker
import nethosts
import pytest
from agentproc import AgentProcess, docker_client, remove_node_containers, wait_for
from conftest import HELLO

from pleaco.net import dnswire
from pleaco.net.names import PORT, NameServer
from pleaco.runtime.docker import DockerRuntime, RunSpec

SUBNET, GATEWAY = "10.213.0.0/24", "10.213.0.1"
FORWARDED = "outside.example"
FORWARDED_ANSWER = "192.0.2.77"
POLL = 0.1
Factory = Callable[..., AgentProcess]


class Upstream(asyncio.DatagramProtocol):
    """A stand-in for the host's resolver, on loopback: every A question gets 192.0.2.77."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.DatagramTransport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        q = dnswire.parse_query(data)
        self.asked.append(q.name)
        answers = [dnswire.record(dnswire.QTYPE_A, 60, bytes(int(x) for x in FORWARDED_ANSWER.split(".")))] \
            if q.qtype == dnswire.QTYPE_A and q.name == FORWARDED else []
        rcode = 0 if q.name == FORWARDED else dnswire.RCODE_NXDOMAIN
        self.transport.sendto(dnswire.response(q, rcode, answers, authoritative=False), addr)


class Servers:
    """The name server and the fake upstream, on an event loop in a thread of their own
    (the test's Docker calls block)."""

    def __init__(self, names: dict[str, list[str]]) -> None:
        self.names = names
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.server: NameServer | None = None
        self.upstream = Upstream()
        self._upstream_transport: asyncio.DatagramTransport | None = None

    def run(self, coro: Any) -> Any:
        fut: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return fut.result(30)

    def start(self) -> None:
        self.thread.start()
        self.run(self._start())

    async def _start(self) -> None:
        loop = asyncio.get_running_loop()
        self._upstream_transport, _ = await loop.create_datagram_endpoint(lambda: self.upstream,
                                                                          local_addr=("127.0.0.1", 0))
        up_port = int(self._upstream_transport.get_extra_info("sockname")[1])
        self.server = NameServer(GATEWAY, PORT, self.names.get, "internal", [("127.0.0.1", up_port)],
                                 clients=[SUBNET])
        await self.server.start()

    async def _stop(self) -> None:
        if self.server is not None:
            await self.server.close()
        if self._upstream_transport is not None:
            self._upstream_transport.close()

    def stop(self) -> None:
        if self.thread.is_alive():
            self.run(self._stop())
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
        self.loop.close()


@pytest.fixture
def network() -> Iterator[Any]:
    """A bridge network of the test's own on 10.213.0.0/24 (its gateway is then an address
    of the host's), removed after."""
    client = docker_client()
    net = client.networks.create(
        f"pl-names-test-{secrets.token_hex(3)}", driver="bridge",
        ipam=docker.types.IPAMConfig(pool_configs=[docker.types.IPAMPool(subnet=SUBNET, gateway=GATEWAY)]))
    try:
        yield net
    finally:
        net.reload()
        for c in net.containers:
            net.disconnect(c, force=True)
        net.remove()


def nslookup(container: Any, name: str) -> tuple[int, list[str], str]:
    """(exit code, the addresses answered, the output) of busybox nslookup in the container,
    through its resolv.conf (the engine's embedded DNS)."""
    code, out = container.exec_run(["nslookup", "-type=a", name])
    text = out.decode(errors="replace")
    answer = text.partition(f"Name:\t{name.rstrip('.')}")[2]
    return code, re.findall(r"Address:\s*([0-9.]+)", answer), text


def test_service_names_resolve_from_containers_through_the_agents_dns(network: Any) -> None:
    node = "namestest" + secrets.token_hex(3)
    runtime = DockerRuntime()
    client = docker_client()
    names: dict[str, list[str]] = {}
    servers = Servers(names)
    try:
        servers.start()
        containers = []
        for replica in (0, 1):
            # The resolver goes through the runtime adapter (HostConfig Dns).
            cid = runtime.run(RunSpec(app="names", node=node, release=1, replica=replica, image=HELLO,
                                      network=network.name, dns=(GATEWAY,)))
            containers.append(client.containers.get(cid))
        ips = []
        for c in containers:
            c.reload()
            assert c.attrs["HostConfig"]["Dns"] == [GATEWAY]
            ips.append(c.attrs["NetworkSettings"]["Networks"][network.name]["IPAddress"])
        names.update({"web": [ips[1], "10.213.0.200"], "db": [ips[0]], "idle": []})
        asker = containers[0]

        # The embedded DNS is in front (resolv.conf) and sends the rest to our server.
        assert "nameserver 127.0.0.11" in asker.exec_run(["cat", "/etc/resolv.conf"])[1].decode()
        code, found, text = nslookup(asker, "web.internal")
        assert code == 0 and sorted(found) == sorted(names["web"]), text
        code, found, text = nslookup(containers[1], "DB.Internal.")
        assert code == 0 and found == [ips[0]], text
        code, found, text = nslookup(asker, "ghost.internal")
        assert code != 0 and "NXDOMAIN" in text and not found, text
        code, found, text = nslookup(asker, FORWARDED)
        assert code == 0 and found == [FORWARDED_ANSWER], text
        assert FORWARDED in servers.upstream.asked and "web.internal" not in servers.upstream.asked

        # A change of the lookup shows at once (TTL 1 s, and the embedded DNS keeps no cache).
        names["web"] = [ips[0]]
        wait_for(lambda: nslookup(asker, "web.internal")[1] == [ips[0]], 10, "the new answer", interval=POLL)
        assert servers.server is not None and servers.server.stats.foreign == 0
    finally:
        servers.stop()
        remove_node_containers(node)
        runtime.close()


def test_the_server_refuses_the_hosts_own_queries_from_outside_the_subnet(network: Any) -> None:
    """Bound on the gateway, asked from the host's loopback: not a container of the subnet."""
    servers = Servers({"web": ["10.213.0.9"]})
    try:
        servers.start()

        async def ask() -> bool:
            loop = asyncio.get_running_loop()
            got: asyncio.Future[bytes] = loop.create_future()

            class Client(asyncio.DatagramProtocol):
                def datagram_received(self, data: bytes, addr: Any) -> None:
                    if not got.done():
                        got.set_result(data)

            t, _ = await loop.create_datagram_endpoint(Client, local_addr=("127.0.0.1", 0))
            try:
                msg = struct.pack(">HHHHHH", 1, 0x100, 1, 0, 0, 0) + dnswire.encode_name("web.internal") + b"\0\1\0\1"
                t.sendto(msg, (GATEWAY, PORT))
                try:
                    await asyncio.wait_for(got, 1.0)
                except TimeoutError:
                    return False
                return True
            finally:
                t.close()

        assert servers.run(ask()) is False
        assert servers.server is not None
        wait_for(lambda: servers.server is not None and servers.server.stats.foreign == 1, 5, "the refusal",
                 interval=POLL)
    finally:
        servers.stop()


def test_an_agents_replicas_resolve_the_clusters_apps(agent_factory: Factory) -> None:
    """Two hosts with their own engine and agent (network enabled): each replica's resolver
    is its node's gateway, where the agent answers ``hello.internal`` with the serving
    replicas of both nodes, as ``apps show`` lists them."""
    with nethosts.engine_hosts(2, "nm", 73) as hosts:
        for h in hosts:
            h.sh("ip", "route", "add", "default", "via", "10.77.73.1")
        env = [{**h.env, "PLEACO_NETWORK_ENABLED": "true"} for h in hosts]
        first = agent_factory("n0", host=hosts[0].ip, prefix=hosts[0].prefix, env=env[0],
                              extra_args=["--gossip-listen", "0.0.0.0:7401"])
        first.client.request("POST", "/v1/cluster/init")
        token = first.client.request("GET", "/v1/cluster/token")["token"]
        agents = [first, agent_factory("n1", host=hosts[1].ip, prefix=hosts[1].prefix, env=env[1],
                                       extra_args=["--gossip-listen", "0.0.0.0:7401", "--join-token", token])]
        wait_for(lambda: sum(n["state"] == "alive" for n in first.client.nodes()) == 2, 40, "2 nodes alive",
                 interval=POLL)
        first.client.deploy("hello", {"image": "pleaco/hello:latest", "replicas": 2, "port": 8080,
                                      "health": "/healthz"})

        def serving() -> set[str]:
            return {i["address"].rpartition(":")[0] for i in first.client.app("hello")["instances"]
                    if i.get("serving")}

        wait_for(lambda: len(serving()) == 2, 60, "2 serving replicas", interval=POLL)
        addresses = serving()
        by_node = {a.node_id: h for a, h in zip(agents, hosts, strict=True)}
        assert {i["node"] for i in first.client.app("hello")["instances"]} == set(by_node)
        for node_id, h in by_node.items():
            client = h.docker()
            try:
                [replica] = client.containers.list(filters={"label": "pleaco.app=hello"})
                subnet = next(n["subnet"] for n in first.client.nodes() if n["id"] == node_id)
                gateway = str(next(ipaddress.IPv4Network(subnet).hosts()))
                assert replica.attrs["HostConfig"]["Dns"] == [gateway]
                # Both nodes' replicas, whichever node asks (the agent's answer follows
                # the route records: wait for the other node's to arrive).
                wait_for(lambda r=replica: set(nslookup(r, "hello.internal")[1]) == addresses, 20,  # type: ignore[misc]
                         f"hello.internal from {h.ns}", interval=POLL)
                code, found, text = nslookup(replica, "ghost.internal")
                assert code != 0 and "NXDOMAIN" in text and not found, text
            finally:
                client.close()
        for a in agents:
            a.kill()
