"""The app reconciler in-process, against a real Docker Engine and a real SQLite store:
the cases that are hard to reach through the API (containers made by hand, half-made
replicas, unhealthy replicas)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pytest
from agentproc import docker_client, node_containers, remove_node_containers
from conftest import HELLO

from pleaco.apps import AppStore
from pleaco.config import Config
from pleaco.identity import Identity
from pleaco.metrics import Registry
from pleaco.reconcile.apps import AppReconciler
from pleaco.reconcile.drain import Drain
from pleaco.reconcile.routes import RouteTable
from pleaco.reconcile.status import AppStatus, app_status
from pleaco.reconcile.view import NodeView
from pleaco.runtime import DockerRuntime, RunSpec
from pleaco.store import Store

POLL = 0.05  # seconds between reconciler passes while waiting for a condition


class Harness:
    def __init__(self, tmp: Path, **cfg: Any) -> None:
        self.identity = Identity.generate()
        self.node_id = self.identity.node_id
        self.store = Store(tmp / "state.db", self.identity)
        self.cfg = Config(data_dir=tmp, **cfg)
        self.apps = AppStore(self.store, 100)
        self.runtime = DockerRuntime()
        self.registry = Registry()
        self.loop = asyncio.new_event_loop()
        self.rec = self.new_reconciler()

    def restart(self) -> None:
        """A fresh agent life: the old one's actions are over (it is gone), the new
        reconciler has no memory of the replicas."""
        self.loop.run_until_complete(self.rec.wait_actions())
        self.loop.run_until_complete(self.rec.teardown())
        self.rec = self.new_reconciler()

    def new_reconciler(self) -> AppReconciler:
        view = NodeView(self.node_id, self.apps, Drain(0.0))
        rec = AppReconciler(self.cfg, view, RouteTable(self.store, self.node_id), self.runtime, self.registry)
        self.loop.run_until_complete(rec.setup())
        return rec

    def status(self, app: str, replicas: int) -> AppStatus:
        spec = self.apps.get(app)
        assert spec is not None
        return app_status(self.rec.view, self.rec.routes, [self.node_id], spec, replicas)

    def once(self) -> str | None:
        return self.loop.run_until_complete(self.rec.step())

    def settle(self, until: Any, passes: int = 200, what: str = "condition") -> None:
        """Run passes until ``until()`` holds (a bounded number of passes, not a sleep)."""
        for _ in range(passes):
            self.once()
            if until():
                return
            self.loop.run_until_complete(asyncio.sleep(POLL))
        raise AssertionError(f"reconciler did not reach: {what}")

    def close(self) -> None:
        self.loop.run_until_complete(self.rec.wait_actions())
        self.loop.run_until_complete(self.rec.teardown())
        self.loop.close()
        remove_node_containers(self.node_id)
        self.store.close()


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    harness = Harness(
        tmp_path, backoff_base=0.2, health_grace=0.5, health_failures=2, reconcile_interval=0.1, stop_timeout=1
    )
    try:
        yield harness
    finally:
        harness.close()


def running_ids(h: Harness, app: str) -> set[str]:
    return {c.id for c in node_containers(h.node_id, app, all_states=False)}


def test_half_made_replica_is_started_not_duplicated(h: Harness) -> None:
    h.apps.deploy("web", {"image": HELLO, "replicas": 1, "port": 8080})
    # What an agent killed between "create" and "start" leaves behind.
    spec = RunSpec(app="web", node=h.node_id, release=1, replica=0, image=HELLO, port=8080)
    api = docker_client().api
    cid = api.create_container(HELLO, name=spec.name, labels=spec.labels(), ports=[8080],
                               host_config=api.create_host_config(port_bindings={8080: ("127.0.0.1", None)}))["Id"]
    h.settle(lambda: running_ids(h, "web") == {cid}, what="the created container started")
    assert len(node_containers(h.node_id, "web")) == 1


def test_surplus_orphans_and_duplicates_are_removed(h: Harness) -> None:
    h.apps.deploy("web", {"image": HELLO, "replicas": 3, "port": 8080})
    h.settle(lambda: len(running_ids(h, "web")) == 3, what="3 replicas")
    keep = {c.id for c in node_containers(h.node_id, "web") if c.attrs["Labels"]["pleaco.replica"] == "0"}
    # An orphan: labelled as ours, for an app the store does not know.
    orphan = RunSpec(app="gone", node=h.node_id, release=1, replica=0, image=HELLO)
    h.runtime.run(orphan)
    # A duplicate of replica 0 of the current release under another name.
    dup_labels = RunSpec(app="web", node=h.node_id, release=1, replica=0, image=HELLO).labels()
    docker_client().containers.run(HELLO, detach=True, labels=dup_labels, name=f"dup-{h.node_id[:8]}")
    h.apps.scale("web", 1)
    h.settle(
        lambda: len(node_containers(h.node_id, "web")) == 1 and not node_containers(h.node_id, "gone"),
        what="surplus, orphan and duplicate removed",
    )
    assert {c.id for c in node_containers(h.node_id, "web")} == keep


def test_foreign_containers_are_never_touched(h: Harness) -> None:
    client = docker_client()
    # Unlabelled, partly labelled, and another node's containers, all for app "web".
    plain = client.containers.run(HELLO, detach=True, name=f"plain-{h.node_id[:8]}")
    partial = client.containers.run(HELLO, detach=True, labels={"pleaco.app": "web", "pleaco.node": h.node_id},
                                    name=f"partial-{h.node_id[:8]}")
    other = Identity.generate().node_id
    theirs = h.runtime.run(RunSpec(app="web", node=other, release=1, replica=0, image=HELLO))
    try:
        h.apps.deploy("web", {"image": HELLO, "replicas": 0})
        for _ in range(5):
            h.once()
        for cid in (plain.id, partial.id, theirs):
            assert client.api.inspect_container(cid)["State"]["Running"], cid
        with pytest.raises(PermissionError):
            h.runtime.remove(plain.id, h.node_id)
        with pytest.raises(PermissionError):
            h.runtime.remove(theirs, h.node_id)
    finally:
        for cid in (plain.id, partial.id, theirs):
            with contextlib.suppress(docker.errors.NotFound):
                client.api.remove_container(cid, force=True)


def test_unhealthy_replica_is_restarted(h: Harness) -> None:
    # /missing answers 404: the replica never turns healthy and is restarted after the grace.
    h.apps.deploy("sick", {"image": HELLO, "replicas": 1, "port": 8080, "health": "/missing"})
    h.settle(lambda: (h.rec.view.replicas.get(("sick", 0)) or _Never).restarts >= 1, what="a restart for failed health")
    status = h.status("sick", 1)
    assert status.healthy == 0
    assert "health check /missing failed" in status.instances[0].error


def test_a_health_command_is_run_by_the_engine(h: Harness) -> None:
    # No /tmp/ready yet: the engine's check fails twice, the replica is stopped and started
    # again, and says why; once the file is there the engine says healthy, and so does pleaco.
    check = {"test": "test -f /tmp/ready", "interval": 0.2, "timeout": 1.0, "retries": 2}
    h.apps.deploy("cache", {"image": HELLO, "replicas": 1, "health_cmd": check})
    h.settle(lambda: (h.rec.view.replicas.get(("cache", 0)) or _Never).restarts >= 1, passes=400,
             what="a restart for the failed health command")
    status = h.status("cache", 1)
    assert status.healthy == 0
    assert "health command 'test -f /tmp/ready' failed 2 times" in status.instances[0].error
    [c] = node_containers(h.node_id, "cache")
    given = docker_client().api.inspect_container(c.id)["Config"]["Healthcheck"]
    assert given == {"Test": ["CMD-SHELL", "test -f /tmp/ready"], "Interval": 200_000_000, "Timeout": 1_000_000_000,
                     "Retries": 2}
    h.settle(lambda: bool(node_containers(h.node_id, "cache", all_states=False)), what="running again")
    [c] = node_containers(h.node_id, "cache", all_states=False)
    assert c.exec_run(["touch", "/tmp/ready"]).exit_code == 0
    h.settle(lambda: h.status("cache", 1).healthy == 1, passes=400, what="healthy by the engine's check")


def test_new_reconciler_adopts_without_restarting(h: Harness) -> None:
    h.apps.deploy("web", {"image": HELLO, "replicas": 2, "port": 8080, "health": "/healthz"})
    h.settle(lambda: h.status("web", 2).healthy == 2, what="2 healthy")
    before = {c.id: c.attrs["Status"] for c in node_containers(h.node_id, "web")}
    h.restart()
    h.settle(lambda: h.status("web", 2).healthy == 2, what="adopted, healthy")
    assert set(running_ids(h, "web")) == set(before)
    # The first life started each replica once; the second started nothing.
    starts = [line for line in h.registry.render().splitlines() if line.startswith("pleaco_reconcile_actions_total")]
    assert 'pleaco_reconcile_actions_total{action="start",result="ok"} 2' in starts, starts
    assert sum('action="start",result="ok"' in line for line in starts) == 1, starts


class _Never:
    restarts = 0
