"""Gossip: the real membership and dissemination code on a simulated network in virtual
time (pleaco.cluster.simnet), at 10, 100 and 1000 nodes, and the real envelope on one core.
Every simulated packet and stream message is real bytes: encoded, signed, encrypted,
opened and verified by each node's ``wire.Codec`` (the simulator's default, ``sealed``).

Measured, beside the anchors the issue gives:
- dissemination: virtual seconds until 99.99% of nodes hold a record written on one node
  (Serf's convergence model: 2.0 s at 100 nodes, 2.2 s at 1000);
- failure detection: virtual seconds from a node's death until every other node has
  declared it dead (memberlist's defaults: about 1 + 0.5 + 4 * log10(N) s = 9.5 s at 100);
- false positives: live nodes declared dead over 60 virtual seconds with 10% packet loss,
  and with one node whose event loop stalls for 2 s;
- bandwidth: bytes per second per node in that steady state (memberlist: ~330 kbit/s);
- signed and encrypted packets sent, received and verified per second over real UDP
  sockets on loopback, both ends in one process (one core).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import socket
import time
from typing import Any

from benchmarks.common import Row, log
from pleaco.cluster import messages
from pleaco.cluster.config import GossipConfig
from pleaco.cluster.membership import DEAD, Membership
from pleaco.cluster.simnet import MemoryDelegate, SimNetwork, VirtualTimeLoop, sim_cluster
from pleaco.cluster.transport import NetTransport
from pleaco.cluster.wire import Codec
from pleaco.identity import Identity
from pleaco.store.hlc import Timestamp
from pleaco.store.record import Record


def _run(coro: Any) -> Any:
    loop = VirtualTimeLoop()
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()


async def _start(nodes: list[Membership]) -> None:
    for m in nodes:
        await m.start()


async def _stop(nodes: list[Membership]) -> None:
    for m in nodes:
        await m.stop(leave=False)


async def dissemination(n: int, seed: int) -> float:
    rng = random.Random(seed)
    net = SimNetwork(rng, count_bytes=False)
    nodes = sim_cluster(n, GossipConfig(), net, rng)
    await _start(nodes)
    await asyncio.sleep(rng.random())  # start mid-round, as a write would
    rec = Record("app", "bench", {"v": 1}, Timestamp(1, 0, nodes[0].node_id), bytes(64))
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    delegates = [m.delegate for m in nodes]
    assert all(isinstance(d, MemoryDelegate) for d in delegates)
    delegates[0].records_received(nodes[0].node_id, [rec])  # type: ignore[union-attr]
    need = math.ceil(0.9999 * n)
    while True:
        have = sum(1 for d in delegates if ("app", "bench") in d.records)  # type: ignore[union-attr]
        if have >= need or loop.time() - t0 > 60:
            break
        await asyncio.sleep(0.05)
    took = max(d.first_seen.get(("app", "bench"), t0) for d in delegates) - t0  # type: ignore[union-attr]
    await _stop(nodes)
    return took


async def detection(n: int, seed: int) -> float:
    rng = random.Random(seed)
    net = SimNetwork(rng, count_bytes=False)
    nodes = sim_cluster(n, GossipConfig(), net, rng)
    await _start(nodes)
    await asyncio.sleep(5 + rng.random())
    victim = nodes[rng.randrange(n)]
    net.kill(victim.me.addr)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    others = [m for m in nodes if m is not victim]
    while not all(m.members[victim.node_id].state == DEAD for m in others):
        if loop.time() - t0 > 120:
            break
        await asyncio.sleep(0.05)
    took = loop.time() - t0
    await _stop(nodes)
    return took


async def steady(n: int, seed: int, loss: float, stall: bool, seconds: float) -> dict[str, float]:
    rng = random.Random(seed)
    net = SimNetwork(rng, loss=loss)
    nodes = sim_cluster(n, GossipConfig(), net, rng)
    await _start(nodes)
    await asyncio.sleep(2)
    before = net.bytes
    if stall:
        net.stall(nodes[0].me.addr, 2.0)
    await asyncio.sleep(seconds)
    false_dead = sum(1 for m in nodes for other in m.members.values() if other.state == DEAD)
    declared = sum(m.stats["declared_dead"] for m in nodes)
    bps = (net.bytes - before) / seconds / n
    await _stop(nodes)
    return {"false_positives": float(max(false_dead, declared)), "bytes_per_s_per_node": bps}


def socket_rate(seconds: float = 2.0) -> float:
    """Packets sent, received, opened and verified per second over real UDP on 127.0.0.1,
    both ends in one process (so on one core): the full NetTransport path."""
    return asyncio.run(_socket_rate(seconds))


async def _socket_rate(seconds: float) -> float:
    a, b = Identity.generate(), Identity.generate()
    keys = {a.node_id: a.public_key, b.node_id: b.public_key}
    received = 0

    def on_packet(sender: str, packet: messages.Packet, addr: str) -> None:
        nonlocal received
        received += 1

    async def on_stream(sender: str, msg: dict[str, Any]) -> dict[str, Any]:
        return {}

    def drops(reason: str) -> None:
        raise AssertionError(f"benchmark packet dropped: {reason}")

    ports = []
    for _ in range(2):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    ends = []
    for ident, port in ((a, ports[0]), (b, ports[1])):
        codec = Codec(ident, "bench", b"k" * 32, keys.get, replay_window=3600)
        stream = Codec(ident, "bench", b"k" * 32, keys.get, replay_window=3600, max_size=1 << 20)
        t = NetTransport(codec, stream, ("127.0.0.1", port), f"127.0.0.1:{port}", drops)
        await t.start(on_packet, on_stream)
        ends.append(t)
    packet = messages.Packet("ping", 7, target=b.node_id)
    sent, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        # A small burst, then let the receiver take it all in: asyncio reads one datagram
        # per loop turn, so a long burst would only overflow the socket buffer.
        for _ in range(8):
            ends[0].send(f"127.0.0.1:{ports[1]}", packet)
            sent += 1
        wait_until = time.perf_counter() + 1
        while received < sent and time.perf_counter() < wait_until:
            await asyncio.sleep(0)
    took = time.perf_counter() - t0
    for t in ends:
        await t.close()
    return received / took


def run(opts: argparse.Namespace) -> list[Row]:
    rows: list[Row] = []
    seeds = [11, 22, 33]
    for n, anchor in ((10, None), (100, 2.0), (1000, 2.2)):
        t0 = time.monotonic()
        samples = [_run(dissemination(n, s)) for s in (seeds if n < 1000 else seeds[:1])]
        # The median of the seeds: now and then (p ~ 0.002 at 10 nodes, as with memberlist's
        # retransmit limit) gossip misses a node and the next push-pull (30 s) delivers.
        med = sorted(samples)[len(samples) // 2]
        log(f"gossip: dissemination at {n} nodes {samples} ({time.monotonic() - t0:.0f} s real)")
        rows.append(Row(f"gossip dissemination, {n} nodes", "s", med, anchor, "Serf model" if anchor else "",
                        "<= 1.5 s" if n == 1000 else "", med <= 1.5 if n == 1000 else None,
                        {"samples": samples}))
    for n in (10, 100):
        t0 = time.monotonic()
        samples = [_run(detection(n, s)) for s in seeds]
        anchor = 1 + 0.5 + 4 * math.log10(n)
        log(f"gossip: detection at {n} nodes {samples} ({time.monotonic() - t0:.0f} s real)")
        med = sorted(samples)[len(samples) // 2]
        rows.append(Row(f"gossip failure detection, {n} nodes", "s", med, anchor, "memberlist",
                        "<= 5 s" if n == 100 else "", med <= 5 if n == 100 else None, {"samples": samples}))
    t0 = time.monotonic()
    lossy = _run(steady(100, 5, 0.10, False, 60))
    stalled = _run(steady(100, 6, 0.0, True, 30))
    log(f"gossip: steady state {lossy} / stall {stalled} ({time.monotonic() - t0:.0f} s real)")
    rows.append(Row("gossip false positives, 100 nodes, 10% loss, 60 s", "", lossy["false_positives"],
                    goal="0", met=lossy["false_positives"] == 0))
    rows.append(Row("gossip false positives, 100 nodes, one 2 s stall", "", stalled["false_positives"],
                    goal="0", met=stalled["false_positives"] == 0))
    kbit = lossy["bytes_per_s_per_node"] * 8 / 1000
    rows.append(Row("gossip bandwidth per node, 100 nodes", "kbit/s", kbit, 330.0, "memberlist",
                    "<= 330 kbit/s", kbit <= 330))
    rate = socket_rate()
    log(f"gossip: {rate:.0f} packets per second over real UDP")
    rows.append(Row("signed+encrypted UDP packets sent, received, verified, one core", "/s", rate))
    return rows
