"""Membership: SWIM failure detection with Lifeguard, gossip and push-pull.

Every ``probe_interval`` a node probes one member (round-robin over a shuffled list): a
direct ping; without an ack within ``probe_timeout``, ``indirect_checks`` other members
ping it on our behalf and answer ack or nack; without any ack by the end of the interval
the member is suspected. A suspicion spreads by gossip; the suspect refutes it by raising
its incarnation; unrefuted, it becomes dead when its Lifeguard timeout runs out. Missing
nacks raise this node's awareness score, which stretches its own probe interval and timeout:
a node that is itself slow stops accusing healthy peers.

Updates and store records ride on every packet (``BroadcastQueue``); every
``push_pull_interval`` a full state exchange with one random member over a stream repairs
whatever gossip lost. All timing uses the event loop's clock, so the simulator can run this
code in virtual time.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from pleaco import logs
from pleaco.cluster import messages, wire
from pleaco.cluster.broadcast import BroadcastQueue
from pleaco.cluster.config import GossipConfig
from pleaco.cluster.messages import LoadReport, MessageError, Notice, Packet, Update
from pleaco.cluster.suspicion import Suspicion, suspicion_bounds
from pleaco.cluster.transport import Transport, TransportError
from pleaco.store.record import Record

log = logs.get("pleaco.cluster.membership")

ALIVE, SUSPECT, DEAD, LEFT = "alive", "suspect", "dead", "left"
LIVE = (ALIVE, SUSPECT)
# Room left in a packet for its own fields before piggybacked items.
PACKET_BASE = 120
LOAD_FIELD = 8
# Alive news of nodes this node has not admitted yet, kept (the newest per node) until their
# ``node`` record arrives (Membership.admitted_now). When several nodes join at once, news
# that one of them is alive can reach a member before the record of its admission does
# (the two travel separately and gossip keeps no order); dropped, its few piggybacked sends
# are spent and the member would not learn of the joiner until the next push-pull (30 s),
# nor gossip with it or place replicas on it. Only members can send news at all (packets
# are sealed with the cluster key), so the bound is for bugs, not strangers.
MAX_HELD_ALIVE = 256
# The record that admits a node: ``node/<id>``, written by the member that let it in
# (pleaco.cluster.service). A member that passes on the news that a node is alive has
# admitted it, so a node that has not asks it for that record (Membership.handle_packet):
# gossip may have spent the record's few sends before it came this way.
ADMISSION_KIND = "node"


@dataclass
class Member:
    node_id: str
    addr: str
    incarnation: int
    state: str
    meta: dict[str, str] = field(default_factory=dict)
    since: float = 0.0  # loop time of the last state change
    # Loop time it came back from dead (0: never seen dead). Placement waits for it to
    # settle before giving it replicas again.
    returned_at: float = 0.0
    last_heard: float = 0.0  # wall clock, for people

    def to_json(self) -> dict[str, Any]:
        return {"id": self.node_id, "addr": self.addr, "incarnation": self.incarnation, "state": self.state,
                "meta": dict(self.meta), "last_heard": self.last_heard}


class Delegate(Protocol):
    """What membership needs from the replicated store (pleaco.cluster.sync)."""

    def records_received(self, sender: str, records: Sequence[Record]) -> None: ...

    def wanted(self, notices: Sequence[Notice]) -> list[list[str]]:
        """The [kind, key] of the announced records this node lacks or has older."""
        ...

    def digest(self) -> list[list[Any]]: ...

    def diff(self, remote_digest: Any) -> tuple[list[Record], list[list[str]]]: ...

    def records_for(self, keys: Any) -> list[Record]: ...


class Membership:
    def __init__(
        self,
        node_id: str,
        addr: str,
        meta: dict[str, str],
        cfg: GossipConfig,
        transport: Transport,
        delegate: Delegate | None = None,
        admitted: Callable[[str], bool] = lambda _: True,
        on_change: Callable[[Member], None] | None = None,
        rng: random.Random | None = None,
        incarnation: int | None = None,
    ) -> None:
        self.node_id = node_id
        self.cfg = cfg
        self.transport = transport
        self.delegate = delegate
        self.admitted = admitted
        self.on_change = on_change or (lambda m: None)
        self.rng = rng or random.Random()
        # Seconds since the epoch: a restarted node starts above every incarnation it
        # had before, so its "alive" beats the "dead" others remember.
        inc = int(time.time()) if incarnation is None else incarnation
        self.me = Member(node_id, addr, inc, ALIVE, dict(meta))
        self.members: dict[str, Member] = {node_id: self.me}
        self.broadcasts = BroadcastQueue(cfg.retransmit_mult, lambda: len(self.members))
        # Load reports (pleaco.cluster.load) fill what room the packet has left: they are
        # ephemeral and replaced every few seconds, membership and records come first.
        self.load_broadcasts = BroadcastQueue(cfg.load_retransmit_mult, lambda: len(self.members))
        # Hears each load report received; True when it was news (then it is passed on).
        self.on_load: Callable[[LoadReport], bool] = lambda report: False
        self.awareness = 0
        self._seq = 0
        self._acks: dict[int, asyncio.Future[None]] = {}
        self._nacks: dict[int, int] = {}
        self._suspicions: dict[str, tuple[Suspicion, asyncio.TimerHandle]] = {}
        self._probe_order: list[str] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._relays: set[asyncio.Task[None]] = set()
        self._fetching: set[tuple[str, str]] = set()  # announced records being fetched
        self._held_alive: dict[str, Update] = {}  # see MAX_HELD_ALIVE
        self._leaving = False
        self.stats = {"probes": 0, "probe_failures": 0, "suspected": 0, "declared_dead": 0, "refuted": 0}
        self._queue_alive(self.me)

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def loop_time(self) -> float:
        return asyncio.get_running_loop().time()

    async def start(self) -> None:
        await self.transport.start(self.handle_packet, self.handle_stream)
        self._tasks = [
            asyncio.create_task(self._probe_loop(), name="swim-probe"),
            asyncio.create_task(self._gossip_loop(), name="swim-gossip"),
            asyncio.create_task(self._push_pull_loop(), name="swim-push-pull"),
        ]

    async def stop(self, leave: bool = True) -> None:
        """Leave gracefully (tell the others) and stop."""
        if leave and len(self.members) > 1:
            self._leaving = True
            self.me.state = LEFT
            self.me.incarnation += 1
            update = Update(LEFT, self.node_id, self.me.incarnation, source=self.node_id)
            self._queue(update)
            # Tell a few members directly, so the news does not wait for a gossip round.
            for m in self._sample(LIVE, self.cfg.gossip_nodes * 2):
                self._send(m.addr, Packet("gossip"))
        for t in [*self._tasks, *self._relays]:
            t.cancel()
        for t in [*self._tasks, *self._relays]:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        for _, handle in self._suspicions.values():
            handle.cancel()
        await self.transport.close()

    async def join(self, seeds: Sequence[str]) -> int:
        """Exchange state with each seed; returns how many answered."""
        ok = 0
        for addr in seeds:
            if addr == self.me.addr:
                continue
            try:
                await self.push_pull(addr)
                ok += 1
            except (TransportError, MessageError) as exc:
                log.debug("gossip.seed_failed", seed=addr, error=str(exc))
        return ok

    # -- views ---------------------------------------------------------------------------

    def live(self) -> list[Member]:
        return [m for m in self.members.values() if m.state in LIVE]

    def placement_nodes(self) -> list[str]:
        """Members that get replicas: live, and settled if they came back from the dead."""
        now = self.loop_time
        live = self.live()
        settled = [m.node_id for m in live if not m.returned_at or now - m.returned_at >= self.cfg.placement_settle]
        return sorted(settled or [m.node_id for m in live])

    def remove(self, node_id: str) -> None:
        """Forget a member (its key was revoked)."""
        if node_id == self.node_id:
            return
        m = self.members.pop(node_id, None)
        self._held_alive.pop(node_id, None)
        self._cancel_suspicion(node_id)
        if m is not None:
            m.state = LEFT
            self.on_change(m)

    # -- sending -------------------------------------------------------------------------

    def _send(self, addr: str, packet: Packet, count: bool = True) -> int:
        """Send a packet with as many queued broadcasts piggybacked as fit (counted against
        their retransmit limit unless ``count`` is False)."""
        budget = self.cfg.max_packet - wire.OVERHEAD - PACKET_BASE
        items, used = self.broadcasts.take_sized(budget, count=count)
        # LOAD_FIELD: the packet's own "l":[...] around the load reports.
        room = budget - used - LOAD_FIELD
        loads = self.load_broadcasts.take(room, count=count) if room > 64 else []
        if items or loads:
            updates = tuple(i for i in items if isinstance(i, Update))
            records = tuple(i for i in items if isinstance(i, Record))
            notices = tuple(i for i in items if isinstance(i, Notice))
            packet = Packet(packet.type, packet.seq, packet.target, packet.addr, packet.nack, updates, records,
                            notices, tuple(loads))
        return self.transport.send(addr, packet)

    def load_budget(self) -> int:
        """Bytes a load report part may take: half a packet's room for piggybacked items, so
        a part always fits beside some membership news."""
        return (self.cfg.max_packet - wire.OVERHEAD - PACKET_BASE) // 2

    def publish_load(self, reports: Sequence[LoadReport]) -> None:
        """Spread this node's load report (its parts), replacing the previous one."""
        for report in reports:
            self._queue_load(report)

    def _queue_load(self, report: LoadReport) -> None:
        self.load_broadcasts.queue(f"l:{report.node}:{report.part}", report, len(messages.dumps(report.to_json())))

    def _queue(self, update: Update) -> None:
        self.broadcasts.queue("m:" + update.node, update, len(messages.dumps(update.to_json())))

    def _queue_alive(self, m: Member) -> None:
        self._queue(Update(ALIVE, m.node_id, m.incarnation, m.addr, m.meta))

    def queue_record(self, rec: Record) -> None:
        """Spread a store record by gossip: in the packets when it fits one, else as a
        notice that the receivers answer by fetching it from the sender over a stream
        (so a large record spreads as fast as a small one, a hop at a time)."""
        size = len(messages.dumps(messages.record_to_json(rec)))
        if size <= self.cfg.max_packet - wire.OVERHEAD - PACKET_BASE:
            self.broadcasts.queue(f"r:{rec.kind}/{rec.key}", rec, size)
            return
        notice = Notice.of(rec)
        self.broadcasts.queue(f"r:{rec.kind}/{rec.key}", notice, len(messages.dumps(notice.to_json())))

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _sample(self, states: tuple[str, ...], k: int, exclude: tuple[str, ...] = ()) -> list[Member]:
        pool = [m for m in self.members.values()
                if m.state in states and m.node_id != self.node_id and m.node_id not in exclude]
        return self.rng.sample(pool, min(k, len(pool)))

    # -- receiving -----------------------------------------------------------------------

    def handle_packet(self, sender: str, packet: Packet, from_addr: str) -> None:
        m = self.members.get(sender)
        if m is not None:
            m.last_heard = time.time()
        if packet.records and self.delegate is not None:
            # Records first: a node's admission may arrive with its first alive update.
            self.delegate.records_received(sender, packet.records)
        if packet.notices and self.delegate is not None and m is not None:
            self._fetch_announced(sender, m.addr, packet.notices)
        for update in packet.updates:
            self.apply_update(update)
        reply_to = m.addr if m is not None else from_addr
        unadmitted = [u.node for u in packet.updates if u.kind == ALIVE and u.node in self._held_alive]
        if unadmitted and self.delegate is not None:
            self._fetch_from(sender, reply_to, [[ADMISSION_KIND, node] for node in unadmitted])
        for report in packet.loads:
            # News is passed on (an epidemic, as updates are); the sender's own report, too.
            if report.node != self.node_id and self.on_load(report):
                self._queue_load(report)
        if packet.type == "ping":
            if packet.target == self.node_id:
                self._send(reply_to, Packet("ack", packet.seq))
        elif packet.type == "iping":
            task = asyncio.get_running_loop().create_task(self._relay(packet, reply_to))
            self._relays.add(task)
            task.add_done_callback(self._relays.discard)
        elif packet.type == "ack":
            fut = self._acks.get(packet.seq)
            if fut is not None and not fut.done():
                fut.set_result(None)
        elif packet.type == "nack" and packet.seq in self._nacks:
            self._nacks[packet.seq] += 1

    async def handle_stream(self, sender: str, request: dict[str, Any]) -> dict[str, Any]:
        kind = request.get("t")
        if kind == "pp":
            self._merge_members(request.get("members"))
            answer: dict[str, Any] = {"t": "pp", "members": self._member_states()}
            if self.delegate is not None:
                send, want = self.delegate.diff(request.get("digest"))
                answer["records"] = [messages.record_to_json(r) for r in send]
                answer["want"] = want
            return answer
        if kind == "push":
            if self.delegate is not None:
                self.delegate.records_received(sender, messages.decode_records(request.get("records"), "push"))
            return {"t": "ok"}
        if kind == "get":  # records this node announced (notices)
            records = self.delegate.records_for(request.get("keys")) if self.delegate is not None else []
            return {"t": "records", "records": [messages.record_to_json(r) for r in records]}
        raise MessageError(f"unknown stream request {kind!r}")

    # -- records announced by notices ----------------------------------------------------

    def _fetch_announced(self, sender: str, addr: str, notices: Sequence[Notice]) -> None:
        """Fetch, from the member that announced them, the records this node lacks; one
        fetch per record at a time (the same notice arrives from several members)."""
        assert self.delegate is not None
        self._fetch_from(sender, addr, self.delegate.wanted(notices))

    def _fetch_from(self, sender: str, addr: str, wanted: list[list[str]]) -> None:
        """Fetch the ``wanted`` [kind, key] records from the member at ``addr``, those not
        being fetched already."""
        want = [k for k in wanted if (k[0], k[1]) not in self._fetching]
        if not want:
            return
        keys = {(k[0], k[1]) for k in want}
        self._fetching |= keys
        task = asyncio.get_running_loop().create_task(self._fetch(sender, addr, want, keys))
        self._relays.add(task)
        task.add_done_callback(self._relays.discard)

    async def _fetch(self, sender: str, addr: str, want: list[list[str]], keys: set[tuple[str, str]]) -> None:
        assert self.delegate is not None
        try:
            answerer, answer = await self.transport.request(addr, {"t": "get", "keys": want}, self.cfg.stream_timeout)
            self.delegate.records_received(answerer, messages.decode_records(answer.get("records", []), "get"))
        except (TransportError, MessageError) as exc:
            # Its next notice (it is retransmitted) or push-pull brings it; not an error.
            log.debug("gossip.fetch_failed", member=sender, records=len(want), error=str(exc))
        finally:
            self._fetching -= keys

    # -- push-pull -----------------------------------------------------------------------

    def _member_states(self) -> list[dict[str, Any]]:
        out = []
        for m in self.members.values():
            alive = m.state == ALIVE
            u = Update(m.state, m.node_id, m.incarnation, m.addr, m.meta if alive else {},
                       "" if alive else self.node_id)
            out.append(u.to_json())
        return out

    def _merge_members(self, raw: Any) -> None:
        for update in messages.decode_updates(raw):
            # A suspicion learned by push-pull is not a fresh accusation: treat it as one
            # (memberlist does the same), so it still needs its timeout to become dead.
            self.apply_update(update)

    async def push_pull(self, addr: str) -> str:
        """A full exchange with the member at ``addr``; returns its node id."""
        request: dict[str, Any] = {"t": "pp", "members": self._member_states()}
        if self.delegate is not None:
            request["digest"] = self.delegate.digest()
        sender, answer = await self.transport.request(addr, request, self.cfg.stream_timeout)
        if self.delegate is not None:
            # Records before members: a member is only taken in once its admission is here.
            records = messages.decode_records(answer.get("records", []), "pp")
            if records:
                self.delegate.records_received(sender, records)
        self._merge_members(answer.get("members"))
        if self.delegate is not None:
            want = answer.get("want") or []
            if want:
                push = [messages.record_to_json(r) for r in self.delegate.records_for(want)]
                await self.transport.request(addr, {"t": "push", "records": push}, self.cfg.stream_timeout)
        return sender

    # -- updates -------------------------------------------------------------------------

    def apply_update(self, u: Update) -> None:
        if u.kind == ALIVE:
            self._on_alive(u)
        elif u.kind == SUSPECT:
            self._on_suspect(u)
        else:
            self._on_dead(u)

    def _on_alive(self, u: Update) -> None:
        if u.node == self.node_id:
            if u.incarnation > self.me.incarnation and not self._leaving:
                self._refute(u.incarnation, returned=False)
            return
        if not self.admitted(u.node):
            self._hold_alive(u)
            return
        m = self.members.get(u.node)
        now = self.loop_time
        if m is None:
            m = Member(u.node, u.addr, u.incarnation, ALIVE, dict(u.meta), since=now, last_heard=time.time())
            self.members[u.node] = m
            self._probe_order.append(u.node)
            self._queue(u)
            log.info("member.joined", member=u.node, addr=u.addr, name=u.meta.get("name", ""))
            self.on_change(m)
            return
        if u.incarnation <= m.incarnation:
            return
        was = m.state
        m.incarnation, m.addr, m.meta = u.incarnation, u.addr, dict(u.meta)
        self._queue(u)
        if was != ALIVE:
            self._cancel_suspicion(u.node)
            m.state, m.since = ALIVE, now
            if was in (DEAD, LEFT):
                m.returned_at = now
            log.info("member.alive", member=u.node, was=was, incarnation=u.incarnation)
            self.on_change(m)

    def _hold_alive(self, u: Update) -> None:
        held = self._held_alive.pop(u.node, None)
        self._held_alive[u.node] = u if held is None or u.incarnation > held.incarnation else held
        while len(self._held_alive) > MAX_HELD_ALIVE:  # the oldest held goes first
            dropped = self._held_alive.pop(next(iter(self._held_alive)))
            log.debug("gossip.alive_dropped", member=dropped.node,
                      error=f"not admitted (more than {MAX_HELD_ALIVE} such members waiting)")
        log.debug("gossip.alive_held", member=u.node, incarnation=u.incarnation)

    def admitted_now(self, node_id: str) -> None:
        """``node_id``'s admission arrived (its ``node`` record): take in the alive news of
        it held until then, if any."""
        held = self._held_alive.pop(node_id, None)
        if held is not None:
            self._on_alive(held)

    def _on_suspect(self, u: Update) -> None:
        if u.node == self.node_id:
            if u.incarnation >= self.me.incarnation and not self._leaving:
                self._refute(u.incarnation, returned=False)
            return
        m = self.members.get(u.node)
        if m is None or u.incarnation < m.incarnation or m.state in (DEAD, LEFT):
            return
        if m.state == SUSPECT:
            held = self._suspicions.get(u.node)
            if held is not None and held[0].confirm(u.source):
                self._schedule_suspicion(u.node, held[0], m.incarnation)
                self._queue(u)
            return
        m.incarnation, m.state, m.since = u.incarnation, SUSPECT, self.loop_time
        n = len(self.live())
        low, high = suspicion_bounds(self.cfg.suspicion_mult, self.cfg.suspicion_max_timeout_mult, n,
                                     self.cfg.probe_interval)
        k = self.cfg.suspicion_mult - 2
        if n - 2 < k:
            k = 0
        sus = Suspicion(self.loop_time, low, high, k, u.source)
        self._schedule_suspicion(u.node, sus, u.incarnation)
        self.stats["suspected"] += 1
        self._queue(u)
        log.info("member.suspect", member=u.node, by=u.source, incarnation=u.incarnation,
                 timeout_s=round(sus.timeout(), 2))
        self.on_change(m)

    def _schedule_suspicion(self, node: str, sus: Suspicion, incarnation: int) -> None:
        old = self._suspicions.get(node)
        if old is not None:
            old[1].cancel()
        loop = asyncio.get_running_loop()
        delay = max(0.0, sus.deadline() - loop.time())
        handle = loop.call_later(delay, self._suspicion_expired, node, incarnation)
        self._suspicions[node] = (sus, handle)

    def _cancel_suspicion(self, node: str) -> None:
        held = self._suspicions.pop(node, None)
        if held is not None:
            held[1].cancel()

    def _suspicion_expired(self, node: str, incarnation: int) -> None:
        self._suspicions.pop(node, None)
        m = self.members.get(node)
        if m is not None and m.state == SUSPECT and m.incarnation == incarnation:
            self.stats["declared_dead"] += 1
            self._on_dead(Update(DEAD, node, incarnation, source=self.node_id))

    def _on_dead(self, u: Update) -> None:
        if u.node == self.node_id:
            if not self._leaving:
                self._refute(u.incarnation, returned=True)
            return
        m = self.members.get(u.node)
        if m is None or u.incarnation < m.incarnation or m.state in (DEAD, LEFT):
            return
        self._cancel_suspicion(u.node)
        m.incarnation, m.since = u.incarnation, self.loop_time
        m.state = LEFT if u.kind == LEFT else DEAD
        self._queue(u)
        log.info("member.dead" if m.state == DEAD else "member.left", member=u.node, by=u.source,
                 incarnation=u.incarnation)
        self.on_change(m)

    def _refute(self, incarnation: int, returned: bool) -> None:
        """Someone thinks we are suspect or dead (or have a newer incarnation): deny it."""
        self.me.incarnation = max(self.me.incarnation, incarnation) + 1
        self.awareness = min(self.cfg.awareness_max_multiplier - 1, self.awareness + 1)
        if returned:
            # The others saw us dead: we settle before taking replicas back, as they expect.
            with contextlib.suppress(RuntimeError):
                self.me.returned_at = self.loop_time
        self.stats["refuted"] += 1
        self._queue_alive(self.me)
        log.info("member.refuted", incarnation=self.me.incarnation)

    # -- probing -------------------------------------------------------------------------

    def _scale(self) -> int:
        return self.awareness + 1

    def _next_target(self) -> Member | None:
        for _ in range(len(self._probe_order) + 1):
            if not self._probe_order:
                candidates = [n for n, m in self.members.items() if n != self.node_id and m.state in LIVE]
                self.rng.shuffle(candidates)
                self._probe_order = candidates
                if not candidates:
                    return None
            node = self._probe_order.pop()
            m = self.members.get(node)
            if m is not None and m.state in LIVE and node != self.node_id:
                return m
        return None

    async def _probe_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            interval = self.cfg.probe_interval * self._scale()
            target = self._next_target()
            if target is not None:
                try:
                    await self.probe(target, interval)
                except Exception as exc:  # one failed probe must not end the detector
                    log.error("gossip.probe_failed", exc_info=True, error=str(exc))
            await asyncio.sleep(max(0.0, started + interval - loop.time()))

    async def probe(self, target: Member, interval: float) -> bool:
        """Probe one member; suspect it when neither it nor anyone on our behalf reaches it."""
        self.stats["probes"] += 1
        seq = self._next_seq()
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._acks[seq] = fut
        timeout = self.cfg.probe_timeout * self._scale()
        try:
            self._send(target.addr, Packet("ping", seq, target=target.node_id))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(fut), timeout)
                self.awareness = max(0, self.awareness - 1)
                return True
            relays = self._sample((ALIVE,), self.cfg.indirect_checks, exclude=(target.node_id,))
            self._nacks[seq] = 0
            for relay in relays:
                self._send(relay.addr, Packet("iping", seq, target=target.node_id, addr=target.addr, nack=True))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(fut), max(0.0, interval - timeout))
                self.awareness = max(0, self.awareness - 1)
                return True
            # Lifeguard: relays that did not even nack suggest our own links are the problem.
            missed = len(relays) - self._nacks.get(seq, 0) if relays else 1
            self.awareness = min(self.cfg.awareness_max_multiplier - 1, self.awareness + max(0, missed))
            self.stats["probe_failures"] += 1
            if target.state in LIVE:
                self._on_suspect(Update(SUSPECT, target.node_id, target.incarnation, source=self.node_id))
            return False
        finally:
            self._acks.pop(seq, None)
            self._nacks.pop(seq, None)
            if not fut.done():
                fut.cancel()

    async def _relay(self, request: Packet, origin_addr: str) -> None:
        """Ping ``request.target`` for another member; answer it ack, or nack if asked."""
        seq = self._next_seq()
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._acks[seq] = fut
        try:
            self._send(request.addr, Packet("ping", seq, target=request.target))
            try:
                await asyncio.wait_for(fut, self.cfg.probe_timeout)
            except TimeoutError:
                if request.nack:
                    self._send(origin_addr, Packet("nack", request.seq))
                return
            self._send(origin_addr, Packet("ack", request.seq))
        finally:
            self._acks.pop(seq, None)

    # -- gossip and push-pull loops ----------------------------------------------------------

    async def _gossip_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.gossip_interval)
            if not len(self.broadcasts) and not len(self.load_broadcasts):
                continue
            now = self.loop_time
            for m in self._sample(LIVE, self.cfg.gossip_nodes):
                self._send(m.addr, Packet("gossip"))
            # Recently dead members hear the news too (so one that comes back learns it was
            # declared dead and refutes), but those sends do not use up an update's
            # retransmits: with half the cluster dead, they would starve the living.
            dead = [m for m in self.members.values() if m.state == DEAD and now - m.since < self.cfg.gossip_to_dead]
            if dead:
                self._send(self.rng.choice(dead).addr, Packet("gossip"), count=False)

    async def _push_pull_loop(self) -> None:
        while True:
            n = len(self.live())
            # memberlist's pushPullScale: beyond 32 nodes, back off logarithmically so the
            # total TCP load stays flat as the cluster grows.
            scale = max(1.0, math.ceil(math.log2(n) - math.log2(32)) + 1) if n > 32 else 1.0
            await asyncio.sleep(self.cfg.push_pull_interval * scale * (0.5 + self.rng.random()))
            # One live peer for anti-entropy, and one dead one to reconnect to (Serf's
            # reconnect): that is how the two sides of a healed partition find each other.
            for peer in [*self._sample((ALIVE,), 1), *self._sample((DEAD,), 1)]:
                try:
                    await self.push_pull(peer.addr)
                except (TransportError, MessageError) as exc:
                    log.debug("gossip.push_pull_failed", peer=peer.node_id, error=str(exc))
                except Exception as exc:
                    log.error("gossip.push_pull_failed", exc_info=True, peer=peer.node_id, error=str(exc))
