"""The network loop against a fake engine and mesh (the real ones: tests/integration/test_network.py):
it claims a subnet, makes the network on it, moves when its claim loses, and hands the
mesh the live peers with their subnets."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from pleaco.apps import AppStore
from pleaco.identity import Identity
from pleaco.net import wireguard
from pleaco.net.config import NetworkSettings
from pleaco.net.peer import Peer
from pleaco.reconcile.drain import Drain
from pleaco.reconcile.network import LiveMember, NetworkLoop
from pleaco.reconcile.routes import RouteTable
from pleaco.reconcile.status import app_status
from pleaco.reconcile.view import NodeView
from pleaco.runtime.docker import ContainerInfo, NetworkInfo, NetworkSpec
from pleaco.store import Store

net = ipaddress.IPv4Network


class FakeNetworks:
    def __init__(self, node: str) -> None:
        self.node = node
        self.networks: dict[str, NetworkInfo] = {}
        self.removed: list[str] = []
        self.replicas: list[ContainerInfo] = []
        self.connected: list[str] = []

    def find_network(self, name: str) -> NetworkInfo | None:
        return self.networks.get(name)

    def network_subnets(self) -> list[tuple[str, str]]:
        return [(n.name, s) for n in self.networks.values() for s in n.subnets]

    def create_network(self, spec: NetworkSpec) -> str:
        assert spec.name not in self.networks
        self.networks[spec.name] = NetworkInfo("id-" + spec.subnet, spec.name, "bridge", (spec.subnet,),
                                               spec.bridge, spec.labels, ())
        return "id"

    def remove_network(self, name: str) -> None:
        assert not self.networks[name].containers
        del self.networks[name]

    def remove(self, container_id: str, node_id: str, stop_timeout: int = 10) -> None:
        if not container_id.startswith(node_id):
            raise PermissionError(container_id)
        self.removed.append(container_id)
        info = self.networks["pleaco"]
        self.networks["pleaco"] = NetworkInfo(info.id, info.name, info.driver, info.subnets, info.bridge,
                                              info.labels, tuple(c for c in info.containers if c != container_id))


    def list_managed(self, node_id: str, app: str | None = None) -> list[ContainerInfo]:
        return [c for c in self.replicas if c.node == node_id]

    def connect_network(self, network: str, container_id: str, node_id: str) -> None:
        self.connected.append(container_id)


class FakeMesh:
    def __init__(self) -> None:
        self.applied: list[tuple[Peer, list[Peer]]] = []

    def apply(self, me: Peer, peers: Sequence[Peer]) -> None:
        self.applied.append((me, list(peers)))

    def close(self) -> None:
        pass


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "state.db", Identity.load_or_create(tmp_path))
    yield s
    s.close()


def make_loop(store: Store, members: list[LiveMember], ready: bool = True) -> tuple[NetworkLoop, FakeNetworks,
                                                                                     FakeMesh, list[int]]:
    me = store.identity.node_id
    view = NodeView(me, AppStore(store, 100), Drain(0.0), cluster_network=True)
    engine, mesh, woken = FakeNetworks(me), FakeMesh(), []
    loop = NetworkLoop(NetworkSettings(), store, view, engine, mesh, advertised=lambda: "192.0.2.2:7401",
                       live_members=lambda: members, ready=lambda: ready, on_ready=lambda: woken.append(1))
    return loop, engine, mesh, woken


def test_the_first_step_claims_a_subnet_and_makes_the_network_on_it(store: Store, tmp_path: Path) -> None:
    b = Identity.generate()
    key = wireguard.load_or_create_key(tmp_path / "b").public
    store.put("subnet", b.node_id, {"subnet": "10.210.0.0/24"})
    store.put("subnet", "peer-gone", {"subnet": "10.210.5.0/24"})  # a member not alive: no peer
    # Its node record announces its WireGuard key, signed (a forged one is refused: test_net_mesh.py).
    store.put("node", b.node_id, {"public_key": b.public_key.hex(), **wireguard.record_fields(b, key, 51820)})
    loop, engine, mesh, woken = make_loop(store, [LiveMember(b.node_id, "192.0.2.3:7401")])
    assert asyncio.run(loop.step()) is None
    me = store.identity.node_id
    assert store.value("subnet", me) == {"subnet": "10.210.1.0/24"}
    made = engine.networks["pleaco"]
    assert made.subnets == ("10.210.1.0/24",) and made.bridge == "pleaco0"
    assert loop.view.network == "pleaco" and woken == [1]
    own, peers = mesh.applied[-1]
    assert own == Peer(me, "192.0.2.2", net("10.210.1.0/24"))
    assert peers == [Peer(b.node_id, "192.0.2.3", net("10.210.0.0/24"), key, 51820)]
    # Again: nothing changes, nothing is written.
    written = store.get("subnet", me)
    assert asyncio.run(loop.step()) is None
    assert store.get("subnet", me) == written and woken == [1]


def test_a_losing_claim_moves_and_the_network_follows(store: Store) -> None:
    me = store.identity.node_id
    store.put("subnet", "peer-b", {"subnet": "10.210.0.0/24"})  # earlier
    store.put("subnet", me, {"subnet": "10.210.0.0/24"})  # later: loses
    loop, engine, _, woken = make_loop(store, [])
    # This node's network and a replica on it, made under the old claim.
    engine.networks["pleaco"] = NetworkInfo("old", "pleaco", "bridge", ("10.210.0.0/24",), "pleaco0", {},
                                            (me + "-replica",))
    assert asyncio.run(loop.step()) == "moving"
    assert store.value("subnet", me) == {"subnet": "10.210.1.0/24"}
    assert engine.removed == [me + "-replica"] and loop.view.network == ""
    assert asyncio.run(loop.step()) is None
    assert engine.networks["pleaco"].subnets == ("10.210.1.0/24",) and loop.view.network == "pleaco"
    assert woken == [1]


def test_containers_of_others_on_an_old_network_are_an_error(store: Store) -> None:
    me = store.identity.node_id
    loop, engine, _, _ = make_loop(store, [])
    engine.networks["pleaco"] = NetworkInfo("old", "pleaco", "bridge", ("10.99.0.0/24",), "pleaco0", {},
                                            ("someone-elses",))
    with pytest.raises(RuntimeError, match="containers pleaco does not manage are attached"):
        asyncio.run(loop.step())
    assert store.value("subnet", me) == {"subnet": "10.210.0.0/24"}
    assert loop.view.network == "" and "containers pleaco does not manage" in loop.view.network_error


def test_nothing_is_claimed_before_the_node_heard_the_cluster(store: Store) -> None:
    loop, engine, mesh, _ = make_loop(store, [], ready=False)
    assert asyncio.run(loop.step()) == "waiting"
    assert store.value("subnet", store.identity.node_id) is None and not engine.networks and not mesh.applied


def test_a_full_cidr_claims_nothing_and_says_why(store: Store) -> None:
    me = store.identity.node_id
    store.put("subnet", "peer-b", {"subnet": "10.210.0.0/24"})
    loop, engine, _, _ = make_loop(store, [])
    loop.settings = NetworkSettings(cidr="10.210.0.0/24")
    loop.cidr = net("10.210.0.0/24")
    assert asyncio.run(loop.step()) == "no_subnet"
    assert store.value("subnet", me) is None and not engine.networks
    assert "no free subnet of /24 is left in network.cidr 10.210.0.0/24" in loop.last_error
    assert loop.view.network_error == loop.last_error


def replica(node: str, name: str, state: str, addresses: tuple[tuple[str, str], ...]) -> ContainerInfo:
    return ContainerInfo(name, name, "web", node, 1, 0, state, None, "img", None, 0,
                         ip=addresses[0][1] if addresses else "", network=addresses[0][0] if addresses else "",
                         addresses=addresses)


def test_running_replicas_of_an_earlier_version_join_the_network_without_a_restart(store: Store) -> None:
    me = store.identity.node_id
    loop, engine, _, _ = make_loop(store, [])
    engine.replicas = [
        replica(me, "old-bridge", "running", (("bridge", "172.17.0.5"),)),
        replica(me, "on-it", "running", (("pleaco", "10.210.0.2"),)),
        replica(me, "exited", "exited", ()),
        replica("other-node", "theirs", "running", (("bridge", "172.17.0.6"),)),
    ]
    assert asyncio.run(loop.step()) is None
    assert engine.connected == ["old-bridge"]


def test_apps_show_says_replicas_wait_for_the_network_and_why(store: Store) -> None:
    me = store.identity.node_id
    loop, engine, _, _ = make_loop(store, [])
    loop.view.apps.deploy("web", {"image": "img", "replicas": 2, "port": 8080})
    loop.view.observed.engine_ok = True
    engine.networks["pleaco"] = NetworkInfo("old", "pleaco", "bridge", ("10.99.0.0/24",), "pleaco0", {},
                                            ("someone-elses",))
    with pytest.raises(RuntimeError):
        asyncio.run(loop.step())
    spec = loop.view.apps.get("web")
    assert spec is not None
    status = app_status(loop.view, RouteTable(store, me), [me], spec, 2)
    assert status.state == "starting"
    assert status.message.startswith("replicas wait for this node's network: NetworkError: Docker network 'pleaco'")


def test_another_nodes_network_on_a_shared_engine_is_left_alone(store: Store) -> None:
    loop, engine, _, _ = make_loop(store, [])
    theirs = NetworkInfo("x", "pleaco", "bridge", ("10.210.0.0/24",), "pleaco0", {"pleaco.node": "other-node"}, ())
    engine.networks["pleaco"] = theirs
    with pytest.raises(RuntimeError, match="node other-node's: agents that share one engine must run with"):
        asyncio.run(loop.step())
    assert engine.networks["pleaco"] is theirs and loop.view.network == ""


def test_a_replica_keeps_its_address_before_the_loops_first_step_after_a_restart(store: Store) -> None:
    """At an agent start the app loop's first pass runs before the network loop's: the
    replicas already on the network keep their address (and so their routes)."""
    me = store.identity.node_id
    loop, _, _, _ = make_loop(store, [])
    loop.view.apps.deploy("web", {"image": "img", "replicas": 1, "port": 8080})
    spec = loop.view.apps.get("web")
    assert spec is not None and loop.view.network == ""
    on_it = replica(me, "on-it", "running", (("bridge", "172.17.0.5"), ("pleaco", "10.210.0.2")))
    assert loop.view.address(on_it, spec) == "10.210.0.2:8080"
    assert loop.view.probe_target(on_it, spec) == ("10.210.0.2", 8080)
    assert loop.view.address(replica(me, "old", "running", (("bridge", "172.17.0.5"),)), spec) == ""
