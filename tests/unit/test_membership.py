"""SWIM + Lifeguard on the simulated network in virtual time: the real protocol code,
many nodes, deterministic seeds, no sockets and no waiting."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Coroutine
from typing import Any

from pleaco.cluster.config import GossipConfig
from pleaco.cluster.membership import ALIVE, DEAD, MAX_HELD_ALIVE, SUSPECT, Membership
from pleaco.cluster.messages import Packet, Update
from pleaco.cluster.simnet import MemoryDelegate, SimNetwork, VirtualTimeLoop, sim_cluster
from pleaco.store.hlc import Timestamp
from pleaco.store.record import Record


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    loop = VirtualTimeLoop()
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()


async def started(n: int, seed: int = 1, **net_opts: Any) -> tuple[SimNetwork, list[Membership]]:
    rng = random.Random(seed)
    net = SimNetwork(rng, **net_opts)
    nodes = sim_cluster(n, GossipConfig(), net, rng)
    for m in nodes:
        await m.start()
    return net, nodes


async def elapse(seconds: float) -> None:
    """Let ``seconds`` of virtual time pass: the clock jumps, nothing waits (a scenario step,
    not synchronisation)."""
    await asyncio.sleep(seconds)


async def until(cond: Any, limit: float, step: float = 0.1) -> float:
    """Virtual seconds until ``cond()`` holds; fails past ``limit``."""
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    while not cond():
        assert loop.time() - t0 < limit, f"not reached within {limit} virtual seconds"
        await asyncio.sleep(step)
    return loop.time() - t0


async def stop(nodes: list[Membership]) -> None:
    for m in nodes:
        await m.stop(leave=False)


def test_a_dead_node_is_detected_by_all_and_nobody_else_is() -> None:
    async def scenario() -> float:
        net, nodes = await started(8)
        await elapse(3)
        victim = nodes[5]
        net.kill(victim.me.addr)
        others = [m for m in nodes if m is not victim]
        took = await until(lambda: all(m.members[victim.node_id].state == DEAD for m in others), 60)
        await elapse(10)
        for m in others:
            assert {n for n, x in m.members.items() if x.state != ALIVE} == {victim.node_id}
        await stop(nodes)
        return took

    took = run(scenario())
    # Probe interval, timeout and the Lifeguard timeout for 8 nodes (4 * 1 s minimum).
    assert 1.5 < took < 20


def test_a_false_suspicion_is_refuted() -> None:
    async def scenario() -> None:
        _, nodes = await started(6)
        await elapse(2)
        target, accuser = nodes[2], nodes[0]
        before = target.me.incarnation
        accuser.apply_update(Update(SUSPECT, target.node_id, target.me.incarnation, source=accuser.node_id))
        assert accuser.members[target.node_id].state == SUSPECT
        await until(lambda: target.me.incarnation > before, 10)
        await until(lambda: all(m.members[target.node_id].state == ALIVE for m in nodes), 10)
        await elapse(30)
        assert all(m.members[target.node_id].state == ALIVE for m in nodes)
        assert target.stats["refuted"] >= 1
        await stop(nodes)

    run(scenario())


def test_a_record_reaches_every_node() -> None:
    async def scenario() -> float:
        _, nodes = await started(50, seed=3)
        rec = Record("app", "web", {"image": "x"}, Timestamp(1, 0, nodes[0].node_id), bytes(64))
        delegate = nodes[7].delegate
        assert isinstance(delegate, MemoryDelegate)
        delegate.records_received(nodes[7].node_id, [rec])
        took = await until(lambda: all(("app", "web") in m.delegate.records for m in nodes), 10, 0.02)  # type: ignore[union-attr]
        await stop(nodes)
        return took

    assert run(scenario()) < 3


def test_a_record_too_large_for_a_packet_is_announced_and_fetched_by_every_node() -> None:
    """Not left to anti-entropy: with push-pull every hour, a 20 KB record still reaches
    every node in about the time a small one does (a notice in the packets, then a fetch
    over a stream from whoever announced it)."""

    async def scenario() -> float:
        rng = random.Random(5)
        net = SimNetwork(rng)
        nodes = sim_cluster(50, GossipConfig(push_pull_interval=3600.0), net, rng)
        for m in nodes:
            await m.start()
        big = {"image": "x", "env": {"BLOB": "b" * 20_000}}
        rec = Record("app", "big", big, Timestamp(1, 0, nodes[4].node_id), bytes(64))
        delegate = nodes[4].delegate
        assert isinstance(delegate, MemoryDelegate)
        delegate.records_received(nodes[4].node_id, [rec])
        took = await until(lambda: all(m.delegate.records.get(("app", "big")) == rec for m in nodes),  # type: ignore[union-attr]
                           10, 0.02)
        await stop(nodes)
        return took

    assert run(scenario()) < 5


def test_partitions_keep_working_and_merge_when_healed() -> None:
    async def scenario() -> None:
        net, nodes = await started(5, seed=4)
        await elapse(2)
        left, right = nodes[:2], nodes[2:]
        net.partition([m.me.addr for m in left], [m.me.addr for m in right])
        await until(lambda: all(m.members[o.node_id].state == DEAD for m in left for o in right), 90)
        # Both sides take writes.
        for i, side in enumerate((left, right)):
            d = side[0].delegate
            assert isinstance(d, MemoryDelegate)
            d.records_received(side[0].node_id, [Record("app", f"side{i}", {}, Timestamp(10 + i, 0, side[0].node_id),
                                                        bytes(64))])
        await elapse(5)
        net.heal()
        # Reconnecting to dead members (every push-pull interval) merges the two halves.
        await until(lambda: all(x.state == ALIVE for m in nodes for x in m.members.values()), 180, 1)
        await until(lambda: all({("app", "side0"), ("app", "side1")} <= set(m.delegate.records) for m in nodes),
                    120, 1)  # type: ignore[union-attr]
        await stop(nodes)

    run(scenario())


def test_a_stalled_node_causes_no_false_deaths() -> None:
    async def scenario() -> None:
        net, nodes = await started(20, seed=5, loss=0.05)
        await elapse(3)
        net.stall(nodes[0].me.addr, 2.0)
        await elapse(40)
        assert all(x.state == ALIVE for m in nodes for x in m.members.values())
        await stop(nodes)

    run(scenario())


def test_packets_go_through_the_real_codec_and_an_unadmitted_node_is_shut_out() -> None:
    """The simulated network seals and opens every packet and stream with each node's
    codec: a node whose key is no longer admitted is heard by nobody, so it is declared dead."""
    async def scenario() -> None:
        net, nodes = await started(6, seed=6)
        await elapse(2)
        assert net.sealed and not net.drops
        outcast = nodes[4]
        del net.keys[outcast.node_id]
        others = [m for m in nodes if m is not outcast]
        await until(lambda: all(m.members[outcast.node_id].state == DEAD for m in others), 60)
        assert net.drops.get("unknown_sender", 0) > 0
        assert all(x.state == ALIVE for m in others for x in m.members.values() if x.node_id != outcast.node_id)
        await stop(nodes)

    run(scenario())


def test_the_unsealed_fast_path_detects_a_dead_node_too() -> None:
    async def scenario() -> None:
        net, nodes = await started(8, seed=7, sealed=False)
        await elapse(3)
        net.kill(nodes[1].me.addr)
        await until(lambda: all(m.members[nodes[1].node_id].state == DEAD for m in nodes if m is not nodes[1]), 60)
        assert not net.keys and not net.drops
        await stop(nodes)

    run(scenario())


def lone_member(admitted: set[str]) -> Membership:
    """One membership on the simulated network that admits the nodes in ``admitted``
    (the cluster's ``node`` records, as they arrive)."""
    net = SimNetwork(random.Random(1), sealed=False)
    me = f"{0:032x}"
    return Membership(me, "n0:7401", {}, GossipConfig(), net.transport("n0:7401", me), admitted=admitted.__contains__,
                      incarnation=1)


def test_news_of_a_joiner_that_outran_its_admission_is_taken_in_when_the_admission_arrives() -> None:
    """Nodes joining at once: the news that one is alive can reach a member before the
    record that admits it. Dropped, the member would not learn of it until a push-pull."""
    async def scenario() -> None:
        admitted: set[str] = set()
        m = lone_member(admitted)
        joiner = f"{1:032x}"
        m.apply_update(Update(ALIVE, joiner, 3, "n1:7401", {"name": "n1"}))
        m.apply_update(Update(ALIVE, joiner, 5, "n1:7401", {"name": "n1"}))
        m.apply_update(Update(ALIVE, joiner, 4, "n1:7401", {"name": "n1"}))
        assert joiner not in m.members  # not admitted: not a member yet
        m.admitted_now(joiner)
        assert joiner not in m.members  # still not admitted: still held
        admitted.add(joiner)
        m.admitted_now(joiner)
        assert m.members[joiner].state == ALIVE and m.members[joiner].incarnation == 5
        assert m.members[joiner].meta == {"name": "n1"}

    run(scenario())


def test_news_of_unadmitted_nodes_is_bounded_and_forgotten_on_revocation() -> None:
    async def scenario() -> None:
        admitted: set[str] = set()
        m = lone_member(admitted)
        nodes = [f"{i + 1:032x}" for i in range(MAX_HELD_ALIVE + 1)]
        for node in nodes:
            m.apply_update(Update(ALIVE, node, 1, "n1:7401"))
        admitted.update(nodes)
        m.remove(nodes[-1])  # revoked before its admission arrived
        for node in nodes:
            m.admitted_now(node)
        # The oldest went when one more than the bound arrived; the revoked one is forgotten.
        assert set(m.members) == {m.node_id, *nodes[1:-1]}

    run(scenario())


def test_a_member_asks_whoever_passed_on_news_of_a_node_for_the_record_admitting_it() -> None:
    """Gossip may spend an admission's few sends before it comes this way; the news that the
    node is alive still does (every member passes it on), and whoever passed it on has the
    admission: it is fetched from there, and the held news taken in once it arrives."""
    async def scenario() -> None:
        rng = random.Random(8)
        net = SimNetwork(rng, sealed=False)
        sender, member = sim_cluster(2, GossipConfig(push_pull_interval=3600.0), net, rng)
        records = member.delegate
        assert isinstance(records, MemoryDelegate) and isinstance(sender.delegate, MemoryDelegate)
        member.admitted = lambda node: ("node", node) in records.records
        received = records.records_received

        def admitting(origin: str, recs: Any) -> None:  # as the agent's store listener does
            received(origin, recs)
            for rec in recs:
                if rec.kind == "node":
                    member.admitted_now(rec.key)

        records.records_received = admitting  # type: ignore[method-assign]
        for m in (sender, member):
            await m.start()
        joiner = f"{9:032x}"
        # The sender has the admission (and gossips it no more: its sends are spent).
        sender.delegate.records[("node", joiner)] = Record("node", joiner, {"name": "n9"},
                                                           Timestamp(1, 0, sender.node_id), bytes(64))
        member.handle_packet(sender.node_id, Packet("gossip", updates=(Update(ALIVE, joiner, 2, "n9:7401"),)),
                             sender.me.addr)
        assert joiner not in member.members
        await until(lambda: joiner in member.members, 5, 0.01)
        assert member.members[joiner].state == ALIVE and ("node", joiner) in records.records
        await stop([sender, member])

    run(scenario())
