"""The routing mesh's bookkeeping: where ports are published, what a node tells the others
about its replicas (the ``route`` records), and how a proxy routes to other nodes' replicas
and drains its own before they stop. The real thing, across agents and Caddy containers,
is tests/integration/test_proxy.py::test_an_app_on_node_a_answers_through_node_b_proxy."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from pleaco.apps import AppStore
from pleaco.config import Config
from pleaco.identity import Identity
from pleaco.ingress.proxy import DNS_REFRESH, ProxyReconciler
from pleaco.metrics import Registry
from pleaco.reconcile.apps import AppReconciler
from pleaco.reconcile.backoff import Backoff
from pleaco.reconcile.drain import MESH_DELAY, Drain
from pleaco.reconcile.publish import local_dial_host, mesh_address, publish_host
from pleaco.reconcile.routes import InstanceStatus, RouteTable
from pleaco.reconcile.view import NodeView, ReplicaState
from pleaco.runtime import ContainerInfo, DockerRuntime
from pleaco.store import Store

OTHER, DEAD = "b" * 32, "d" * 32


def test_ports_are_published_on_the_advertised_address_never_on_all_interfaces_by_default() -> None:
    assert publish_host("", "10.0.0.5") == "10.0.0.5"
    assert publish_host("", "127.0.0.3") == "127.0.0.1"  # nodes sharing one machine
    assert publish_host("", "0.0.0.0") == "127.0.0.1"
    assert publish_host("0.0.0.0", "10.0.0.5") == "0.0.0.0"  # said explicitly
    assert local_dial_host("0.0.0.0") == "127.0.0.1" and local_dial_host("10.0.0.5") == "10.0.0.5"
    assert mesh_address("0.0.0.0", 3000, "10.0.0.5") == "10.0.0.5:3000"
    assert mesh_address("10.0.0.7", 3000, "10.0.0.5") == "10.0.0.7:3000"


class Node:
    def __init__(self, tmp_path: Path, live: list[str]) -> None:
        identity = Identity.generate()
        self.id = identity.node_id
        self.cfg = Config(data_dir=tmp_path, proxy_image="")
        self.store = Store(tmp_path / "state.db", identity)
        self.apps = AppStore(self.store, max_replicas=10)
        self.live = [self.id, *live]
        self.drain = Drain(0.0, proxy_delay=DNS_REFRESH, mesh=lambda: len(self.live) > 1)
        self.view = NodeView(self.id, self.apps, self.drain, advertise_host="10.0.0.5")
        self.routes = routes = RouteTable(self.store, self.id)
        self.rec = AppReconciler(self.cfg, self.view, routes, DockerRuntime("tcp://127.0.0.1:9"), Registry(),
                                 live_nodes=lambda: self.live)
        self.proxy = ProxyReconciler(self.cfg, tmp_path, self.view, routes, self.rec.runtime, Registry(),
                                     live_nodes=lambda: self.live)

    def run(self, app: str, replica: int, healthy: bool = True) -> ContainerInfo:
        spec = self.apps.get(app)
        assert spec is not None
        c = ContainerInfo(id=f"{app}-{replica}" + "0" * 20, name=f"{app}-{replica}", app=app, node=self.id,
                          release=spec.revision, replica=replica, state="running", exit_code=None, image=spec.image,
                          host_port=31000 + replica, created=0, ip=f"172.17.0.{10 + replica}", host_ip="10.0.0.5")
        self.view.observed.containers.append(c)
        self.view.replicas[(app, replica)] = ReplicaState(Backoff(1, 60), healthy=healthy, container_id=c.id)
        return c

    def own_records(self, app: str) -> list[InstanceStatus]:
        """This node's instances of ``app`` as its route records say."""
        return self.routes.instances(app, self.live, include_own=True)

    def publish(self, now: float = 0.0) -> None:
        """What the app loop's pass ends with: the route records and the drain's view."""
        self.rec.publish({s.name: s for s in self.apps.specs()}, self.view.observed.containers, now)


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    n = Node(tmp_path, [OTHER])
    n.apps.deploy("web", {"image": "img", "replicas": 2, "port": 8080})
    yield n
    n.store.close()


