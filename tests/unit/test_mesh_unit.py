"""The routing mesh's bookkeeping: where ports are published, what a node tells the others
about its replicas (the ``route`` records), and how a proxy routes to other nodes' replicas
and drains its own before they stop. The real thing, across agents and Caddy containers,
is tests/integration/test_proxy.py::test_an_app_on_node_a_answers_through_node_b_proxy."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pleaco.apps import AppStore
from pleaco.config import Config
from pleaco.identity import Identity
from pleaco.ingress.proxy import DNS_REFRESH, ProxyReconciler
from pleaco.metrics import Registry
from pleaco.reconcile.apps import AppReconciler
from pleaco.reconcile.drain import MESH_DELAY, Drain
from pleaco.reconcile.publish import local_dial_host, mesh_address, publish_host
from pleaco.reconcile.routes import InstanceStatus, RouteTable
from pleaco.reconcile.view import NodeView
from pleaco.runtime import ContainerInfo
from pleaco.runtime.memory import MemoryEngine
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
    """One node's app loop and proxy loop over the engine twin (pleaco.runtime.memory). The
    other node is live but runs none of the app's replicas (no capacity for it), so this
    node places both; what the other node runs comes from its route record."""

    def __init__(self, tmp_path: Path, live: list[str]) -> None:
        identity = Identity.generate()
        self.id = identity.node_id
        self.cfg = Config(data_dir=tmp_path, proxy_image="")
        self.store = Store(tmp_path / "state.db", identity)
        self.apps = AppStore(self.store, max_replicas=10)
        self.live = [self.id, *live]
        self.drain = Drain(0.0, proxy_delay=DNS_REFRESH, mesh=lambda: len(self.live) > 1)
        self.view = NodeView(self.id, self.apps, self.drain, advertise_host="10.0.0.5")
        self.engine = MemoryEngine(images=("img",))
        self.loop = asyncio.new_event_loop()
        self.routes = routes = RouteTable(self.store, self.id)
        self.rec = AppReconciler(self.cfg, self.view, routes, self.engine, Registry(), live_nodes=lambda: self.live,
                                 weights=lambda: dict.fromkeys(live, 0.0), probe=self.engine.probe)
        self.loop.run_until_complete(self.rec.setup())
        self.proxy = ProxyReconciler(self.cfg, tmp_path, self.view, routes, self.rec.runtime, Registry(),
                                     live_nodes=lambda: self.live)

    def step(self) -> None:
        """One app loop pass, and the container starts it decided."""
        self.loop.run_until_complete(self.rec.step())
        self.loop.run_until_complete(self.rec.wait_actions())

    def up(self, app: str, unhealthy: frozenset[int] = frozenset()) -> dict[int, ContainerInfo]:
        """Start the app's replicas and probe them; those in ``unhealthy`` fail their probe."""
        self.step()  # starts them
        containers = {c.replica: c for c in self.engine.list_managed(self.id, app)}
        for idx in unhealthy:
            self.engine.set_healthy(containers[idx].id, False)
        self.step()  # probes them and publishes
        return containers

    def own_records(self, app: str) -> list[InstanceStatus]:
        """This node's instances of ``app`` as its route records say."""
        return self.routes.instances(app, self.live, include_own=True)

    def publish(self, now: float = 0.0) -> None:
        """What the app loop's pass ends with: the route records and the drain's view."""
        self.rec.publish({s.name: s for s in self.apps.specs()}, self.view.observed.containers, now)

    def close(self) -> None:
        self.loop.run_until_complete(self.rec.teardown())
        self.loop.close()
        self.store.close()


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    n = Node(tmp_path, [OTHER])
    n.apps.deploy("web", {"image": "img", "replicas": 2, "port": 8080, "health": "/healthz"})
    yield n
    n.close()


def test_route_records_say_where_replicas_are_dialled_and_whether_they_serve(node: Node) -> None:
    cs = node.up("web", unhealthy=frozenset({1}))
    got = {i.replica: (i.address, i.serving) for i in node.own_records("web")}
    # Serving is one rule for the record and the proxy (healthy, current, not draining).
    assert got == {0: (f"10.0.0.5:{cs[0].host_port}", True), 1: (f"10.0.0.5:{cs[1].host_port}", False)}


def test_proxy_routes_to_other_live_nodes_serving_replicas(node: Node) -> None:
    own = node.up("web", unhealthy=frozenset({1}))[0]
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
    assert [u.address for u in route.upstreams] == [f"{own.ip}:8080", "10.0.0.6:32000"]


