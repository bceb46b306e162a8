"""The cluster-wide load of every app: each node's latest report, summed.

Every few seconds each node reports its per-app figures (requests/s and concurrency through
its proxy, latency, its replicas and their CPU and memory: ``messages.AppLoadEntry``) in a
``LoadReport`` piggybacked on gossip packets (``Membership.publish_load``), never written to
the store: the figures are stale seconds later, and a durable write per node per app every
few seconds would cost a fsync each. Every node keeps the latest entry per (node, app) with
the time it arrived, and sums them into the cluster-wide figure.

An entry not refreshed within ``stale_after`` seconds is dropped (its node died, left or
went silent), and so are the entries of nodes ``live`` no longer names: a dead node's
traffic is not counted while the failure detector already knows it is gone.

The read API, for the autoscaler and ``apps show``: ``LoadView.cluster(app)`` and
``LoadView.all()`` give ``AppLoad``; ``LoadView.local`` this node's own report.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from typing import Any

from pleaco.cluster.messages import AppLoadEntry, LoadReport


@dataclass(frozen=True)
class AppLoad:
    """One app's load across the cluster, from the latest report of every node that has one.

    ``rps``, ``concurrency``, ``replicas``, ``cpu`` and ``memory`` are sums over the nodes.
    Latency quantiles cannot be summed: ``p50`` is the request-weighted mean of the nodes'
    medians, ``p99`` the highest of their 99th percentiles (an upper bound), both in
    seconds, None when no node saw a request. ``sampled_at`` is the oldest sample included
    (seconds since the epoch, the reporting node's clock) and ``age`` the seconds since the
    oldest included entry arrived here: how stale the sum may be."""

    app: str
    rps: float
    concurrency: float
    p50: float | None
    p99: float | None
    replicas: int
    cpu: float  # cores
    memory: int  # bytes
    nodes: int  # nodes whose entries are summed
    sampled_at: float
    age: float

    def to_json(self) -> dict[str, Any]:
        def ms(v: float | None) -> float | None:
            return None if v is None else round(v * 1000, 2)

        return {"rps": round(self.rps, 2), "concurrency": round(self.concurrency, 3),
                "p50_ms": ms(self.p50), "p99_ms": ms(self.p99), "replicas": self.replicas,
                "cpu": round(self.cpu, 3), "memory_bytes": self.memory, "nodes": self.nodes,
                "sampled_at": round(self.sampled_at, 3), "age_s": round(self.age, 2)}


@dataclass(frozen=True)
class _Held:
    wall_ms: int
    entry: AppLoadEntry
    arrived: float  # this node's monotonic clock


class LoadView:
    def __init__(self, node_id: str, stale_after: float, live: Callable[[], Collection[str]] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.node_id = node_id
        self.stale_after = stale_after
        self.live = live
        self.clock = clock
        self._held: dict[tuple[str, str], _Held] = {}  # (node, app) -> latest entry
        self.local: dict[str, AppLoadEntry] = {}  # this node's latest figures, by app
        # Called (on the receiving thread) when a report brought a newer entry: the
        # autoscaler samples at once rather than at its next tick.
        self.on_news: Callable[[], None] = lambda: None

    def received(self, report: LoadReport) -> bool:
        """Take a report (part) in; True when any of its entries was newer than held."""
        news = False
        now = self.clock()
        for entry in report.entries:
            key = (report.node, entry.app)
            held = self._held.get(key)
            if held is None or report.wall_ms > held.wall_ms:
                self._held[key] = _Held(report.wall_ms, entry, now)
                news = True
        if news:
            self.on_news()
        return news

    def set_local(self, reports: Iterable[LoadReport]) -> None:
        """This node's own report (all its parts)."""
        self.local = {}
        for report in reports:
            self.received(report)
            self.local.update((e.app, e) for e in report.entries)

    def _current(self) -> list[_Held]:
        now = self.clock()
        live = set(self.live()) | {self.node_id} if self.live is not None else None
        gone = [key for key, held in self._held.items()
                if now - held.arrived > self.stale_after or (live is not None and key[0] not in live)]
        for key in gone:
            del self._held[key]
        return list(self._held.values())

    def all(self) -> dict[str, AppLoad]:
        """Every app some live node reported recently."""
        by_app: dict[str, list[_Held]] = {}
        for held in self._current():
            by_app.setdefault(held.entry.app, []).append(held)
        return {app: _sum(app, items, self.clock()) for app, items in by_app.items()}

    def cluster(self, app: str) -> AppLoad | None:
        """The app's cluster-wide load; None when no live node reported it recently."""
        items = [h for h in self._current() if h.entry.app == app]
        return _sum(app, items, self.clock()) if items else None


def _sum(app: str, items: list[_Held], now: float) -> AppLoad:
    entries = [h.entry for h in items]
    rps = sum(e.rps for e in entries)
    with_p50 = [e for e in entries if e.p50 is not None]
    weight = sum(e.rps for e in with_p50)
    p50 = None
    if with_p50:
        p50 = (sum(e.p50 * e.rps for e in with_p50 if e.p50 is not None) / weight if weight
               else max(e.p50 for e in with_p50 if e.p50 is not None))
    p99s = [e.p99 for e in entries if e.p99 is not None]
    return AppLoad(app=app, rps=rps, concurrency=sum(e.concurrency for e in entries), p50=p50,
                   p99=max(p99s) if p99s else None, replicas=sum(e.replicas for e in entries),
                   cpu=sum(e.cpu for e in entries), memory=sum(e.memory for e in entries), nodes=len(entries),
                   sampled_at=min(h.wall_ms for h in items) / 1000, age=max(now - h.arrived for h in items))
