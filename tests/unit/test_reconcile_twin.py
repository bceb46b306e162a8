"""The app reconciler, whole (NodeView, Drain, RouteTable, a SQLite store), against the
in-memory engine twin (pleaco.runtime.memory) and through public interfaces only: what it
does about crashes, missing images, an engine that is down, rollouts, failed health, a
restarted agent and a second node. The same reconciler against Docker Engine:
tests/integration/test_reconcile.py."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pleaco.apps import AppSpec, AppStore
from pleaco.identity import Identity
from pleaco.metrics import Registry
from pleaco.reconcile.apps import AppReconciler
from pleaco.reconcile.config import ReconcileSettings, RolloutConfig
from pleaco.reconcile.drain import Drain
from pleaco.reconcile.routes import RouteTable
from pleaco.reconcile.status import AppStatus, app_status
from pleaco.reconcile.view import NodeView, ReplicaState
from pleaco.runtime import Conflict, ContainerInfo, EngineUnavailable, NotFound, RunSpec
from pleaco.runtime.docker import InfraSpec, container_name
from pleaco.runtime.memory import MemoryEngine
from pleaco.store import Store

IMG = "pleaco/hello:1"
BASE = 0.3  # crash back-off base (seconds): the tests wait it out, by polling
DEADLINE = 15.0  # seconds a condition may take to be reached under load
POLL = 0.02  # seconds between checks of a condition


def settings(**kw: object) -> ReconcileSettings:
    cfg = dict(backoff_base=BASE, backoff_max=10.0, health_failures=2, health_grace=0.0,
               image_recheck_interval=0.0, reconcile_interval=0.05, stop_timeout=1)
    cfg.update(kw)
    return ReconcileSettings(**cfg)  # type: ignore[arg-type]  # (tests are not type-checked)


class Node:
    """One agent's app loop: its view, drain and route records over a shared store."""

    def __init__(self, loop: asyncio.AbstractEventLoop, store: Store, engine: MemoryEngine, node_id: str,
                 live: Callable[[], list[str]], cfg: ReconcileSettings, drain: Drain | None = None) -> None:
        self.loop = loop
        self.id = node_id
        self.engine = engine
        self.live = live
        self.apps = AppStore(store, 100)
        self.drain = drain or Drain(0.0)
        self.view = NodeView(node_id, self.apps, self.drain)
        self.routes = RouteTable(store, node_id)
        self.registry = Registry()
        self.rec = AppReconciler(cfg, self.view, self.routes, engine, self.registry, live_nodes=live,
                                 probe=engine.probe)
        loop.run_until_complete(self.rec.setup())

    def step(self) -> str | None:
        """One pass, and the actions it started run to their end."""
        result = self.loop.run_until_complete(self.rec.step())
        self.loop.run_until_complete(self.rec.wait_actions())
        return result

    def settle(self, until: Callable[[], bool], what: str, each: Callable[[], None] = lambda: None) -> None:
        """Passes until ``until()`` holds (``each()`` checked after every pass), with a deadline."""
        deadline = time.monotonic() + DEADLINE
        while time.monotonic() < deadline:
            self.step()
            each()
            if until():
                return
            self.loop.run_until_complete(asyncio.sleep(POLL))
        raise AssertionError(f"node {self.id[:8]} did not reach: {what}")

    def containers(self, app: str = "web") -> list[ContainerInfo]:
        return self.engine.list_managed(self.id, app)

    def status(self, app: str = "web") -> AppStatus:
        spec = self.spec(app)
        return app_status(self.view, self.routes, self.live(), spec, self.apps.replicas(app))

    def spec(self, app: str = "web") -> AppSpec:
        spec = self.apps.get(app)
        assert spec is not None
        return spec

    def replica(self, idx: int, app: str = "web") -> ReplicaState:
        return self.view.replicas[(app, idx)]

    def close(self) -> None:
        self.loop.run_until_complete(self.rec.teardown())