def test_a_rollout_on_another_node_never_leaves_the_app_with_no_upstream(tmp_path: Path) -> None:
    """Node A replaces its replica (a real app loop, its records as written); node B's
    proxy gets the record taking the old one out of service before the one putting the new
    one in (two records, either order by gossip). The old one still answers until A stops
    it: B routes to it meanwhile, rather than answer 503, and only while nothing serves."""
    a = Node(tmp_path / "a", [OTHER])
    b = Node(tmp_path / "b", [a.id])
    try:
        spec = {"image": "img", "replicas": 1, "port": 8080, "health": "/healthz"}
        a.apps.deploy("web", spec)
        b.apps.deploy("web", spec)
        old = a.up("web")[0]

        def records() -> dict[str, dict[str, Any]]:  # A's route records, as gossip brings them to B
            return {r.key: r.value for r in a.store.records("route") if r.value}

        def deliver(*keys: str) -> None:
            for key in keys:
                b.store.put("route", key, records()[key])

        def upstreams() -> list[str]:
            return [u.address for u in b.proxy.routes()[0].upstreams]

        old_key = f"web/{a.id}/{old.id[:12]}"
        deliver(old_key)
        assert upstreams() == [f"10.0.0.5:{old.host_port}"]
        # The rollout on A: the new release starts, passes its probe, and the old one drains.
        a.apps.deploy("web", {**spec, "env": {"GREETING": "v2"}})
        for _ in range(4):
            a.step()
        [new] = [c for c in a.engine.list_managed(a.id, "web") if c.release == 2]
        new_key = f"web/{a.id}/{new.id[:12]}"
        assert records()[new_key]["serving"] and not records()[old_key]["serving"]
        assert records()[old_key]["draining"] and not records()[old_key]["healthy"]  # of the last release
        deliver(old_key)  # the old one's "not serving" first
        assert upstreams() == [f"10.0.0.5:{old.host_port}"]
        deliver(new_key)
        assert upstreams() == [f"10.0.0.5:{new.host_port}"]  # only the new, once it serves
        # Not one that stopped, nor one that is out without being drained (it failed its
        # probe), nor anything for an app scaled to zero.
        b.store.put("route", new_key, {**records()[new_key], "serving": False, "healthy": False})
        b.store.put("route", old_key, {**records()[old_key], "state": "exited"})
        assert upstreams() == []
        b.store.put("route", old_key, records()[old_key])
        assert upstreams() == [f"10.0.0.5:{old.host_port}"]
        b.apps.scale("web", 0)
        assert upstreams() == []
    finally:
        a.close()
        b.close()


def test_a_replica_leaves_every_proxy_before_it_stops(node: Node) -> None:
    c = node.up("web", unhealthy=frozenset({1}))[0]
    node.publish(now=1000.0)
    spec = node.apps.get("web")
    assert node.view.serving(c, spec)
    # No local proxy (proxy_image ""), but another node's proxy may route to it: drain first.
    assert not node.drain.may_remove(c, "scaled down", now=1000.0)
    assert not node.view.serving(c, spec)
    writes = node.store.count()
    node.publish(now=1000.0)  # the next pass leaves it out of the route record: one write
    assert {i.replica: i.serving for i in node.own_records("web")} == {0: False, 1: False}
    assert node.store.count() == writes  # the record was replaced, not added to
    assert [u.address for u in node.proxy.routes()[0].upstreams] == []  # and of this node's proxy
    # The others need the record to reach them, then their DNS refresh.
    assert not node.drain.may_remove(c, "scaled down", now=1000.0 + MESH_DELAY)
    assert node.drain.may_remove(c, "scaled down", now=1000.0 + MESH_DELAY + DNS_REFRESH)


def test_a_health_change_is_one_route_record_write(node: Node) -> None:
    c = node.up("web", unhealthy=frozenset({0, 1}))[0]
    key = f"web/{node.id}/{c.id[:12]}"  # one record per instance
    before = node.store.get("route", key)
    node.engine.set_healthy(c.id, True)
    node.step()  # the probe passes: healthy and serving, in one write
    after = node.store.get("route", key)
    assert before is not None and after is not None and after.ts > before.ts
    assert after.value is not None and after.value["serving"] and after.value["healthy"]
    node.publish()  # the proxy's pass, or the next app loop pass, writes nothing more
    node.step()
    assert node.store.get("route", key) == after
    assert c.id in node.drain.serving


def test_alone_without_a_proxy_nothing_waits(tmp_path: Path) -> None:
    n = Node(tmp_path, [])
    n.apps.deploy("web", {"image": "img", "replicas": 1, "port": 8080})
    c = n.up("web")[0]
    assert n.view.serving(c, n.apps.get("web"))
    assert n.drain.may_remove(c, "scaled down")  # nothing routes to it: no drain
    n.close()


def test_the_proxy_computes_its_routes_again_only_when_their_inputs_changed(node: Node) -> None:
    node.up("web")
    first = node.proxy.routes()
    assert node.proxy.routes() is first  # nothing changed: the same list, no work
    node.apps.deploy("api", {"image": "img", "replicas": 0, "port": 9090})  # a store change
    second = node.proxy.routes()
    assert second is not first and {r.app for r in second} == {"web", "api"}
    c = node.engine.list_managed(node.id, "web")[0]
    node.engine.set_healthy(c.id, False)
    for _ in range(4):  # the probe fails health_failures times: this node's view changes
        node.step()
    assert node.proxy.routes() is not second
