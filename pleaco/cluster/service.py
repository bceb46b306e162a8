"""The cluster as the agent sees it: founding, joining, the members, revocation.

A node without ``cluster.json`` is a cluster of one and gossips with nobody. It becomes a
member by ``cluster init`` (it founds a cluster) or by joining with a token; from then on
it runs membership over the real transport, spreads its store, and answers join requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from zeroconf import NonUniqueNameException

from pleaco import __version__, hostport, logs
from pleaco.cluster import messages, trust
from pleaco.cluster.config import ClusterSettings, GossipConfig
from pleaco.cluster.discovery import MdnsDiscovery
from pleaco.cluster.load import LoadView
from pleaco.cluster.membership import LIVE, Member, Membership
from pleaco.cluster.messages import AppLoadEntry, MessageError, split_load
from pleaco.cluster.sync import StoreSync
from pleaco.cluster.transport import (
    CHANNEL_JOIN,
    MAX_FRAME,
    ChannelHandler,
    NetTransport,
    SealedStream,
    TransportError,
    check_channel,
    frame,
    read_frame,
)
from pleaco.cluster.trust import ClusterState, JoinToken, TrustError
from pleaco.cluster.wire import DROP_REASONS, Codec
from pleaco.errors import Conflict
from pleaco.hostport import HostPortError, parse_host_port
from pleaco.identity import Identity
from pleaco.metrics import Counter, Gauge, Registry
from pleaco.net.addresses import HostTables, default_source, loopback_mismatch, read_host_tables
from pleaco.net.subnets import KIND as SUBNET_KIND
from pleaco.store import Store

log = logs.get("pleaco.cluster")

# Seconds the set of clusterless nodes in view must stay the same before the lowest node id
# founds a cluster: several mDNS announcement rounds (zeroconf repeats at 1 s, 2 s, ...).
BOOTSTRAP_SETTLE = 3.0


class ClusterError(Conflict, RuntimeError):
    """A cluster operation that cannot be done now (already founded, not a member, ...)."""


def advertise_address(cfg: ClusterSettings, tables: Callable[[], HostTables] = read_host_tables) -> str:
    """Where the other members reach this node's gossip: ``advertise`` when set, else the
    listen address when it names one, else (a wildcard) the source address of the default
    route, as the kernel's tables say (``tables``); 127.0.0.1 on a host without one."""
    host, port = parse_host_port(cfg.gossip_listen, "gossip_listen")
    if cfg.advertise:
        return cfg.advertise if ":" in cfg.advertise else f"{cfg.advertise}:{port}"
    if host in ("0.0.0.0", "::", ""):
        try:
            host = default_source(tables()) or "127.0.0.1"
        except OSError as exc:
            log.warning("cluster.routes_unreadable", error=str(exc))
            host = "127.0.0.1"
    return f"{host}:{port}"


