"""An in-memory network with virtual time, for running many nodes' real protocol code.

``VirtualTimeLoop`` is an asyncio event loop whose clock jumps straight to the next timer
instead of waiting, so ``asyncio.sleep(30)`` costs nothing and a thousand nodes' probe and
gossip loops run in one process faster than real time. ``SimNetwork`` delivers packets
between ``SimTransport`` endpoints after a random latency, losing a fraction of them,
honouring partitions, and holding back traffic to and from a node whose "event loop
stalls". Membership runs on it unchanged (memberlist's mock_transport.go plays this part).

With ``sealed=True`` (the default) every packet and stream message goes through the real
wire path: encoded by ``messages``, sealed by each node's ``wire.Codec`` (Ed25519-signed,
ChaCha20-Poly1305-encrypted, replay-checked) and opened and decoded by the receiver, so
simulations run (and benchmarks pay for) the real codec, signatures and encryption, and
bandwidth is counted in real envelope bytes. ``sealed=False`` hands the objects over as
they are (bytes estimated from their encoding): for large tests that measure protocol
behaviour only.
"""

from __future__ import annotations

import asyncio
import random
import selectors
from collections.abc import Iterable
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from pleaco.cluster import messages, wire
from pleaco.cluster.messages import MessageError, Packet
from pleaco.cluster.transport import (
    PacketHandler,
    StreamHandler,
    Transport,
    TransportError,
    json_object,
    open_packet,
    seal_packet,
)
from pleaco.identity import Identity, node_id_for

SIM_CLUSTER = "sim"
SIM_SECRET = bytes(range(32))


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
        sealed: bool = True,
    ) -> None:
        self.rng = rng
        self.latency = latency
        self.loss = loss
        self.count_bytes = count_bytes
        self.sealed = sealed
        self.keys: dict[str, bytes] = {}  # node id -> public key: who is admitted
        self.drops: dict[str, int] = {}  # reason -> packets and messages dropped on opening
        self.endpoints: dict[str, SimTransport] = {}
        self._groups: dict[str, int] = {}  # addr -> partition group; absent: group 0
        self.down: set[str] = set()
        self.stalled_until: dict[str, float] = {}
        self.packets = 0
        self.bytes = 0

    def transport(self, addr: str, node_id: str, identity: Identity | None = None,
                  replay_window: float = 60.0, max_packet: int = 1400) -> SimTransport:
        """An endpoint at ``addr``; on a sealed network it needs the node's ``identity``."""
        t = SimTransport(self, addr, node_id)
        if self.sealed:
            if identity is None or identity.node_id != node_id:
                raise ValueError("a sealed network needs each node's identity")
            self.keys[node_id] = identity.public_key
            t.packets = wire.Codec(identity, SIM_CLUSTER, SIM_SECRET, self.keys.get, replay_window, max_packet)
            t.streams = wire.Codec(identity, SIM_CLUSTER, SIM_SECRET, self.keys.get, replay_window, 64 << 20,
                                   purpose=b"stream v1")
        self.endpoints[addr] = t
        return t

    def _drop(self, reason: str) -> None:
        self.drops[reason] = self.drops.get(reason, 0) + 1

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
        payload: Packet | bytes = packet
        if src.packets is not None:
            try:
                payload = seal_packet(src.packets, packet)
            except ValueError:
                return 0  # too large for a packet: NetTransport does not send it either
            size = len(payload)
        else:
            size = len(messages.encode(packet)) + wire.OVERHEAD if self.count_bytes else 0
        self.packets += 1
        self.bytes += size
        src.bytes_sent += size
        dst = self.endpoints.get(dst_addr)
        if dst is None or not self.reachable(src.addr, dst_addr) or self.rng.random() < self.loss:
            return size
        loop = asyncio.get_running_loop()
        at = self._release_time(src.addr, loop.time()) + self.rng.uniform(*self.latency)
        loop.call_at(self._release_time(dst_addr, at), dst.deliver, src.node_id, payload, src.addr)
        return size

    async def request(self, src: SimTransport, dst_addr: str, message: dict[str, Any],
                      timeout: float) -> tuple[str, dict[str, Any]]:
        dst = self.endpoints.get(dst_addr)
        if dst is None or not self.reachable(src.addr, dst_addr) or dst.on_stream is None:
            await asyncio.sleep(timeout)
            raise TransportError(f"stream to {dst_addr}: unreachable")
        await asyncio.sleep(self.rng.uniform(*self.latency) * 2)
        if src.streams is None or dst.streams is None:
            answer = await dst.on_stream(src.node_id, message)
            responder = dst.node_id
        else:
            sent = src.streams.seal(messages.dumps(message))
            self.bytes += len(sent)
            try:
                opened = dst.streams.open(sent)
                request = json_object(opened.payload)
            except (wire.Drop, MessageError) as exc:
                self._drop(exc.reason if isinstance(exc, wire.Drop) else "malformed")
                raise TransportError(f"stream to {dst_addr}: dropped: {exc}") from None
            reply = dst.streams.seal(messages.dumps(await dst.on_stream(opened.sender, request)))
            self.bytes += len(reply)
            try:
                back = src.streams.open(reply)
                answer, responder = json_object(back.payload), back.sender
            except (wire.Drop, MessageError) as exc:
                self._drop(exc.reason if isinstance(exc, wire.Drop) else "malformed")
                raise TransportError(f"answer from {dst_addr}: dropped: {exc}") from None
        await asyncio.sleep(self.rng.uniform(*self.latency) * 2)
        if not self.reachable(src.addr, dst_addr):
            raise TransportError(f"stream to {dst_addr}: cut")
        return responder, answer


