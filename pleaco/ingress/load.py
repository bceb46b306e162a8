"""The load loop: every ``[proxy] load_interval`` seconds this node reports its per-app load.

What it reports, per app (``messages.AppLoadEntry``): the traffic through this node's proxy
over the last window (pleaco.ingress.traffic: requests/s, concurrency, p50/p99 latency), the
app's running replicas here, and the CPU (cores, over the interval) and memory they use,
read from their cgroups (pleaco.runtime.usage). The report goes into this node's own view at
once and to the other nodes by gossip (``Cluster.publish_load``); pleaco.cluster.load sums
the nodes' latest reports into the cluster-wide figures that ``apps show``, ``/metrics`` and
the autoscaler read.

While some app of the cluster is autoscaled (``autoscaled``), reports come every
``[proxy] autoscale_load_interval`` (1 s) instead: the autoscaler's panic window reads them,
and a 2 s report interval was about a second of how late a load step was seen.

An app that had traffic or replicas here in the last report and has none now is reported
once more with zeros, so the cluster-wide figure drops at once rather than when the old
entry goes stale.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from pleaco.cluster.load import LoadView
from pleaco.cluster.messages import AppLoadEntry
from pleaco.ingress.traffic import WINDOW, TrafficStats
from pleaco.metrics import Gauge, Registry
from pleaco.reconcile.loop import Loop
from pleaco.reconcile.view import NodeView
from pleaco.runtime.docker import ContainerInfo
from pleaco.runtime.usage import CgroupUsage


@dataclass(frozen=True)
class ReplicaUsage:
    app: str
    container: str
    cpu: float | None  # cores over the last interval; None for a first sample
    memory: int


class LoadReporter(Loop):
    name = "load"

    def __init__(self, interval: float, view: NodeView, traffic: TrafficStats | None,
                 publish: Callable[[list[AppLoadEntry]], None], loads: LoadView, registry: Registry,
                 usage: CgroupUsage | None = None, clock: Callable[[], float] = time.monotonic,
                 held: Callable[[], dict[str, int]] | None = None, autoscaled: Callable[[], bool] | None = None,
                 autoscale_interval: float | None = None) -> None:
        super().__init__()
        self.interval = interval
        # Whether some app is autoscaled, and the report interval while one is.
        self.autoscaled = autoscaled or (lambda: False)
        self.autoscale_interval = interval if autoscale_interval is None else min(interval, autoscale_interval)
        self.view = view
        self.traffic = traffic
        self.publish = publish
        self.loads = loads
        self.usage = usage or CgroupUsage()
        self.clock = clock
        # The activator's held requests by app (pleaco.ingress.activator): demand too.
        self.held = held or dict
        self._cpu: dict[str, tuple[float, float]] = {}  # container id -> (clock, cpu seconds)
        self.replicas: list[ReplicaUsage] = []
        self._reported: set[str] = set()
        registry.register(Gauge(
            "pleaco_replica_cpu_cores", "CPU cores each replica on this node used over the last load interval.",
            ("app", "container"),
            collect=lambda: {(r.app, r.container[:12]): r.cpu for r in self.replicas if r.cpu is not None}))
        registry.register(Gauge(
            "pleaco_replica_memory_bytes", "Memory each replica on this node uses (inactive file cache excluded).",
            ("app", "container"), collect=lambda: {(r.app, r.container[:12]): float(r.memory) for r in self.replicas}))
        registry.register(Gauge(
            "pleaco_app_requests_per_second", "Requests per second to each app through every node's proxy "
            "(the cluster-wide sum of the nodes' latest load reports).", ("app",),
            collect=lambda: {(app, ): round(a.rps, 3) for app, a in self.loads.all().items()}))
        registry.register(Gauge(
            "pleaco_app_concurrency", "Requests in flight to each app through every node's proxy, cluster-wide "
            "(mean over each node's window, summed).", ("app",),
            collect=lambda: {(app, ): round(a.concurrency, 3) for app, a in self.loads.all().items()}))

    def next_wait(self) -> float:
        return self.autoscale_interval if self.autoscaled() else self.interval

    def sample_replicas(self, containers: list[ContainerInfo]) -> list[ReplicaUsage]:
        """Usage of these (running) containers; CPU as cores since the previous sample."""
        out = []
        seen = set()
        for c in containers:
            usage = self.usage.read(c.id)
            if usage is None:
                continue
            seen.add(c.id)
            now = self.clock()
            before = self._cpu.get(c.id)
            self._cpu[c.id] = (now, usage.cpu_seconds)
            cpu = None
            if before is not None and now > before[0]:
                cpu = max(0.0, (usage.cpu_seconds - before[1]) / (now - before[0]))
            out.append(ReplicaUsage(c.app, c.id, cpu, usage.memory))
        for cid in set(self._cpu) - seen:
            del self._cpu[cid]
        self.usage.forget(seen)
        return out

    def entries(self) -> list[AppLoadEntry]:
        traffic = self.traffic.snapshot() if self.traffic is not None else {}
        replicas: dict[str, list[ReplicaUsage]] = {}
        for r in self.replicas:
            replicas.setdefault(r.app, []).append(r)
        running: dict[str, int] = {}
        for c in self.view.observed.containers:
            if c.running:
                running[c.app] = running.get(c.app, 0) + 1
        held = self.held()
        apps = set(traffic) | set(running) | set(held)
        out = []
        for app in sorted(apps | self._reported):
            t = traffic.get(app)
            mine = replicas.get(app, [])
            # A held request has not reached the access log (a line is written when it
            # ends): it counts as one in flight, and as the one request it will be in the
            # traffic window, so an app woken from zero is not idle while it starts.
            waiting = held.get(app, 0)
            out.append(AppLoadEntry(
                app=app, rps=(t.rps if t else 0.0) + waiting / WINDOW,
                concurrency=(t.concurrency if t else 0.0) + waiting,
                p50=t.p50 if t else None, p99=t.p99 if t else None, replicas=running.get(app, 0),
                cpu=sum(r.cpu or 0.0 for r in mine), memory=sum(r.memory for r in mine)))
        self._reported = apps
        return out

    async def step(self) -> str | None:
        containers = [c for c in self.view.observed.containers if c.running]
        self.replicas = await self.blocking(self.sample_replicas, containers)
        self.publish(self.entries())
        return None
