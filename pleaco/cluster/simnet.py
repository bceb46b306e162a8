"""An in-memory network with virtual time, for running many nodes' real protocol code.

``VirtualTimeLoop`` is an asyncio event loop whose clock jumps straight to the next timer
instead of waiting, so ``asyncio.sleep(30)`` costs nothing and a thousand nodes' probe and
gossip loops run in one process faster than real time. ``SimNetwork`` delivers packets
between ``SimTransport`` endpoints after a random latency, losing a fraction of them,
honouring partitions, and holding back traffic to and from a node whose "event loop
stalls". Membership runs on it unchanged (memberlist's mock_transport.go plays this part).
"""

from __future__ import annotations

import asyncio
import random
import selectors
from collections.abc import Iterable
from typing import Any

from pleaco.cluster import messages, wire
from pleaco.cluster.messages import Packet
from pleaco.cluster.transport import PacketHandler, StreamHandler, Transport, TransportError


class _Clock:
    now = 0.0


class _VirtualSelector(selectors.SelectSelector):
    """No real I/O happens in a simulation: 'waiting' means moving the clock forward."""

    def __init__(self, clock: _Clock) -> None:
        super().__init__()
        self.clock = clock

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is None:
            raise RuntimeError("simulation stalled: nothing is scheduled")
        if timeout > 0:
            self.clock.now += timeout
        return []


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    def __init__(self) -> None:
        self.clock = _Clock()
        super().__init__(_VirtualSelector(self.clock))

    def time(self) -> float:
        return self.clock.now