class World:
    """One store (what gossip would make of several), one engine, any number of nodes."""

    def __init__(self, tmp_path: Path) -> None:
        self.loop = asyncio.new_event_loop()
        self.store = Store(tmp_path / "state.db", Identity.generate())
        self.engine = MemoryEngine(images=(IMG,))
        self.nodes: list[Node] = []

    def node(self, node_id: str | None = None, live: Callable[[], list[str]] | None = None,
             drain: Drain | None = None, **cfg: object) -> Node:
        nid = node_id or self.store.identity.node_id
        n = Node(self.loop, self.store, self.engine, nid, live or (lambda: [nid]), settings(**cfg), drain)
        self.nodes.append(n)
        return n

    def close(self) -> None:
        for n in self.nodes:
            n.close()
        self.loop.close()
        self.store.close()


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = World(tmp_path)
    try:
        yield w
    finally:
        w.close()


def running(n: Node, app: str = "web") -> list[ContainerInfo]:
    return [c for c in n.containers(app) if c.running]


def deploy(n: Node, replicas: int, image: str = IMG, health: str | None = "/healthz") -> None:
    body: dict[str, object] = {"image": image, "replicas": replicas, "port": 8080}
    if health:
        body["health"] = health
    n.apps.deploy("web", body)


def serving_in_records(world: World, n: Node, app: str = "web") -> dict[int, bool]:
    """Replica -> serving, as this node's route records tell the others."""
    return {i.replica: i.serving for i in RouteTable(world.store, n.id).instances(app, [n.id], include_own=True)}


def up(n: Node, replicas: int) -> None:
    n.settle(lambda: n.status().healthy == replicas and n.status().state == "running", f"{replicas} healthy")


# -- the twin itself keeps Docker's and the adapter's rules ---------------------------------


def test_twin_names_images_states_ports_and_ownership() -> None:
    engine = MemoryEngine(images=(IMG,))
    me, other = "a" * 32, "b" * 32
    spec = RunSpec(app="web", node=me, release=1, replica=0, image=IMG, port=8080)
    cid = engine.run(spec)
    with pytest.raises(Conflict):
        engine.run(spec)
    with pytest.raises(NotFound):
        engine.run(RunSpec(app="web", node=me, release=1, replica=1, image="pleaco/missing:1"))
    [c] = engine.list_managed(me)
    assert (c.id, c.name, c.state, c.exit_code) == (cid, container_name("web", 1, 0, me), "running", None)
    assert c.host_port is not None and c.ip and c.host_ip == "127.0.0.1"
    assert engine.list_managed(other) == []
    with pytest.raises(PermissionError):
        engine.remove(cid, other)
    with pytest.raises(PermissionError):
        engine.stop(cid, other)
    engine.crash(cid, exit_code=3)
    [c] = engine.list_managed(me)
    # Docker frees the port and address of a stopped container.
    assert (c.state, c.exit_code, c.host_port, c.ip) == ("exited", 3, None, "")
    engine.start(cid)
    assert engine.list_managed(me)[0].running
    # Infrastructure is not a replica: list_managed never shows it, remove refuses it.
    proxy = engine.run_infra(InfraSpec(role="proxy", node=me, name="pleaco-proxy", image=IMG))
    assert [c.id for c in engine.list_managed(me)] == [cid]
    with pytest.raises(PermissionError):
        engine.remove(proxy, me)
    with pytest.raises(PermissionError):
        engine.remove_infra(proxy, other, "proxy")
    info = engine.find_infra(me, "proxy")
    assert info is not None and info.id == proxy and info.running
    engine.set_down(True)
    with pytest.raises(EngineUnavailable):
        engine.list_managed(me)
    with pytest.raises(EngineUnavailable):
        engine.image_exists(IMG)
    engine.set_down(False)
    engine.remove(cid, me)
    with pytest.raises(NotFound):
        engine.start(cid)
    assert engine.actions == [("run", spec.name), ("start", spec.name), ("run_infra", "pleaco-proxy"),
                              ("remove", spec.name)]


