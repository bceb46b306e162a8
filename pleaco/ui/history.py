"""Every app's recent traffic, latency and replicas, kept in memory on this node for the
dashboard's Charts page: no Prometheus needed.

Every ``[ui] history_interval`` seconds the sampler reads what ``apps show`` shows of each
app (the cluster-wide load gossiped by every node's proxy, pleaco/cluster/load.py, and the
replicas wanted, running and healthy) and appends one ``Sample`` to the app's ring, which
holds ``history_span`` seconds of them: memory per app is fixed (360 samples at the
defaults), and an app that is removed loses its ring at the next sample.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

from pleaco.reconcile.loop import Loop
from pleaco.ui.config import UiConfig


@dataclass(frozen=True)
class Sample:
    t: float  # seconds since the epoch, this node's clock
    rps: float  # requests/s, cluster-wide (0 when no proxy reported any)
    p50_ms: float | None  # None: no request in the load window
    p99_ms: float | None
    replicas: int  # wanted
    running: int
    healthy: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def sample_of(shown: dict[str, Any], now: float) -> Sample:
    """A sample from an app as ``GET /v1/apps/NAME`` answers it."""
    load = shown.get("load") or {}
    return Sample(t=round(now, 3), rps=float(load.get("rps") or 0.0), p50_ms=load.get("p50_ms"),
                  p99_ms=load.get("p99_ms"), replicas=int(shown.get("replicas") or 0),
                  running=int(shown.get("running") or 0), healthy=int(shown.get("healthy") or 0))


class Ring:
    """The newest ``capacity`` samples, oldest first."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("a ring holds at least one sample")
        self._items: deque[Sample] = deque(maxlen=capacity)

    def append(self, sample: Sample) -> None:
        self._items.append(sample)

    def since(self, t: float) -> list[Sample]:
        return [s for s in self._items if s.t >= t]

    def __len__(self) -> int:
        return len(self._items)


class AppHistory:
    """One ring per app."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._rings: dict[str, Ring] = {}

    def record(self, apps: Iterable[dict[str, Any]], now: float) -> None:
        """One sample of every app in ``apps`` (the API's JSON of each); the rings of apps
        not among them are dropped."""
        seen = set()
        for shown in apps:
            name = str(shown["name"])
            seen.add(name)
            self._rings.setdefault(name, Ring(self.capacity)).append(sample_of(shown, now))
        for gone in set(self._rings) - seen:
            del self._rings[gone]

    def samples(self, app: str, since: float = 0.0) -> list[Sample]:
        ring = self._rings.get(app)
        return ring.since(since) if ring is not None else []

    def apps(self) -> list[str]:
        return sorted(self._rings)


class HistorySampler(Loop):
    """The loop that takes a sample of every app each ``history_interval`` seconds."""

    name = "ui_history"

    def __init__(self, cfg: UiConfig, apps: Callable[[], list[dict[str, Any]]],
                 clock: Callable[[], float] = time.time) -> None:
        super().__init__()
        self.cfg = cfg
        self.interval = cfg.history_interval
        self.history = AppHistory(cfg.history_samples)
        self._apps = apps
        self._clock = clock

    async def step(self) -> str | None:
        self.history.record(self._apps(), self._clock())
        return None
