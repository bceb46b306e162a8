"""The drain handshake between the app loop and the proxies, as one state machine.

Per container of this node, before the app loop may stop it:

    serving ──request()──> draining ──(left every route: ours applied, record written)──>
    out since T ──(T + wait)──> removable

- **serving**: this node's proxy routes to it and its ``route`` record says so, so the other
  nodes' proxies do too (the routing mesh).
- **draining**: the app loop asked to stop it (``may_remove`` answered False and asked for
  the drain). ``NodeView.serving`` is False from now on, so the app loop's next record
  write and the proxy's next pass both leave it out.
- **out**: since T, it is neither in this node's record (``observe_serving``) nor in what
  this node's proxy routes to (``proxy_applied``): T is the later of the two.
- **removable**: ``wait()`` seconds after T: the proxies' upstream cache expired
  (``proxy_delay``), the requests in flight finished (``drain_grace``), and, with other
  nodes, the record travelled to them and their proxies applied it (``MESH_DELAY``).

Both sides get the same ``Drain`` at construction; neither calls into the other.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from pleaco import logs
from pleaco.runtime import ContainerInfo

log = logs.get("pleaco.reconcile.drain")

# Seconds for a replica's "not serving" to reach the other nodes' proxies: the app loop's
# record write (at once), gossip (well under a second in a LAN cluster) and their proxy's
# next pass. Their upstream cache (proxy_delay) is counted separately.
MESH_DELAY = 2.0


class Drain:
    def __init__(self, grace: float, proxy_delay: float = 0.0, mesh: Callable[[], bool] = lambda: False,
                 on_request: Callable[[], None] = lambda: None) -> None:
        self.grace = grace
        self.proxy_delay = proxy_delay
        self.mesh = mesh  # whether other live nodes' proxies may route to this node's replicas
        self.on_request = on_request  # a drain was asked for: publish the change soon
        self.requested: set[str] = set()
        self.out_since: dict[str, float] = {}
        self.serving: set[str] = set()
        # What this node's proxy last applied, None when it routes nothing (no proxy, or down).
        self.proxy_routed: set[str] | None = None

    def draining(self, cid: str) -> bool:
        return cid in self.requested

    def cancel(self, c: ContainerInfo) -> None:
        """The app loop wants this container again before it was stopped (an app scaled to
        zero and woken at once, ``apps scale`` down and up): it serves again as soon as it is
        healthy, rather than staying out of every route until a restart."""
        if c.id in self.requested:
            self.requested.discard(c.id)
            log.info("replica.drain_cancelled", app=c.app, replica=c.replica, release=c.release,
                     container=c.id[:12], reason="wanted again")
            self.on_request()

    def wait(self) -> float:
        return self.grace + self.proxy_delay + (MESH_DELAY if self.mesh() else 0.0)

    def observe_serving(self, serving: set[str], present: set[str], now: float | None = None) -> None:
        """What this node serves now (the app loop, as it writes the route records)."""
        now = time.monotonic() if now is None else now
        for gone in self.serving - serving:
            self.out_since.setdefault(gone, now)
        for back in serving & set(self.out_since):
            del self.out_since[back]
        self.serving = set(serving)
        # Forget containers that no longer exist.
        self.requested &= present
        for cid in [k for k in self.out_since if k not in present]:
            del self.out_since[cid]

    def proxy_applied(self, routed: set[str] | None, now: float | None = None) -> None:
        """What this node's proxy routes to now (None: nothing, it is down or there is
        none). A container it stops routing to is out from now, if it was not already."""
        now = time.monotonic() if now is None else now
        if self.proxy_routed is not None and routed is not None:
            for gone in self.proxy_routed - routed:
                if gone not in self.serving:
                    self.out_since[gone] = max(self.out_since.get(gone, now), now)
        self.proxy_routed = routed

    def may_remove(self, c: ContainerInfo, reason: str, now: float | None = None) -> bool:
        """Whether the app loop may stop this container now; starts its drain if it serves."""
        now = time.monotonic() if now is None else now
        if not self.mesh() and self.proxy_routed is None:
            return True  # no proxy, here or elsewhere, sends it anything
        if c.id in self.serving or (self.proxy_routed is not None and c.id in self.proxy_routed):
            if c.id not in self.requested:
                self.requested.add(c.id)
                log.info("replica.draining", app=c.app, replica=c.replica, release=c.release,
                         container=c.id[:12], reason=reason)
                self.on_request()
            return False
        since = self.out_since.get(c.id)
        return since is None or now - since >= self.wait()