# -- the reconciler against the twin --------------------------------------------------------


def test_replicas_start_with_their_deterministic_names_and_turn_healthy(world: World) -> None:
    n = world.node()
    deploy(n, 3)
    n.step()
    assert sorted(c.name for c in running(n)) == [container_name("web", 1, i, n.id) for i in range(3)]
    assert n.status().healthy == 0  # started, not probed yet
    up(n, 3)
    assert serving_in_records(world, n) == {0: True, 1: True, 2: True}


def test_half_made_replica_is_started_not_duplicated(world: World) -> None:
    n = world.node()
    deploy(n, 1)
    cid = world.engine.create(RunSpec(app="web", node=n.id, release=1, replica=0, image=IMG, port=8080))
    up(n, 1)
    assert [c.id for c in n.containers()] == [cid]


def test_scale_down_waits_for_the_drain(world: World) -> None:
    drain = Drain(0.5)
    n = world.node(drain=drain)
    deploy(n, 3)
    up(n, 3)
    ids = {c.replica: c.id for c in n.containers()}
    drain.proxy_applied(set(ids.values()))  # this node's proxy routes to all three
    n.apps.scale("web", 1)
    n.step()
    # Asked to drain, not stopped: out of the route record at once, still running.
    assert {c.id for c in running(n)} == set(ids.values())
    assert drain.draining(ids[1]) and drain.draining(ids[2]) and not drain.draining(ids[0])
    assert serving_in_records(world, n) == {0: True, 1: False, 2: False}
    drain.proxy_applied({ids[0]})  # the proxy's next pass applied it
    n.settle(lambda: [c.id for c in n.containers()] == [ids[0]], "the drained replicas removed")
    assert n.status().state == "running" and n.replica(0).restarts == 0


def test_a_crash_is_restarted_after_an_exponential_back_off(world: World) -> None:
    n = world.node()
    deploy(n, 1)
    up(n, 1)
    [c] = n.containers()
    world.engine.crash(c.id, exit_code=3)
    n.step()
    st = n.replica(0)
    assert (st.backoff.failures, st.last_exit_code, st.restarts) == (1, 3, 0)
    assert st.backoff.delay() == BASE
    assert not world.engine.healthy(c.id) and not n.containers()[0].running  # waiting out the back-off
    status = n.status()
    assert status.state == "crashloop" and "exited with code 3" in status.message
    assert status.instances[0].backoff_s > 0
    n.settle(lambda: n.status().state == "running", "restarted and healthy")
    assert n.replica(0).restarts == 1 and [x.id for x in n.containers()] == [c.id]  # the same container
    world.engine.crash(c.id, exit_code=3)
    n.step()
    assert n.replica(0).backoff.failures == 2 and n.replica(0).backoff.delay() == 2 * BASE
    assert "restarted 1 times" in n.status().message
    n.settle(lambda: n.status().state == "running", "restarted again")
    assert n.replica(0).restarts == 2


def test_a_missing_image_is_reported_and_the_app_starts_once_it_is_there(world: World) -> None:
    n = world.node()
    deploy(n, 1, image="pleaco/later:1")
    assert n.step() is None
    assert n.containers() == [] and n.status().state == "image_missing"
    world.engine.add_image("pleaco/later:1")
    up(n, 1)


def test_an_image_deleted_under_a_running_app_is_reported_by_the_failed_start(world: World) -> None:
    n = world.node()
    deploy(n, 1)
    up(n, 1)
    world.engine.remove_image(IMG)
    n.apps.scale("web", 2)
    n.step()  # the image was seen a moment ago: the start is tried, and fails NotFound
    status = n.status()
    assert status.state == "image_missing" and "No such image" in n.replica(1).last_error
    world.engine.add_image(IMG)
    up(n, 2)


