"""The drain state machine: a serving replica is taken out first, and may be stopped only
once neither this node's record nor its proxy has it, plus the wait counted from the later."""

from __future__ import annotations

from pleaco.reconcile.drain import MESH_DELAY, Drain
from pleaco.runtime import ContainerInfo

C = ContainerInfo(id="c" * 64, name="c", app="web", node="n", release=1, replica=0, state="running", exit_code=None,
                  image="img", host_port=30000, created=0)


def test_a_serving_replica_is_drained_and_stopped_after_the_wait_from_when_the_proxy_let_go() -> None:
    asked: list[int] = []
    d = Drain(grace=5.0, proxy_delay=1.0, on_request=lambda: asked.append(1))
    d.observe_serving({C.id}, {C.id}, now=0.0)
    d.proxy_applied({C.id}, now=0.0)
    assert not d.may_remove(C, "scaled down", now=0.0) and d.draining(C.id) and asked == [1]
    d.observe_serving(set(), {C.id}, now=1.0)  # the record says it no longer serves ...
    assert not d.may_remove(C, "scaled down", now=100.0)  # ... but the proxy still routes to it
    assert asked == [1]  # asked once
    d.proxy_applied(set(), now=2.0)  # the proxy let go at 2.0: the wait counts from there
    assert not d.may_remove(C, "scaled down", now=2.0 + 5.0 + 1.0 - 0.01)
    assert d.may_remove(C, "scaled down", now=2.0 + 5.0 + 1.0)


def test_with_other_nodes_the_wait_includes_the_mesh() -> None:
    d = Drain(grace=5.0, proxy_delay=1.0, mesh=lambda: True)
    assert d.wait() == 5.0 + 1.0 + MESH_DELAY


def test_alone_and_without_a_proxy_nothing_waits() -> None:
    d = Drain(grace=5.0, proxy_delay=1.0)
    d.observe_serving({C.id}, {C.id}, now=0.0)
    assert d.may_remove(C, "scaled down", now=0.0)


def test_a_replica_wanted_again_while_draining_serves_again() -> None:
    """Scaled to zero and woken at once (or scaled down and up): the container being drained
    is kept, and must not stay out of every route for good."""
    asked: list[int] = []
    d = Drain(grace=5.0, proxy_delay=1.0, on_request=lambda: asked.append(1))
    d.observe_serving({C.id}, {C.id}, now=0.0)
    d.proxy_applied({C.id}, now=0.0)
    assert not d.may_remove(C, "scaled down", now=0.0) and d.draining(C.id)
    d.cancel(C)
    assert not d.draining(C.id) and asked == [1, 1]  # the change is published at once
    d.cancel(C)  # not draining: nothing
    assert asked == [1, 1]