class Cluster:
    def __init__(
        self,
        cfg: ClusterSettings,
        identity: Identity,
        store: Store,
        registry: Registry,
        on_change: Callable[[], None] = lambda: None,
    ) -> None:
        self.cfg = cfg
        self.gossip: GossipConfig = cfg.gossip
        self.identity = identity
        self.store = store
        self.on_change = on_change
        self.addr = advertise_address(cfg)
        self.state = ClusterState.load(cfg.data_dir)
        # Called once this node has a cluster state it did not start with (it founded the
        # cluster, or joined and merged the cluster's records): the agent re-seals the
        # secrets it sealed with its node-local key under the cluster key here.
        self.on_cluster: Callable[[], object] = lambda: None
        # Whether a member that is away (or back and settling) for the given seconds keeps
        # its replicas anyway: it is restarting into a new release (the agent wires the
        # cluster upgrade's rule here), and moving its replicas would start them elsewhere
        # only to stop them again a second later.
        self.hold: Callable[[str, float], bool] = lambda node, away_for: False
        self.membership: Membership | None = None
        self.transport: NetTransport | None = None
        self.sync = StoreSync(store, on_reject=self._count_drop)
        # Every node's latest load report, summed per app (ephemeral, by gossip).
        self.loads = LoadView(identity.node_id, cfg.gossip.load_stale_after,
                              live=lambda: [m.node_id for m in self.membership.live()] if self.membership else [])
        self._join_task: asyncio.Task[None] | None = None
        # False until this node has heard the cluster (or found nobody to hear): until then
        # it does not know where replicas belong and must not start or remove any.
        # placement_nodes() as the event loop last worked it out, for other threads.
        self._placement: list[str] = []
        self._loop_thread = threading.get_ident()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.ready = False
        self._seed_task: asyncio.Task[None] | None = None
        self._bootstrap_task: asyncio.Task[None] | None = None
        self.discovery: MdnsDiscovery | None = None
        self._channels: dict[bytes, ChannelHandler] = {}
        self._join_refused = logs.Burst(log, "cluster.join_refused")
        self.m_drops = registry.register(
            Counter("pleaco_gossip_dropped_total", "Gossip packets and records dropped, by reason.", ("reason",))
        )
        # Beside the envelope's reasons: "busy" (a TCP connection closed unread, over
        # gossip.max_pending_streams), "join_refused", "record_rejected".
        for reason in (*DROP_REASONS, "busy", "join_refused", "record_rejected"):
            self.m_drops.inc(0, reason=reason)
        registry.register(Gauge("pleaco_gossip_members", "Cluster members by state, as this node sees them.",
                                ("state",), collect=self._members_by_state))
        registry.register(Gauge("pleaco_gossip_bytes", "Bytes this node's gossip transport sent and received.",
                                ("direction",), collect=self._bytes))
        store.subscribe(self._store_changed)

    # -- metrics -------------------------------------------------------------------------

    def _count_drop(self, reason: str) -> None:
        self.m_drops.inc(reason=reason)

    def _members_by_state(self) -> dict[tuple[str, ...], float]:
        out: dict[tuple[str, ...], float] = {}
        for m in self.members():
            out[(m["state"],)] = out.get((m["state"],), 0.0) + 1
        return out

    def _bytes(self) -> dict[tuple[str, ...], float]:
        t = self.membership.transport if self.membership else None
        if not isinstance(t, NetTransport):
            return {}
        return {("sent",): float(t.bytes_sent), ("received",): float(t.bytes_received)}

    # -- lifecycle -----------------------------------------------------------------------

    async def _start_discovery(self) -> None:
        """Announce and browse over mDNS, once this node has a cluster or is looking for
        one: a node on its own has nothing to say, so it sends nothing."""
        if self.cfg.discovery != "mdns" or self.discovery is not None:
            return
        self.discovery = MdnsDiscovery(self.identity.node_id, self.cfg.name, self.addr)
        try:
            await self.discovery.start(self.state.cluster_id if self.state else "")
        except (OSError, NonUniqueNameException) as exc:
            log.warning("discovery.unavailable", error=str(exc))
            self.discovery = None

    def _check_advertised(self, others: list[str]) -> None:
        """Refuse to advertise a loopback address to members on other machines (``others``:
        their HOST:PORT addresses): each would gossip with itself."""
        problem = loopback_mismatch(hostport.host_of(self.addr), [hostport.host_of(a) for a in others if a])
        if problem is not None:
            raise ClusterError(problem)

    def _member_addresses(self) -> list[str]:
        return [str((rec.value or {}).get("gossip") or "") for rec in self.store.records("node")
                if "/" not in rec.key and rec.key != self.identity.node_id and self.store.revoked_at(rec.key) is None]

    async def start(self) -> None:
        self._loop_thread = threading.get_ident()
        self._loop = asyncio.get_running_loop()
        if self.state is not None:
            self._check_advertised(self._member_addresses())
        elif self.cfg.join_token:
            self._check_advertised(list(JoinToken.decode(self.cfg.join_token).seeds))
        self.placement_nodes()  # the first snapshot for other threads
        if self.state is not None or self.cfg.join_token or self.cfg.bootstrap == "auto":
            await self._start_discovery()
        if self.state is not None:
            await self._start_membership()
        elif self.cfg.join_token:
            token = JoinToken.decode(self.cfg.join_token)
            self._join_task = asyncio.create_task(self._join_loop(token), name="cluster-join")
        elif self.cfg.bootstrap == "auto" and self.discovery is not None:
            self._bootstrap_task = asyncio.create_task(self._bootstrap_loop(), name="cluster-bootstrap")
        elif self.cfg.bootstrap == "first":
            log.info("cluster.bootstrap_first")
            await self.init()

    def _bootstrap_secret(self) -> bytes:
        return hashlib.sha256(b"pleaco bootstrap v1\0" + self.cfg.bootstrap_secret.encode()).digest()

    async def _bootstrap_loop(self) -> None:
        """bootstrap = "auto": join a cluster a peer announces, or, when none does, let the
        lowest node id among the nodes in view found one once that view has been stable for
        BOOTSTRAP_SETTLE seconds (so two first nodes do not found two clusters)."""
        assert self.discovery is not None
        loop = asyncio.get_running_loop()
        view: list[str] = []
        since = loop.time()
        while True:
            await asyncio.sleep(0.5)
            peers = list(self.discovery.peers.values())
            clustered = [p for p in peers if p.cluster_id]
            if clustered:
                cluster_id = min(p.cluster_id for p in clustered)
                seeds = tuple(p.gossip for p in clustered if p.cluster_id == cluster_id)
                log.info("cluster.bootstrap_join", cluster=cluster_id, seeds=",".join(seeds))
                self._join_task = asyncio.create_task(
                    self._join_loop(JoinToken(cluster_id, self._bootstrap_secret(), seeds)), name="cluster-join")
                return
            current = sorted([self.identity.node_id, *(p.node_id for p in peers)])
            if current != view:
                view, since = current, loop.time()
            elif loop.time() - since >= BOOTSTRAP_SETTLE and view[0] == self.identity.node_id:
                log.info("cluster.bootstrap_found", nodes=len(view))
                await self.init(join_secret=self._bootstrap_secret())
                return

    async def stop(self, leave: bool = True) -> None:
        """Stop; with ``leave``, tell the members this node is gone (they then place its
        replicas elsewhere at once). An agent restarting into another release does not:
        it is back before anyone suspects it."""
        for task in (self._join_task, self._seed_task, self._bootstrap_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self.membership is not None:
            await self.membership.stop(leave=leave)
        if self.discovery is not None:
            await self.discovery.stop()

    def key_of(self, node_id: str) -> bytes | None:
        """The key a packet from ``node_id`` must be signed with: admitted and not revoked."""
        if self.store.revoked_at(node_id) is not None:
            return None
        return self.store.public_key_of(node_id)

    async def _start_membership(self) -> None:
        assert self.state is not None
        g = self.gossip
        packets = Codec(self.identity, self.state.cluster_id, self.state.secret, self.key_of,
                        g.replay_window, g.max_packet)
        streams = Codec(self.identity, self.state.cluster_id, self.state.secret, self.key_of,
                        g.replay_window, MAX_FRAME, purpose=b"stream v1")
        transport = NetTransport(packets, streams, parse_host_port(self.cfg.gossip_listen, "gossip_listen"),
                                 self.addr, self._count_drop, on_join=self._answer_join,
                                 stream_timeout=g.stream_timeout, max_pending=g.max_pending_streams)
        for channel, handler in self._channels.items():
            transport.register(channel, handler)
        self.transport = transport
        # cpus is the node's capacity: placement gives a node a share of replicas in proportion;
        # mem (bytes) is what the memory limits of the replicas placed on it may add up to.
        meta = {"name": self.cfg.name, "api": self.cfg.api_listen, "version": __version__,
                "cpus": str(os.cpu_count() or 1)}
        if total := total_memory():
            meta["mem"] = str(total)
        self.membership = Membership(
            self.identity.node_id, self.addr, meta, g, transport, delegate=self.sync,
            admitted=lambda n: self.key_of(n) is not None, on_change=self._member_changed,
        )
        try:
            await self.membership.start()
        except OSError as exc:
            self.membership = None
            raise ClusterError(f"cannot listen on {self.cfg.gossip_listen} for gossip: {exc.strerror or exc}") from exc
        self.sync.attach(self.membership.queue_record)
        self.membership.on_load = self.loads.received
        log.info("cluster.started", cluster=self.state.cluster_id, addr=self.addr)
        self._seed_task = asyncio.create_task(self._seed_loop(), name="cluster-seeds")

    def _set_ready(self) -> None:
        if not self.ready:
            self.ready = True
            self.on_change()

    def _member_changed(self, member: Member) -> None:
        self.on_change()

    def _store_changed(self, rec: Any) -> None:
        # A revocation takes the member out at once, wherever it was learned.
        if rec.kind == "node" and rec.key.endswith("/revoked") and rec.value is not None and self.membership:
            node = rec.key.partition("/")[0]
            self.membership.remove(node)
            log.info("member.revoked", member=node)
        if (rec.kind == "node" and "/" not in rec.key and rec.key != self.identity.node_id and rec.value is not None
                and self._loop is not None):
            # Another node's admission: its packets, and the news that it is alive, may have
            # come first and are held until now. On the loop, where membership lives.
            self._loop.call_soon_threadsafe(self._admitted, rec.key)
        if rec.kind == "node":
            self.on_change()

    def _admitted(self, node_id: str) -> None:
        if self.transport is not None:
            self.transport.admitted(node_id)
        if self.membership is not None:
            self.membership.admitted_now(node_id)

    def seeds(self) -> list[str]:
        """Where to look for the cluster: configured seeds, members found over mDNS, then
        every member we knew."""
        found = list(self.cfg.seeds)
        if self.discovery is not None and self.state is not None:
            found += [p.gossip for p in self.discovery.peers.values() if p.cluster_id == self.state.cluster_id]
        for rec in self.store.records("node"):
            addr = (rec.value or {}).get("gossip")
            if rec.key != self.identity.node_id and isinstance(addr, str) and addr not in found:
                found.append(addr)
        return [s for s in found if s != self.addr]

    async def _seed_loop(self) -> None:
        """Reach at least one other node, retrying with back-off; then push-pull takes over."""
        assert self.membership is not None
        delay = self.gossip.seed_retry
        while True:
            seeds = self.seeds()
            if not seeds or len(self.membership.live()) > 1:
                self._set_ready()
                return
            if await self.membership.join(seeds):
                log.info("cluster.joined_seeds", members=len(self.membership.live()))
                self._set_ready()
                return
            # Nobody answered: run as the only member we know of, and keep looking.
            self._set_ready()
            log.info("cluster.seeds_unreachable", seeds=",".join(seeds), retry_s=delay)
            await asyncio.sleep(delay)
            delay = min(30.0, delay * 2)

    # -- founding and joining ------------------------------------------------------------

    async def init(self, join_secret: bytes | None = None) -> str:
        if self.state is not None:
            raise ClusterError(f"this node is already in cluster {self.state.cluster_id}")
        if self._join_task is not None:
            raise ClusterError("this node is joining a cluster (it was given a join token)")
        state = ClusterState.create()
        state.save(self.cfg.data_dir)
        self.state = state
        trust.store_join_secret(self.store, state, join_secret or trust.new_join_secret())
        self.on_cluster()
        await self._start_membership()
        await self._start_discovery()
        if self.discovery is not None:
            await self.discovery.announce(state.cluster_id)
        log.info("cluster.founded", cluster=state.cluster_id)
        return state.cluster_id

    def token(self) -> str:
        if self.state is None:
            raise ClusterError("this node is not in a cluster: run `pleaco cluster init` first")
        secret = trust.load_join_secret(self.store, self.state)
        if secret is None:
            raise ClusterError("the cluster's join secret has not reached this node yet; try again")
        seeds = [self.addr]
        if self.membership is not None:
            seeds += [m.addr for m in self.membership.live() if m.node_id != self.identity.node_id]
        return JoinToken(self.state.cluster_id, secret, tuple(seeds[:8])).encode()

    async def _join_loop(self, token: JoinToken) -> None:
        delay = self.gossip.seed_retry
        while True:
            for seed in [*token.seeds, *self.cfg.seeds]:
                try:
                    state, records = await self._join_via(seed, token)
                    self.sync.records_received(seed, messages.decode_records(records, "join"))
                except (OSError, TimeoutError, asyncio.IncompleteReadError, TrustError, MessageError) as exc:
                    log.warning("cluster.join_failed", seed=seed, error=str(exc))
                    continue
                state.save(self.cfg.data_dir)
                self.state = state
                log.info("cluster.joined", cluster=state.cluster_id, seed=seed)
                await self._start_membership()
                if self.discovery is not None:
                    await self.discovery.announce(state.cluster_id)
                assert self.membership is not None
                await self.membership.join([seed])
                # After the push-pull: a secret the cluster has a newer version of is not
                # this node's to re-seal (that would make the stale one win).
                self.on_cluster()
                self.on_change()
                return
            await asyncio.sleep(delay)
            delay = min(30.0, delay * 2)

    async def _join_via(self, seed: str, token: JoinToken) -> tuple[ClusterState, list[Any]]:
        req = trust.make_join_request(self.identity, token, self.cfg.name, self.addr, self.cfg.api_listen)
        try:
            host, port = hostport.split(seed)
        except HostPortError as exc:
            raise TrustError(f"seed {seed!r}: {exc}") from None
        async with asyncio.timeout(self.gossip.stream_timeout):
            reader, writer = await asyncio.open_connection(host, port)
            try:
                writer.write(CHANNEL_JOIN + frame(json.dumps(req).encode()))
                await writer.drain()
                # The answer lists every node record (~0.4 KB each): 16 MiB is far beyond any
                # cluster, and this side chose the seed it reads from.
                answer = await read_frame(reader, 16 << 20)
            finally:
                writer.close()
        return trust.open_join_answer(token.join_secret, req["nonce"], answer)

    async def _answer_join(self, raw: bytes) -> bytes:
        """A member's side of a join: check the proof, admit the key, hand over the secret."""
        if self.state is None:
            return trust.refuse_join("this node is not in a cluster")
        secret = trust.load_join_secret(self.store, self.state)
        if secret is None:
            return trust.refuse_join("this node does not know the join secret yet")
        try:
            req = trust.check_join_request(messages.loads(raw), self.state.cluster_id, secret)
        except (TrustError, MessageError) as exc:
            self._count_drop("join_refused")
            self._join_refused.log(error=str(exc))
            return trust.refuse_join(str(exc))
        others = [hostport.host_of(a) for a in [self.addr, *self._member_addresses()] if a]
        if (problem := loopback_mismatch(hostport.host_of(req.addr), others, f"node {req.node_id}")) is not None:
            self._join_refused.log(member=req.node_id, error="loopback address")
            return trust.refuse_join(problem)
        if self.store.revoked_at(req.node_id) is not None:
            self._join_refused.log(member=req.node_id, error="revoked")
            return trust.refuse_join(f"node {req.node_id} was removed from the cluster")
        current = self.store.value("node", req.node_id) or {}
        if current.get("public_key") != req.public_key.hex():
            self.store.put("node", req.node_id, {
                "name": req.name, "public_key": req.public_key.hex(), "address": req.api, "gossip": req.addr,
                "version": "", "admitted_by": self.identity.node_id,
            })
        log.info("cluster.admitted", member=req.node_id, name=req.name, addr=req.addr)
        members = [messages.record_to_json(r) for r in self.store.records("node")]
        return trust.seal_join_answer(secret, req.nonce, self.state, members)

    # -- streams between members, for other parts ---------------------------------------

    def register_channel(self, channel: bytes, handler: ChannelHandler) -> None:
        """Serve ``channel`` (one byte, not S or J) on the gossip port: ``handler`` gets each
        sealed stream once its opening header came from an admitted member, with that header."""
        check_channel(channel)
        self._channels[channel] = handler
        if self.transport is not None:
            self.transport.register(channel, handler)

    async def open_stream(self, addr: str, channel: bytes, header: dict[str, Any]) -> SealedStream:
        """A sealed stream to the member at ``addr`` on ``channel``, opened with ``header``.
        Raises TransportError when it cannot be opened (or this node is not a member)."""
        if self.transport is None:
            raise TransportError("this node is not in a cluster")
        return await self.transport.open_stream(addr, channel, header, self.gossip.stream_timeout)

    def publish_load(self, entries: list[AppLoadEntry]) -> None:
        """This node's per-app load: into its own view at once, and to the others by gossip
        (split into parts that fit a packet; see messages.split_load)."""
        budget = self.membership.load_budget() if self.membership is not None else 1 << 16
        reports = split_load(self.identity.node_id, int(time.time() * 1000), entries, budget)
        self.loads.set_local(reports)
        if self.membership is not None:
            self.membership.publish_load(reports)

    def live_peers(self) -> list[Member]:
        """The other members that are alive or suspect, as this node sees them."""
        if self.membership is None:
            return []
        return [m for m in self.membership.live() if m.node_id != self.identity.node_id]

    # -- removal -------------------------------------------------------------------------

    def revoke(self, node_id: str) -> None:
        if node_id == self.identity.node_id:
            raise ClusterError("a node cannot remove itself; run `pleaco nodes rm` on another node")
        if self.store.value("node", node_id) is None:
            raise KeyError(node_id)
        writes: list[tuple[str, str, dict[str, Any] | None]] = [
            ("node", f"{node_id}/revoked", {"by": self.identity.node_id, "at_ms": int(time.time() * 1000)}),
            # Its subnet is free again (pleaco.net.subnets): a removed node runs nothing.
            (SUBNET_KIND, node_id, None),
        ]
        self.store.put_many(writes)
        if self.state is not None:
            # Rotate the join secret: tokens handed out before no longer admit anyone.
            trust.store_join_secret(self.store, self.state, trust.new_join_secret())

    # -- views ---------------------------------------------------------------------------

    def placement_nodes(self) -> list[str]:
        """The nodes replicas are placed on; empty while this node does not know yet.

        Callable from any thread: membership lives on the event loop (its clock is the
        loop's, its tables change there), so a worker thread (a webhook's push, a build)
        gets the list as the loop last worked it out."""
        if threading.get_ident() != self._loop_thread:
            return list(self._placement)
        if self.membership is None:
            nodes = [] if self._join_task is not None and not self._join_task.done() else [self.identity.node_id]
        else:
            nodes = self.membership.placement_nodes() if self.ready else []
            if nodes:
                now = self.membership.loop_time
                held = [m.node_id for m in self.membership.members.values() if m.node_id not in nodes
                        and self.hold(m.node_id, 0.0 if m.state in LIVE else now - m.since)]
                nodes = sorted([*nodes, *held]) if held else nodes
        self._placement = nodes
        return nodes

    def weights(self) -> dict[str, float]:
        """Placement weight of each member: its CPU count, as it announced it."""
        if self.membership is None:
            return {}
        out = {}
        for m in self.membership.members.values():
            cpus = m.meta.get("cpus", "1")
            out[m.node_id] = float(cpus) if cpus.isascii() and cpus.isdigit() and 0 < int(cpus) < 4096 else 1.0
        return out

    def memory(self) -> dict[str, int]:
        """Each member's memory in bytes, as it announced it; a member that did not (an
        older version) is missing, and placement does not limit it."""
        if self.membership is None:
            total = total_memory()
            return {self.identity.node_id: total} if total else {}
        out = {}
        for m in self.membership.members.values():
            mem = m.meta.get("mem", "")
            if mem.isascii() and mem.isdigit() and 0 < int(mem) < 1 << 60:
                out[m.node_id] = int(mem)
        return out

    def members(self) -> list[dict[str, Any]]:
        """Every node this one knows, with its state and what it says about itself."""
        known: dict[str, dict[str, Any]] = {}
        for rec in self.store.records("node"):
            if "/" in rec.key:
                continue
            v = rec.value or {}
            state = "revoked" if self.store.revoked_at(rec.key) is not None else "unknown"
            known[rec.key] = {"id": rec.key, "name": v.get("name", ""), "state": state,
                              "address": v.get("address", ""), "gossip": v.get("gossip", ""),
                              "version": v.get("version", ""), "last_seen": rec.ts.wall_ms / 1000,
                              "incarnation": 0,
                              # The container subnet it claims (pleaco.net.subnets), "" for none.
                              "subnet": str((self.store.value(SUBNET_KIND, rec.key) or {}).get("subnet", ""))}
        if self.membership is None:
            me = known.setdefault(self.identity.node_id, {"id": self.identity.node_id})
            me.update(state="alive", last_seen=time.time())
            return sorted(known.values(), key=lambda m: m.get("name", ""))
        for m in self.membership.members.values():
            entry = known.setdefault(m.node_id, {"id": m.node_id, "name": "", "address": "", "version": ""})
            if entry.get("state") == "revoked":
                continue
            entry.update(state=m.state, gossip=m.addr, incarnation=m.incarnation,
                         name=m.meta.get("name") or entry.get("name", ""),
                         address=m.meta.get("api") or entry.get("address", ""),
                         version=m.meta.get("version") or entry.get("version", ""),
                         last_seen=self._last_seen(m, entry))
        return sorted(known.values(), key=lambda m: m.get("name", ""))

    def _last_seen(self, m: Member, entry: dict[str, Any]) -> float:
        if m.node_id == self.identity.node_id:
            return time.time()
        return m.last_heard or float(entry.get("last_seen", 0))


def total_memory(meminfo: Path = Path("/proc/meminfo")) -> int:
    """This machine's memory in bytes (MemTotal, which the kernel gives in kB), 0 when it
    cannot be read."""
    try:
        for line in meminfo.read_text().splitlines():
            fields = line.split()
            if len(fields) == 3 and fields[0] == "MemTotal:" and fields[2] == "kB":
                return int(fields[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0