def test_route_records_say_where_replicas_are_dialled_and_whether_they_serve(node: Node) -> None:
    node.run("web", 0)
    node.run("web", 1, healthy=False)
    node.publish()
    got = {i.replica: (i.address, i.serving) for i in node.own_records("web")}
    # Serving is one rule for the record and the proxy (healthy, current, not draining).
    assert got == {0: ("10.0.0.5:31000", True), 1: ("10.0.0.5:31001", False)}


def test_proxy_routes_to_other_live_nodes_serving_replicas(node: Node) -> None:
    node.run("web", 0)
    instance = {"replica": 1, "container": "c" * 12, "release": 1, "state": "running", "healthy": True,
                "host_port": 32000, "restarts": 0, "last_exit_code": None, "backoff_s": 0.0, "error": ""}
    node.store.put("route", f"web/{OTHER}", {"app": "web", "node": OTHER, "instances": [
        {**instance, "address": "10.0.0.6:32000", "serving": True},
        {**instance, "replica": 2, "container": "e" * 12, "address": "10.0.0.6:32001", "serving": False},
        # Published on its loopback (set so by hand): not reachable from this machine.
        {**instance, "replica": 3, "container": "f" * 12, "address": "127.0.0.1:32002", "serving": True},
    ]})
    node.store.put("route", f"web/{DEAD}", {"app": "web", "node": DEAD, "instances": [
        {**instance, "address": "10.0.0.9:32000", "serving": True}]})
    [route] = node.proxy.routes()
    # Its own replica on the Docker network address; the other node's serving one where it
    # is published; not the one that node drains, not one on that node's loopback, nor
    # anything on a node that is not live.
    assert [u.address for u in route.upstreams] == ["172.17.0.10:8080", "10.0.0.6:32000"]


def test_a_replica_leaves_every_proxy_before_it_stops(node: Node) -> None:
    c = node.run("web", 0)
    node.publish(now=1000.0)
    spec = node.apps.get("web")
    assert node.view.serving(c, spec)
    # No local proxy (proxy_image ""), but another node's proxy may route to it: drain first.
    assert not node.drain.may_remove(c, "scaled down", now=1000.0)
    assert not node.view.serving(c, spec)
    writes = node.store.count()
    node.publish(now=1000.0)  # the next pass leaves it out of the route record: one write
    [inst] = node.own_records("web")
    assert not inst.serving
    assert node.store.count() == writes  # the record was replaced, not added to
    assert [u.address for u in node.proxy.routes()[0].upstreams] == []  # and of this node's proxy
    # The others need the record to reach them, then their DNS refresh.
    assert not node.drain.may_remove(c, "scaled down", now=1000.0 + MESH_DELAY)
    assert node.drain.may_remove(c, "scaled down", now=1000.0 + MESH_DELAY + DNS_REFRESH)


def test_a_health_change_is_one_route_record_write(node: Node) -> None:
    c = node.run("web", 0, healthy=False)
    node.publish()
    key = f"web/{node.id}/{c.id[:12]}"  # one record per instance
    before = node.store.get("route", key)
    node.view.replicas[("web", 0)].healthy = True
    node.publish()
    after = node.store.get("route", key)
    assert before is not None and after is not None and after.ts > before.ts
    assert after.value is not None and after.value["serving"] and after.value["healthy"]
    node.publish()  # the proxy's pass, or the next app loop pass, writes nothing more
    assert node.store.get("route", key) == after
    assert c.id in node.drain.serving


def test_alone_without_a_proxy_nothing_waits(tmp_path: Path) -> None:
    n = Node(tmp_path, [])
    n.apps.deploy("web", {"image": "img", "replicas": 1, "port": 8080})
    c = n.run("web", 0)
    n.publish()
    assert n.drain.may_remove(c, "scaled down")  # nothing routes to it: no drain
    n.store.close()
