"""Automatic rollback: the deadline, the reason, and no rollback of a rollback."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from pleaco.apps import AppStore
from pleaco.config import Config
from pleaco.identity import Identity
from pleaco.metrics import Registry
from pleaco.reconcile.apps import ReplicaState
from pleaco.reconcile.backoff import Backoff
from pleaco.reconcile.rollout import RolloutGuard
from pleaco.runtime import ContainerInfo
from pleaco.store import Store

NODE = "n" * 32


@dataclass
class Observed:
    engine_ok: bool = True
    containers: list[ContainerInfo] = field(default_factory=list)


@dataclass
class FakeReconciler:
    """The part of AppReconciler the guard reads: what runs here and what is healthy."""

    node_id: str = NODE
    observed: Observed = field(default_factory=Observed)
    replicas: dict[tuple[str, int], ReplicaState] = field(default_factory=dict)
    woken: int = 0

    def live_nodes(self) -> list[str]:
        return [NODE]

    def weights(self) -> dict[str, float]:
        return {}

    def wake(self) -> None:
        self.woken += 1

    def run(self, app: str, release: int, healthy: bool, error: str = "") -> None:
        cid = f"{app}-{release}"
        self.observed.containers = [c for c in self.observed.containers if c.app != app] + [ContainerInfo(
            id=cid, name=cid, app=app, node=NODE, release=release, replica=0, state="running", exit_code=None,
            image="img", host_port=30000, created=0)]
        self.replicas[(app, 0)] = ReplicaState(Backoff(1, 60), healthy=healthy, container_id=cid, last_error=error)


@pytest.fixture
def apps(tmp_path: Path) -> Iterator[AppStore]:
    store = Store(tmp_path / "state.db", Identity.generate())
    yield AppStore(store, max_replicas=10)
    store.close()


def guard(apps: AppStore, rec: FakeReconciler, deadline: float = 10.0) -> RolloutGuard:
    cfg = Config()
    cfg.rollout.deadline = deadline
    return RolloutGuard(cfg, apps, rec, Registry())  # type: ignore[arg-type]


def deploy(apps: AppStore, greeting: str, health: str = "/healthz") -> Any:
    return apps.deploy("web", {"image": "img", "port": 8080, "health": health, "env": {"G": greeting}}).spec


def test_a_release_unhealthy_past_the_deadline_is_rolled_back_with_the_reason(apps: AppStore) -> None:
    rec = FakeReconciler()
    g = guard(apps, rec)
    deploy(apps, "v1")
    rec.run("web", 1, healthy=True)
    g.check(0.0)
    deploy(apps, "v2", health="/nope")
    rec.run("web", 2, healthy=False, error="health check /nope failed 3 times")
    g.check(100.0)
    g.check(109.0)
    assert apps.get("web").revision == 2  # type: ignore[union-attr]  # within the deadline
    g.check(110.5)
    spec = apps.get("web")
    assert spec is not None and spec.revision == 3 and spec.env == {"G": "v1"} and spec.health == "/healthz"
    release = apps.release("web", 3)
    assert release is not None and release["rollback_of"] == 1 and release["rolled_back_from"] == 2
    assert "revision 2 was not healthy within 10s" in release["reason"] and "/nope" in release["reason"]
    assert rec.woken == 1
    # The rollback itself failing is not rolled back again.
    rec.run("web", 3, healthy=False)
    g.check(200.0)
    g.check(300.0)
    assert apps.get("web").revision == 3  # type: ignore[union-attr]


def test_a_release_that_turned_healthy_once_is_never_rolled_back(apps: AppStore) -> None:
    rec = FakeReconciler()
    g = guard(apps, rec)
    deploy(apps, "v1")
    deploy(apps, "v2")
    rec.run("web", 2, healthy=True)
    g.check(0.0)
    rec.run("web", 2, healthy=False)  # later trouble is the back-off's business, not a rollout's
    g.check(1000.0)
    assert apps.get("web").revision == 2  # type: ignore[union-attr]


def test_no_verdict_without_the_engine_or_for_a_first_release(apps: AppStore) -> None:
    rec = FakeReconciler()
    g = guard(apps, rec)
    deploy(apps, "v1")
    rec.run("web", 1, healthy=False)
    g.check(0.0)
    g.check(1000.0)
    assert apps.get("web").revision == 1  # type: ignore[union-attr]  # nothing to go back to
    deploy(apps, "v2")
    rec.observed.engine_ok = False
    g.check(2000.0)
    g.check(3000.0)
    assert apps.get("web").revision == 2  # type: ignore[union-attr]
