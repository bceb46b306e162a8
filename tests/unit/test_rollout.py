"""Automatic rollback: the deadline, the reason, no rollback of a rollback, and one
decision per release for the whole cluster, taken by the app's owner."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pleaco.apps import AppSpec, AppStore
from pleaco.identity import Identity
from pleaco.metrics import Registry
from pleaco.placement import Owners, app_owner
from pleaco.reconcile.backoff import Backoff
from pleaco.reconcile.config import RolloutConfig
from pleaco.reconcile.drain import Drain
from pleaco.reconcile.rollout import RolloutGuard
from pleaco.reconcile.routes import RouteTable
from pleaco.reconcile.status import local_instances
from pleaco.reconcile.view import NodeView, Observation, ReplicaState
from pleaco.runtime import ContainerInfo
from pleaco.store import Store


class Node:
    """One node's guard over a shared store (what gossip would make of several stores)."""

    def __init__(self, store: Store, apps: AppStore, node_id: str, live: list[str], deadline: float = 10.0) -> None:
        self.id = node_id
        self.live = live
        self.view = NodeView(node_id, apps, Drain(0.0))
        self.view.observed = Observation(engine_ok=True)
        self.routes = RouteTable(store, node_id)
        self.rollbacks = 0
        self.guard = RolloutGuard(RolloutConfig(deadline=deadline), self.view, self.routes,
                                  Owners(node_id, lambda: self.live), Registry(), lambda: self.live,
                                  on_rollback=self.rolled_back)

    def rolled_back(self) -> None:
        self.rollbacks += 1

    def run(self, app: str, release: int, healthy: bool, error: str = "", replica: int = 0) -> None:
        cid = f"{app}-{release}-{replica}-{self.id[:4]}"
        obs = self.view.observed
        obs.containers = [c for c in obs.containers if (c.app, c.replica) != (app, replica)] + [ContainerInfo(
            id=cid, name=cid, app=app, node=self.id, release=release, replica=replica, state="running",
            exit_code=None, image="img", host_port=30000, created=0)]
        self.view.replicas[(app, replica)] = ReplicaState(Backoff(1, 60), healthy=healthy, container_id=cid,
                                                          last_error=error)

    def publish(self) -> None:
        specs = {s.name: s for s in self.view.apps.specs()}
        self.view.drain.observe_serving(set(), set())
        self.routes.publish({a: local_instances(self.view, specs[a]) for a in specs}, "127.0.0.1")


@pytest.fixture
def apps(tmp_path: Path) -> Iterator[AppStore]:
    store = Store(tmp_path / "state.db", Identity.generate())
    yield AppStore(store, max_replicas=10)
    store.close()


def deploy(apps: AppStore, greeting: str, health: str = "/healthz", replicas: int = 1) -> AppSpec:
    return apps.deploy("web", {"image": "img", "port": 8080, "health": health, "env": {"G": greeting},
                               "replicas": replicas}).spec


def created(apps: AppStore, revision: int) -> float:
    release = apps.release("web", revision)
    assert release is not None
    return int(release["created_ms"]) / 1000


def alone(apps: AppStore, **kw: Any) -> Node:
    me = apps.store.identity.node_id
    return Node(apps.store, apps, me, [me], **kw)


def test_a_release_unhealthy_past_the_deadline_is_rolled_back_with_the_reason(apps: AppStore) -> None:
    n = alone(apps)
    deploy(apps, "v1")
    n.run("web", 1, healthy=True)
    n.guard.check(created(apps, 1))
    deploy(apps, "v2", health="/nope")
    n.run("web", 2, healthy=False, error="health check /nope failed 3 times")
    t0 = created(apps, 2)
    n.guard.check(t0 + 9.0)
    assert apps.get("web").revision == 2  # type: ignore[union-attr]  # within the deadline
    n.guard.check(t0 + 10.5)
    spec = apps.get("web")
    assert spec is not None and spec.revision == 3 and spec.env == {"G": "v1"} and spec.health == "/healthz"
    release = apps.release("web", 3)
    assert release is not None and release["rollback_of"] == 1 and release["rolled_back_from"] == 2
    assert "revision 2 was not healthy within 10s" in release["reason"] and "/nope" in release["reason"]
    failed = apps.release("web", 2)
    assert failed is not None and failed["verdict"] == "rolled_back"
    assert n.rollbacks == 1
    # The rollback itself failing is not rolled back again.
    n.run("web", 3, healthy=False)
    n.guard.check(created(apps, 3) + 20)
    n.guard.check(created(apps, 3) + 25)
    assert apps.get("web").revision == 3  # type: ignore[union-attr]
    assert (apps.release("web", 3) or {}).get("verdict") == "failed"