def test_engine_down_is_a_result_and_the_loop_resumes(world: World) -> None:
    n = world.node()
    deploy(n, 2)
    up(n, 2)
    before = list(world.engine.actions)
    world.engine.set_down(True)
    assert n.step() == "engine_unreachable"
    status = n.status()
    assert status.state == "engine_unreachable" and "down" in status.message
    assert not n.view.observed.engine_ok
    world.engine.set_down(False)
    assert n.step() is None
    up(n, 2)
    assert world.engine.actions == before  # nothing was restarted or replaced


def test_a_command_checked_replica_serves_once_the_engine_says_healthy_and_is_stopped_when_not(
        world: World) -> None:
    n = world.node()
    world.engine.add_image("pleaco/redis:1", healthy=False)
    n.apps.deploy("cache", {"image": "pleaco/redis:1", "replicas": 1, "port": 6379,
                            "health_cmd": ["redis-cli", "ping"]})
    n.settle(lambda: len(n.containers("cache")) == 1, "a replica started")
    [c] = n.containers("cache")
    spec = n.apps.get("cache")
    assert spec is not None and c.running and c.health == "unhealthy"
    # The engine was given the check (Docker's Healthcheck, durations in nanoseconds).
    assert world.engine._get(c.id).healthcheck == {"test": ["CMD", "redis-cli", "ping"], "interval": 2_000_000_000,
                                                  "timeout": 5_000_000_000, "retries": 3, "start_period": 0}
    n.settle(lambda: n.replica(0, "cache").restarts >= 1, "a restart for the failed health command")
    assert "health command 'redis-cli ping' failed 3 times" in n.replica(0, "cache").last_error
    assert not n.view.serving(n.containers("cache")[0], spec)
    world.engine.set_healthy(c.id, True)
    n.settle(lambda: n.status("cache").healthy == 1, "healthy once the engine says so")
    assert n.view.serving(n.containers("cache")[0], spec)


def rollout_invariants(n: Node, replicas: int, surge: int, unavailable: int) -> Callable[[], None]:
    def check() -> None:
        spec = n.spec()
        cs = n.containers()
        new_not_serving = [c for c in cs if c.release == spec.revision and not n.view.serving(c, spec)]
        served = {c.replica for c in cs if n.view.serving(c, spec)}
        assert len(new_not_serving) <= surge + unavailable, cs
        assert len(cs) <= replicas + surge, cs
        assert len(served) >= replicas - unavailable, cs
    return check


def test_rollout_is_start_first_within_max_surge(world: World) -> None:
    n = world.node(rollout=RolloutConfig(max_surge=1, max_unavailable=0))
    deploy(n, 4)
    up(n, 4)
    check = rollout_invariants(n, 4, surge=1, unavailable=0)
    world.engine.add_image("pleaco/hello:2", healthy=False)
    deploy(n, 4, image="pleaco/hello:2")
    for _ in range(3):  # the new release's first replica is not healthy: the rollout waits
        n.step()
        check()
    [new] = [c for c in n.containers() if c.release == 2]
    assert len([c for c in n.containers() if c.release == 1 and c.running]) == 4
    world.engine.set_healthy(new.id, True)
    world.engine.add_image("pleaco/hello:2", healthy=True)
    n.settle(lambda: {c.release for c in n.containers()} == {2} and n.status().healthy == 4,
             "all replicas on release 2", each=check)
    assert len(n.containers()) == 4


def test_rollout_stops_first_within_max_unavailable_when_no_surge(world: World) -> None:
    n = world.node(rollout=RolloutConfig(max_surge=0, max_unavailable=1))
    deploy(n, 3)
    up(n, 3)
    check = rollout_invariants(n, 3, surge=0, unavailable=1)
    world.engine.add_image("pleaco/hello:2")
    deploy(n, 3, image="pleaco/hello:2")
    n.settle(lambda: {c.release for c in n.containers()} == {2} and n.status().healthy == 3,
             "all replicas on release 2", each=check)