class SimTransport(Transport):
    def __init__(self, net: SimNetwork, addr: str, node_id: str) -> None:
        self.net = net
        self.addr = addr
        self.node_id = node_id
        self.on_packet: PacketHandler | None = None
        self.on_stream: StreamHandler | None = None
        self.bytes_sent = 0
        # This node's codecs on a sealed network (None: objects are handed over as they are).
        self.packets: wire.Codec | None = None
        self.streams: wire.Codec | None = None

    async def start(self, on_packet: PacketHandler, on_stream: StreamHandler) -> None:
        self.on_packet, self.on_stream = on_packet, on_stream

    def send(self, addr: str, packet: Packet) -> int:
        if self.addr in self.net.down:
            return 0
        return self.net.send(self, addr, packet)

    def deliver(self, sender: str, payload: Packet | bytes, from_addr: str) -> None:
        if self.on_packet is None or self.addr in self.net.down:
            return
        if isinstance(payload, bytes):
            assert self.packets is not None
            try:
                sender, payload = open_packet(self.packets, payload)
            except wire.Drop as drop:
                self.net._drop(drop.reason)
                return
            except MessageError:
                self.net._drop("malformed")
                return
        self.on_packet(sender, payload, from_addr)

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

    def wanted(self, notices: Any) -> list[list[str]]:
        out = []
        for n in notices:
            have = self.records.get((n.kind, n.key))
            if have is None or n.ts > (have.ts.wall_ms, have.ts.counter, have.ts.node_id):
                out.append([n.kind, n.key])
        return out


def sim_identity(rng: random.Random) -> Identity:
    """A node key drawn from ``rng``: a simulation with a seed gets the same node ids every run."""
    key = Ed25519PrivateKey.from_private_bytes(rng.randbytes(32))
    pub = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return Identity(private_key=key, public_key=pub, node_id=node_id_for(pub))


def sim_cluster(n: int, cfg: Any, net: SimNetwork, rng: random.Random) -> list[Any]:
    """``n`` memberships that already know each other, on ``net`` (call inside the loop)."""
    from pleaco.cluster.membership import ALIVE, Member, Membership

    identities = [sim_identity(rng) for _ in range(n)] if net.sealed else []
    ids = [x.node_id for x in identities] if net.sealed else [f"{i:032x}" for i in range(n)]
    addrs = [f"n{i}:7401" for i in range(n)]
    nodes = []
    for i in range(n):
        delegate = MemoryDelegate()
        transport = net.transport(addrs[i], ids[i], identities[i] if net.sealed else None, cfg.replay_window,
                                  cfg.max_packet)
        m = Membership(ids[i], addrs[i], {}, cfg, transport, delegate=delegate,
                       rng=random.Random(rng.random()), incarnation=1)
        delegate.queue_record = m.queue_record
        for j in range(n):
            if j != i:
                m.members[ids[j]] = Member(ids[j], addrs[j], 1, ALIVE)
        m.broadcasts.clear()  # everyone already knows everyone: no join chatter to measure
        nodes.append(m)
    return nodes
