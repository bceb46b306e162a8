"""The dashboard's per-app history (pleaco/ui/history.py): a fixed ring per app."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from pleaco.ui.config import UiConfig
from pleaco.ui.history import AppHistory, HistorySampler, Ring, Sample, sample_of


def shown(name: str, replicas: int = 2, rps: float | None = 3.5) -> dict[str, Any]:
    load = None if rps is None else {"rps": rps, "p50_ms": 4.0, "p99_ms": 12.5}
    return {"name": name, "replicas": replicas, "running": replicas, "healthy": replicas - 1, "load": load}


def test_sample_of_an_app_as_the_api_shows_it() -> None:
    s = sample_of(shown("a"), 100.0)
    assert s == Sample(t=100.0, rps=3.5, p50_ms=4.0, p99_ms=12.5, replicas=2, running=2, healthy=1)
    quiet = sample_of(shown("a", rps=None), 101.0)  # no proxy reported it: no traffic, no latency
    assert quiet.rps == 0.0 and quiet.p50_ms is None and quiet.p99_ms is None


def test_ring_keeps_the_newest_capacity_samples_oldest_first() -> None:
    ring = Ring(3)
    for t in range(5):
        ring.append(sample_of(shown("a"), float(t)))
    assert len(ring) == 3
    assert [s.t for s in ring.since(0)] == [2.0, 3.0, 4.0]
    assert [s.t for s in ring.since(3.5)] == [4.0]
    with pytest.raises(ValueError):
        Ring(0)


def test_history_per_app_and_removed_apps_are_dropped() -> None:
    h = AppHistory(capacity=10)
    h.record([shown("a"), shown("b", replicas=5)], 1.0)
    h.record([shown("b", replicas=6)], 2.0)  # a was removed
    assert h.apps() == ["b"]
    assert h.samples("a") == []
    assert [s.replicas for s in h.samples("b")] == [5, 6]


def test_capacity_is_the_span_over_the_interval() -> None:
    assert UiConfig().history_samples == 360  # an hour at one sample per 10 s
    assert UiConfig(history_interval=1.0, history_span=60.0).history_samples == 60
    assert UiConfig(history_interval=0.0).validate() == ["ui.history_interval: must be greater than 0"]
    assert UiConfig(history_interval=0.001).validate()  # too many samples per app


def test_sampler_step_samples_every_app() -> None:
    calls: list[int] = []

    def apps() -> list[dict[str, Any]]:
        calls.append(1)
        return [shown("a", replicas=len(calls))]

    clock = iter([10.0, 20.0])
    sampler = HistorySampler(UiConfig(history_interval=10.0, history_span=20.0), apps, clock=lambda: next(clock))
    assert sampler.interval == 10.0
    for _ in range(2):
        asyncio.run(sampler.step())
    assert [(s.t, s.replicas) for s in sampler.history.samples("a")] == [(10.0, 1), (20.0, 2)]