def test_an_app_with_volumes_rolls_stop_first_whatever_the_surge(world: World) -> None:
    # Its new process must never open the data its old one still holds (a database's lock).
    n = world.node(rollout=RolloutConfig(max_surge=5, max_unavailable=0))
    n.apps.deploy("web", {"image": IMG, "replicas": 2, "port": 8080, "health": "/healthz", "volumes": ["d:/d"]})
    up(n, 2)
    world.engine.add_image("pleaco/hello:2")
    check = rollout_invariants(n, 2, surge=0, unavailable=1)
    n.apps.deploy("web", {"image": "pleaco/hello:2", "replicas": 2, "port": 8080, "health": "/healthz",
                          "volumes": ["d:/d"]})
    n.settle(lambda: {c.release for c in n.containers()} == {2} and n.status().healthy == 2,
             "all replicas on release 2", each=check)


def test_an_unhealthy_replica_is_restarted_after_health_failures(world: World) -> None:
    n = world.node()
    deploy(n, 1)
    up(n, 1)
    [c] = n.containers()
    world.engine.set_healthy(c.id, False)
    n.step()
    assert n.replica(0).health_failures == 1 and c.running  # one failure is not enough (health_failures=2)
    n.settle(lambda: n.replica(0).restarts >= 1, "a restart for failed health")
    assert "health check /healthz failed 2 times" in n.replica(0).last_error
    assert ("stop", c.name) in world.engine.actions and world.engine.actions[-1] == ("start", c.name)
    world.engine.set_healthy(c.id, True)
    up(n, 1)


def test_a_new_reconciler_adopts_the_replicas_without_restarting_them(world: World) -> None:
    first = world.node()
    deploy(first, 2)
    up(first, 2)
    first.close()
    world.nodes.remove(first)
    before = list(world.engine.actions)
    second = world.node()  # a fresh agent life: no memory of the replicas
    up(second, 2)
    assert world.engine.actions == before
    assert second.registry.render().count('pleaco_reconcile_actions_total{action="start"') == 0


def test_two_nodes_on_one_engine_place_replicas_without_overlap(world: World) -> None:
    alive = ["a" * 32, "b" * 32]
    a = world.node(alive[0], live=lambda: list(alive))
    b = world.node(alive[1], live=lambda: list(alive))
    deploy(a, 6)

    def placed() -> bool:
        a.step()
        b.step()
        return a.status().healthy == 6 and b.status().healthy == 6

    a.settle(placed, "6 replicas over two nodes")
    on_a, on_b = {c.replica for c in running(a)}, {c.replica for c in running(b)}
    assert on_a and on_b and not on_a & on_b and on_a | on_b == set(range(6))
    assert all(c.node == a.id for c in a.containers()) and all(c.node == b.id for c in b.containers())
    with pytest.raises(PermissionError):
        world.engine.remove(b.containers()[0].id, a.id)
    # b is gone: a takes its replicas over and leaves b's containers alone.
    alive.remove(b.id)
    theirs = {c.id for c in b.containers()}
    a.settle(lambda: {c.replica for c in running(a)} == set(range(6)), "a runs all 6")
    assert {c.id for c in b.containers()} == theirs


def test_foreign_containers_are_never_touched(world: World) -> None:
    n = world.node()
    other = "f" * 32
    plain = world.engine.run_by_hand(IMG, "plain")
    partial = world.engine.run_by_hand(IMG, "partial", {"pleaco.app": "web", "pleaco.node": n.id})
    theirs = world.engine.run_by_hand(IMG, "theirs", RunSpec(app="web", node=other, release=1, replica=0,
                                                               image=IMG).labels())
    deploy(n, 0)
    for _ in range(3):
        n.step()
    for cid in (plain, partial, theirs):
        assert world.engine.healthy(cid), cid
    assert world.engine.actions == []