class SimNetwork:
    def __init__(
        self,
        rng: random.Random,
        latency: tuple[float, float] = (0.0005, 0.002),
        loss: float = 0.0,
        count_bytes: bool = True,
    ) -> None:
        self.rng = rng
        self.latency = latency
        self.loss = loss
        self.count_bytes = count_bytes
        self.endpoints: dict[str, SimTransport] = {}
        self._groups: dict[str, int] = {}  # addr -> partition group; absent: group 0
        self.down: set[str] = set()
        self.stalled_until: dict[str, float] = {}
        self.packets = 0
        self.bytes = 0

    def transport(self, addr: str, node_id: str) -> SimTransport:
        t = SimTransport(self, addr, node_id)
        self.endpoints[addr] = t
        return t

    # -- faults ----------------------------------------------------------------------------

    def partition(self, *groups: Iterable[str]) -> None:
        """Split the network: nodes only reach nodes of their own group."""
        self._groups = {addr: i + 1 for i, group in enumerate(groups) for addr in group}

    def heal(self) -> None:
        self._groups = {}

    def kill(self, addr: str) -> None:
        self.down.add(addr)

    def stall(self, addr: str, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        self.stalled_until[addr] = loop.time() + seconds

    def reachable(self, src: str, dst: str) -> bool:
        return (src not in self.down and dst not in self.down
                and self._groups.get(src, 0) == self._groups.get(dst, 0))

    # -- delivery --------------------------------------------------------------------------

    def _release_time(self, addr: str, at: float) -> float:
        until = self.stalled_until.get(addr)
        return max(at, until) if until is not None else at

    def send(self, src: SimTransport, dst_addr: str, packet: Packet) -> int:
        size = len(messages.encode(packet)) + wire.OVERHEAD if self.count_bytes else 0
        self.packets += 1
        self.bytes += size
        src.bytes_sent += size
        dst = self.endpoints.get(dst_addr)
        if dst is None or not self.reachable(src.addr, dst_addr) or self.rng.random() < self.loss:
            return size
        loop = asyncio.get_running_loop()
        at = self._release_time(src.addr, loop.time()) + self.rng.uniform(*self.latency)
        loop.call_at(self._release_time(dst_addr, at), dst.deliver, src.node_id, packet, src.addr)
        return size

    async def request(self, src: SimTransport, dst_addr: str, message: dict[str, Any],
                      timeout: float) -> tuple[str, dict[str, Any]]:
        dst = self.endpoints.get(dst_addr)
        if dst is None or not self.reachable(src.addr, dst_addr) or dst.on_stream is None:
            await asyncio.sleep(timeout)
            raise TransportError(f"stream to {dst_addr}: unreachable")
        await asyncio.sleep(self.rng.uniform(*self.latency) * 2)
        answer = await dst.on_stream(src.node_id, message)
        await asyncio.sleep(self.rng.uniform(*self.latency) * 2)
        if not self.reachable(src.addr, dst_addr):
            raise TransportError(f"stream to {dst_addr}: cut")
        return dst.node_id, answer


class SimTransport(Transport):
    def __init__(self, net: SimNetwork, addr: str, node_id: str) -> None:
        self.net = net
        self.addr = addr
        self.node_id = node_id
        self.on_packet: PacketHandler | None = None
        self.on_stream: StreamHandler | None = None
        self.bytes_sent = 0

    async def start(self, on_packet: PacketHandler, on_stream: StreamHandler) -> None:
        self.on_packet, self.on_stream = on_packet, on_stream

    def send(self, addr: str, packet: Packet) -> int:
        if self.addr in self.net.down:
            return 0
        return self.net.send(self, addr, packet)

    def deliver(self, sender: str, packet: Packet, from_addr: str) -> None:
        if self.on_packet is not None and self.addr not in self.net.down:
            self.on_packet(sender, packet, from_addr)

    async def request(self, addr: str, message: dict[str, Any], timeout: float) -> tuple[str, dict[str, Any]]:
        return await self.net.request(self, addr, message, timeout)

    async def close(self) -> None:
        self.on_packet = None


class MemoryDelegate:
    """Stands in for the store in simulations: records by (kind, key), newest wins, and a
    record new to this node is gossiped on, as StoreSync does."""

    def __init__(self) -> None:
        self.records: dict[tuple[str, str], Any] = {}
        self.first_seen: dict[tuple[str, str], float] = {}
        self.queue_record: Any = None

    def records_received(self, sender: str, records: Any) -> None:
        for rec in records:
            key = (rec.kind, rec.key)
            have = self.records.get(key)
            if have is None or rec.order_key() > have.order_key():
                self.records[key] = rec
                self.first_seen.setdefault(key, asyncio.get_running_loop().time())
                if self.queue_record is not None:
                    self.queue_record(rec)

    def digest(self) -> list[list[Any]]:
        return [[r.kind, r.key, r.ts.wall_ms, r.ts.counter, r.ts.node_id] for r in self.records.values()]

    def diff(self, remote_digest: Any) -> tuple[list[Any], list[list[str]]]:
        remote = {(d[0], d[1]): (d[2], d[3], d[4]) for d in remote_digest or []}
        send = [r for k, r in self.records.items()
                if k not in remote or (r.ts.wall_ms, r.ts.counter, r.ts.node_id) > remote[k]]
        want = [[k[0], k[1]] for k, ts in remote.items()
                if k not in self.records or ts > (self.records[k].ts.wall_ms, self.records[k].ts.counter,
                                                  self.records[k].ts.node_id)]
        return send, want

    def records_for(self, keys: Any) -> list[Any]:
        return [self.records[(k[0], k[1])] for k in keys if (k[0], k[1]) in self.records]


def sim_cluster(n: int, cfg: Any, net: SimNetwork, rng: random.Random) -> list[Any]:
    """``n`` memberships that already know each other, on ``net`` (call inside the loop)."""
    from pleaco.cluster.membership import ALIVE, Member, Membership

    ids = [f"{i:032x}" for i in range(n)]
    addrs = [f"n{i}:7401" for i in range(n)]
    nodes = []
    for i in range(n):
        delegate = MemoryDelegate()
        m = Membership(ids[i], addrs[i], {}, cfg, net.transport(addrs[i], ids[i]), delegate=delegate,
                       rng=random.Random(rng.random()), incarnation=1)
        delegate.queue_record = m.queue_record
        for j in range(n):
            if j != i:
                m.members[ids[j]] = Member(ids[j], addrs[j], 1, ALIVE)
        m.broadcasts.clear()  # everyone already knows everyone: no join chatter to measure
        nodes.append(m)
    return nodes