def test_a_release_that_turned_healthy_once_is_never_rolled_back_by_any_owner(apps: AppStore) -> None:
    n = alone(apps)
    deploy(apps, "v1")
    deploy(apps, "v2")
    n.run("web", 2, healthy=True)
    t0 = created(apps, 2)
    n.guard.check(t0)
    assert (apps.release("web", 2) or {}).get("verdict") == "healthy"
    n.run("web", 2, healthy=False)  # later trouble is the back-off's business, not a rollout's
    n.guard.check(t0 + 15)
    later = alone(apps)  # a new owner (the agent restarted): the verdict is in the record
    later.run("web", 2, healthy=False)
    later.guard.check(t0 + 15)
    assert apps.get("web").revision == 2  # type: ignore[union-attr]


def test_no_verdict_without_the_engine_or_for_a_first_release(apps: AppStore) -> None:
    n = alone(apps)
    deploy(apps, "v1")
    n.run("web", 1, healthy=False)
    n.guard.check(created(apps, 1) + 20)
    assert apps.get("web").revision == 1  # type: ignore[union-attr]  # nothing to go back to
    deploy(apps, "v2")
    n.view.observed.engine_ok = False
    n.guard.check(created(apps, 2) + 20)
    assert apps.get("web").revision == 2  # type: ignore[union-attr]


def test_only_the_owner_decides_from_the_whole_clusters_health(apps: AppStore) -> None:
    ids = sorted(Identity.generate().node_id for _ in range(2))
    owner = app_owner("web", ids)
    other = next(i for i in ids if i != owner)
    # Every node writes with the same store identity here; the guards differ by node id.
    a, b = (Node(apps.store, apps, i, ids) for i in (owner, other))
    deploy(apps, "v1", replicas=2)
    deploy(apps, "v2", replicas=2)
    t0 = created(apps, 2)
    # Replica 0 healthy on the owner; replica 1 on the other node, healthy there (its record).
    a.run("web", 2, healthy=True, replica=0)
    b.run("web", 2, healthy=True, replica=1)
    b.routes.node_id = other
    b.publish()
    b.guard.check(t0 + 20)  # not its to decide
    assert (apps.release("web", 2) or {}).get("verdict") is None
    a.guard.check(t0 + 1)
    assert (apps.release("web", 2) or {}).get("verdict") == "healthy"


def test_when_the_owner_dies_mid_rollout_the_next_one_rolls_back_once(apps: AppStore) -> None:
    ids = sorted(Identity.generate().node_id for _ in range(3))
    owner = app_owner("web", ids)
    survivors = [i for i in ids if i != owner]
    nodes = [Node(apps.store, apps, i, list(ids)) for i in ids]
    deploy(apps, "v1")
    deploy(apps, "v2", health="/nope")
    t0 = created(apps, 2)
    for n in nodes:
        n.guard.check(t0 + 5)  # within the deadline: nobody decides
    assert apps.get("web").revision == 2  # type: ignore[union-attr]
    for n in nodes:
        n.live = survivors  # the owner died; membership says so on the others
    living = [n for n in nodes if n.id != owner]
    for _ in range(3):
        for n in living:
            n.guard.check(t0 + 11)
    assert apps.get("web").revision == 3  # type: ignore[union-attr]
    assert sum(n.rollbacks for n in living) == 1
    assert next(n for n in living if n.rollbacks).id == app_owner("web", survivors)
