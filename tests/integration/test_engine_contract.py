"""The ``Engine`` contract, checked the same way against Docker Engine (through the adapter)
and against the in-memory twin the unit tests use: what the loops rely on behaves alike
in both, so a unit test on the twin means something for the real engine."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from agentproc import remove_node_containers
from conftest import BUSYBOX, HELLO

from pleaco.identity import Identity
from pleaco.runtime import Conflict, DockerRuntime, NotFound, RunSpec
from pleaco.runtime.docker import InfraSpec, container_name
from pleaco.runtime.engine import Engine
from pleaco.runtime.memory import STOPPED_EXIT_CODE, MemoryEngine

MISSING = "pleaco/never-built:none"


@pytest.fixture(params=["docker", "memory"])
def engine(request: pytest.FixtureRequest) -> Iterator[tuple[Engine, str]]:
    node_id = Identity.generate().node_id
    if request.param == "memory":
        yield MemoryEngine(images=(HELLO, BUSYBOX)), node_id
        return
    runtime = DockerRuntime()
    try:
        yield runtime, node_id
    finally:
        remove_node_containers(node_id)
        runtime.close()


def test_replica_lifecycle_names_ports_and_errors(engine: tuple[Engine, str]) -> None:
    e, me = engine
    other = Identity.generate().node_id
    assert e.image_exists(HELLO) and not e.image_exists(MISSING)
    spec = RunSpec(app="web", node=me, release=1, replica=0, image=HELLO, port=8080)
    cid = e.run(spec)
    with pytest.raises(Conflict):
        e.run(spec)
    with pytest.raises(NotFound):
        e.run(RunSpec(app="web", node=me, release=1, replica=1, image=MISSING))
    [c] = e.list_managed(me)
    assert (c.id, c.name, c.app, c.release, c.replica, c.state) == (
        cid, container_name("web", 1, 0, me), "web", 1, 0, "running")
    assert c.host_port is not None and c.host_ip == "127.0.0.1" and c.ip and c.exit_code is None
    assert e.list_managed(me, "other-app") == [] and e.list_managed(other) == []
    with pytest.raises(PermissionError):
        e.stop(cid, other, 1)
    with pytest.raises(PermissionError):
        e.remove(cid, other, 1)

    e.stop(cid, me, 1)
    [c] = e.list_managed(me)
    # SIGTERM through tini; the port and the address are freed.
    assert (c.state, c.exit_code, c.host_port, c.ip) == ("exited", STOPPED_EXIT_CODE, None, "")
    e.start(cid)
    e.start(cid)  # already running: nothing happens
    [c] = e.list_managed(me)
    assert c.running and c.host_port is not None

    e.remove(cid, me, 1)
    assert e.list_managed(me) == []
    with pytest.raises(NotFound):
        e.start(cid)
    with pytest.raises(NotFound):
        e.remove(cid, me, 1)


def test_infrastructure_is_apart_from_replicas(engine: tuple[Engine, str]) -> None:
    e, me = engine
    other = Identity.generate().node_id
    assert e.find_infra(me, "proxy") is None
    spec = InfraSpec(role="proxy", node=me, name=f"pleaco-contract-{me[:12]}", image=BUSYBOX,
                     command=("sleep", "300"), labels={"pleaco.proxy-settings": "x"})
    cid = e.run_infra(spec)
    info = e.find_infra(me, "proxy")
    assert info is not None and (info.id, info.name, info.running) == (cid, spec.name, True)
    assert info.labels["pleaco.proxy-settings"] == "x"
    assert e.find_infra(other, "proxy") is None
    assert e.list_managed(me) == []  # never an app replica
    with pytest.raises(PermissionError):
        e.remove(cid, me, 1)
    with pytest.raises(PermissionError):
        e.remove_infra(cid, other, "proxy")
    e.remove_infra(cid, me, "proxy")
    assert e.find_infra(me, "proxy") is None
