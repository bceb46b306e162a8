"""Finding other nodes on the LAN with mDNS (DNS-SD), through zeroconf.

Every node announces ``NODE_ID._pleaco._tcp.local.`` with its gossip address and a TXT
record holding its cluster id (empty while it has none), node id, name and gossip port,
and browses for the others. Members use what it finds as seeds; nodes without a cluster
use it to bootstrap one (pleaco.cluster.service).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable
from dataclasses import dataclass

from zeroconf import IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from pleaco import hostport, logs

log = logs.get("pleaco.cluster.discovery")

SERVICE = "_pleaco._tcp.local."


@dataclass(frozen=True)
class Peer:
    node_id: str
    cluster_id: str  # "" while the node has no cluster
    gossip: str  # HOST:PORT
    name: str


class MdnsDiscovery:
    def __init__(self, node_id: str, name: str, gossip: str, on_change: Callable[[], None] = lambda: None) -> None:
        self.node_id = node_id
        self.name = name
        self.gossip = gossip
        self.on_change = on_change
        self.peers: dict[str, Peer] = {}
        self._zc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._info: AsyncServiceInfo | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def _service_info(self, cluster_id: str) -> AsyncServiceInfo:
        host, port = hostport.split(self.gossip)
        return AsyncServiceInfo(
            SERVICE, f"{self.node_id}.{SERVICE}", addresses=[socket.inet_aton(host)], port=port,
            properties={"cluster": cluster_id, "node": self.node_id, "name": self.name[:60], "gossip": str(port)},
            server=f"pleaco-{self.node_id[:12]}.local.",
        )

    async def start(self, cluster_id: str) -> None:
        host = hostport.host_of(self.gossip)
        # Announce and listen on the gossip address's interface only: never on interfaces
        # the operator did not give to the cluster.
        interfaces = [host] if host not in ("0.0.0.0", "") else None
        self._zc = AsyncZeroconf(interfaces=interfaces, ip_version=IPVersion.V4Only) if interfaces else AsyncZeroconf(
            ip_version=IPVersion.V4Only)
        self._info = self._service_info(cluster_id)
        await self._zc.async_register_service(self._info)
        self._browser = AsyncServiceBrowser(self._zc.zeroconf, [SERVICE], handlers=[self._changed])
        log.info("discovery.started", service=SERVICE, addr=self.gossip)

    async def announce(self, cluster_id: str) -> None:
        """Re-announce with a new cluster id (after founding or joining)."""
        if self._zc is None or self._info is None:
            return
        self._info = self._service_info(cluster_id)
        await self._zc.async_update_service(self._info)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._browser is not None:
            await self._browser.async_cancel()
        if self._zc is not None:
            with contextlib.suppress(Exception):
                await self._zc.async_unregister_all_services()
            await self._zc.async_close()

    def _changed(self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange) -> None:
        node = name.split(".", 1)[0]
        if node == self.node_id:
            return
        if state_change is ServiceStateChange.Removed:
            if self.peers.pop(node, None) is not None:
                self.on_change()
            return
        task = asyncio.get_running_loop().create_task(self._resolve(service_type, name))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _resolve(self, service_type: str, name: str) -> None:
        assert self._zc is not None
        info = AsyncServiceInfo(service_type, name)
        if not await info.async_request(self._zc.zeroconf, 3000):
            return
        props = {k.decode(errors="replace"): (v or b"").decode(errors="replace")
                 for k, v in (info.properties or {}).items()}
        addresses = info.parsed_addresses(IPVersion.V4Only)
        node = props.get("node", "")
        if not addresses or not info.port or len(node) != 32:
            return
        peer = Peer(node, props.get("cluster", ""), f"{addresses[0]}:{info.port}", props.get("name", ""))
        if self.peers.get(node) != peer:
            self.peers[node] = peer
            log.info("discovery.found", member=node, addr=peer.gossip, cluster=peer.cluster_id or "-")
            self.on_change()
