"""The autoscaler's decision over synthetic series: expected counts, and properties."""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pleaco.scale import AutoscalePolicy, Decision, PolicyError, Sample, decide

TICK = 2.0  # seconds between decisions, and between samples, in the simulations


def policy(**kw: Any) -> AutoscalePolicy:
    return AutoscalePolicy(**{"min_replicas": 1, "max_replicas": 10, "target": 50.0, **kw})


def simulate(p: AutoscalePolicy, load: Callable[[float], float], start: float, end: float,
             current: int, history: float = 120.0) -> list[tuple[float, Decision]]:
    """Decide every TICK from ``start`` to ``end`` (inclusive) with a sample of ``load`` every
    TICK from ``start - history``; each decision's count is the next one's current count."""
    out: list[tuple[float, Decision]] = []
    previous: Decision | None = None
    now = start
    while now <= end + 1e-9:
        samples = [Sample(t, load(t)) for t in _ticks(now - history, now)]
        previous = decide(p, current, samples, now, previous)
        current = previous.desired
        out.append((now, previous))
        now += TICK
    return out


def _ticks(start: float, end: float) -> list[float]:
    n = round((end - start) / TICK)
    return [start + i * TICK for i in range(n + 1)]


def changes(run: list[tuple[float, Decision]], first: int) -> list[tuple[float, int]]:
    """(time, count) at every change of count, starting with the count before the run."""
    out = [(run[0][0] - TICK, first)]
    for t, d in run:
        if d.desired != out[-1][1]:
            out.append((t, d.desired))
    return out


# -- synthetic series: expected counts ------------------------------------------------------

def test_step_up_reaches_the_count_within_the_panic_window_without_overshoot() -> None:
    # 1 replica at its target of 50 in flight, then the load steps to 200: 4 replicas' worth.
    run = simulate(policy(), lambda t: 50.0 if t < 60 else 200.0, start=0, end=300, current=1)
    # Within the 6 s panic window: each tick the panic average has more of the new load.
    assert changes(run, 1) == [(-TICK, 1), (60, 2), (62, 3), (64, 4)]
    assert run[30][1].panic and "panic" in run[30][1].reason
    assert not run[-1][1].panic  # a stable window after the surge, panic is over
    assert max(d.desired for _, d in run) == 4


def test_step_down_is_limited_per_stable_window() -> None:
    # 4 replicas, the load falls to one replica's worth: down to half per 60 s window.
    run = simulate(policy(), lambda t: 50.0, start=0, end=200, current=4)
    assert changes(run, 4) == [(-TICK, 4), (0, 2), (60, 1)]
    assert "at most" in run[0][1].reason


def test_ramp_follows_the_load_up_without_going_down() -> None:
    load = lambda t: min(400.0, max(0.0, t) * 400 / 120)  # noqa: E731
    run = simulate(policy(), load, start=0, end=400, current=1)
    counts = [d.desired for _, d in run]
    assert counts == sorted(counts), "a rising load never makes the count fall"
    assert counts[-1] == 8 and max(counts) == 8


def test_spike_scales_up_in_panic_holds_then_steps_down() -> None:
    load = lambda t: 500.0 if t == 100 else 50.0  # noqa: E731  one sample of a spike
    run = simulate(policy(), load, start=0, end=300, current=1)
    # At 100 the panic window holds (50 + 50 + 500) / 3 = 200: 4 replicas; panic holds them
    # for a stable window after the spike, then the scale-down limit halves per window
    # (windows begin at 0, 60, 120, 180, ...).
    assert changes(run, 1) == [(-TICK, 1), (100, 4), (160, 2), (180, 1)]
    held = [d for t, d in run if 100 < t < 160]
    assert all(d.panic and "holding 4" in d.reason for d in held)


def test_noise_of_20_percent_never_changes_the_count() -> None:
    rng = random.Random(11)
    noise = {round(t, 3): 200.0 * rng.uniform(0.8, 1.2) for t in _ticks(-200, 3600)}
    run = simulate(policy(), lambda t: noise[round(t, 3)], start=0, end=3600, current=4)
    assert changes(run, 4) == [(-TICK, 4)], "zero flaps in an hour"


def test_idle_for_the_whole_window_scales_to_zero() -> None:
    p = policy(min_replicas=0, max_replicas=5, scale_to_zero_after=30.0)
    d = decide(p, 2, [Sample(t, 0.0) for t in _ticks(-100, 0)], 0.0)
    assert d.desired == 0 and "scale to zero" in d.reason


def test_idle_for_less_than_the_window_keeps_a_replica() -> None:
    p = policy(min_replicas=0, max_replicas=5, scale_to_zero_after=30.0)
    load = [Sample(t, 100.0 if t <= -22 else 0.0) for t in _ticks(-100, 0)]
    assert decide(p, 2, load, 0.0).desired >= 1
    # Zeros, but not going back far enough to show the whole idle window: not proof.
    assert decide(p, 2, [Sample(t, 0.0) for t in _ticks(-20, 0)], 0.0).desired == 1


def test_scale_to_zero_needs_the_policy_to_allow_it() -> None:
    d = decide(policy(), 3, [Sample(t, 0.0) for t in _ticks(-600, 0)], 0.0)
    assert d.desired == 2  # stable mode halves at most; min 1 keeps one later


def test_at_zero_stays_without_demand_and_starts_with_it() -> None:
    p = policy(min_replicas=0, scale_to_zero_after=30.0)
    assert decide(p, 0, [Sample(t, 0.0) for t in _ticks(-10, 0)], 0.0).desired == 0
    d = decide(p, 0, [Sample(-8.0, 0.0), Sample(-4.0, 120.0), Sample(-2.0, 120.0), Sample(0.0, 120.0)], 0.0)
    assert d.desired == 3 and d.panic  # 120 at target 50 is 2.4x one replica


def test_at_zero_the_traffic_from_before_the_idle_window_does_not_bring_it_back() -> None:
    """An idle window shorter than the stable window: the stable window still holds the
    demand from before the app went idle; at zero it must not count (it did: 1 -> 0 -> 1)."""
    p = policy(min_replicas=0, scale_to_zero_after=3.0, stable_window=6.0, panic_window=2.0, target=2.0)
    load = [Sample(-10 + i * 0.5, 1.0 if i <= 12 else 0.0) for i in range(21)]  # zeros from -3.5
    d = decide(p, 1, load, 0.0)
    assert d.desired == 0 and "scale to zero" in d.reason
    later = [*load, Sample(0.5, 0.0), Sample(1.0, 0.0)]
    assert decide(p, 0, later, 0.5, d).desired == 0
    assert decide(p, 0, later, 1.0, d).desired == 0
    # New demand at zero still starts it.
    assert decide(p, 0, [*later, Sample(1.5, 0.5)], 1.5, d).desired == 1


def test_no_samples_keeps_the_count_within_the_bounds() -> None:
    assert decide(policy(), 3, [], 0.0).desired == 3
    assert "no concurrency samples" in decide(policy(), 3, [], 0.0).reason
    assert decide(policy(max_replicas=2), 3, [], 0.0).desired == 2
    # Samples from the future or broken values are ignored, not averaged.
    bad = [Sample(5.0, 1000.0), Sample(-1.0, math.nan), Sample(-2.0, -5.0), Sample(-3.0, math.inf)]
    assert decide(policy(), 3, bad, 0.0).desired == 3


def test_the_maximum_caps_a_panic() -> None:
    d = decide(policy(max_replicas=3), 1, [Sample(t, 1000.0) for t in _ticks(-60, 0)], 0.0)
    assert d.desired == 3 and "held to max 3" in d.reason


def test_rps_and_cpu_use_their_own_default_targets() -> None:
    assert AutoscalePolicy(1, 5, metric="rps").target == 200.0
    cpu = AutoscalePolicy(1, 5, metric="cpu")
    assert decide(cpu, 1, [Sample(t, 2.1) for t in _ticks(-60, 0)], 0.0).desired == 3


# -- validation ---------------------------------------------------------------------------

@pytest.mark.parametrize(("fields", "field"), [
    ({"min_replicas": 5, "max_replicas": 2}, "min_replicas"),
    ({"max_replicas": 0, "min_replicas": 0, "scale_to_zero_after": 5.0}, "max_replicas"),
    ({"min_replicas": -1}, "min_replicas"),
    ({"min_replicas": 1.5}, "min_replicas"),
    ({"min_replicas": True}, "min_replicas"),
    ({"target": -1.0}, "target"),
    ({"target": 0}, "target"),
    ({"target": math.nan}, "target"),
    ({"target": math.inf}, "target"),
    ({"target": "50"}, "target"),
    ({"metric": "memory"}, "metric"),
    ({"stable_window": 0}, "stable_window"),
    ({"panic_window": -6}, "panic_window"),
    ({"panic_window": 90.0}, "panic_window"),
    ({"tolerance": 1.0}, "tolerance"),
    ({"panic_threshold": 1.05}, "panic_threshold"),
    ({"scale_down_rate": 1.0}, "scale_down_rate"),
    ({"min_replicas": 0}, "min_replicas"),
    ({"scale_to_zero_after": 30.0}, "scale_to_zero_after"),
    ({"min_replicas": 0, "scale_to_zero_after": 0.0}, "scale_to_zero_after"),
])
def test_bad_policies_are_refused_naming_the_field(fields: dict[str, Any], field: str) -> None:
    with pytest.raises(PolicyError) as err:
        policy(**fields)
    assert err.value.field == field and str(err.value).startswith(field + ":")


def test_policy_round_trips_and_refuses_unknown_fields() -> None:
    p = policy(metric="rps", min_replicas=0, scale_to_zero_after=300.0)
    assert AutoscalePolicy.from_value(p.to_value()) == p
    with pytest.raises(PolicyError, match="colour: unknown field"):
        AutoscalePolicy.from_value({**p.to_value(), "colour": "red"})
    with pytest.raises(PolicyError, match="max_replicas: missing"):
        AutoscalePolicy.from_value({"min_replicas": 1})


# -- properties ---------------------------------------------------------------------------

@st.composite
def policies(draw: st.DrawFn, min_at_least: int = 0) -> AutoscalePolicy:
    lo = draw(st.integers(min_at_least, 8))
    hi = draw(st.integers(max(lo, 1), 20))
    stable = draw(st.floats(6, 120))
    tolerance = draw(st.floats(0, 0.5))
    return AutoscalePolicy(
        min_replicas=lo, max_replicas=hi, metric=draw(st.sampled_from(["concurrency", "rps", "cpu"])),
        target=draw(st.floats(0.1, 500)), stable_window=stable, panic_window=draw(st.floats(1, stable)),
        panic_threshold=draw(st.floats(1.6, 4)), tolerance=tolerance, scale_down_rate=draw(st.floats(1.1, 10)),
        scale_to_zero_after=draw(st.floats(1, 300)) if lo == 0 else None,
    )


samples_st = st.lists(st.builds(Sample, st.floats(-400, 10), st.floats(allow_nan=True, allow_infinity=True)),
                      max_size=60)


@settings(max_examples=300, deadline=None)
@given(policies(), st.integers(0, 40), samples_st, st.booleans())
def test_never_outside_min_and_max(p: AutoscalePolicy, current: int, samples: list[Sample], chain: bool) -> None:
    previous = decide(p, current, samples, -TICK) if chain else None
    d = decide(p, current, samples, 0.0, previous)
    assert p.min_replicas <= d.desired <= p.max_replicas


@settings(max_examples=300, deadline=None)
@given(policies(min_at_least=1), st.data())
def test_never_changes_inside_the_tolerance_band(p: AutoscalePolicy, data: st.DataObject) -> None:
    current = data.draw(st.integers(p.min_replicas, p.max_replicas))
    band = p.tolerance * 0.999
    offsets = data.draw(st.lists(st.floats(-band, band), min_size=1, max_size=60))
    samples = [Sample(-i * TICK, p.per_replica * current * (1 + u)) for i, u in enumerate(offsets)]
    d = decide(p, current, samples, 0.0)
    assert d.desired == current, d.reason


@settings(max_examples=150, deadline=None)
@given(policies(), st.data())
def test_scale_down_never_faster_than_its_limit(p: AutoscalePolicy, data: st.DataObject) -> None:
    current = data.draw(st.integers(max(p.min_replicas, 1), p.max_replicas))
    loads = data.draw(st.lists(st.floats(0, p.per_replica * 30), min_size=1, max_size=120))
    samples: list[Sample] = []
    previous: Decision | None = None
    high: dict[float, int] = {}  # scale-down window (its start) -> the highest count in it
    for i, value in enumerate(loads):
        now = i * TICK
        samples.append(Sample(now, value))
        d = decide(p, current, samples, now, previous)
        window = high.setdefault(d.window_start, current)
        if d.desired < current and d.desired > 0:  # to zero is the idle rule's, not the rate's
            assert d.desired >= min(math.ceil(window / p.scale_down_rate - 1e-9), p.max_replicas), d.reason
        if d.desired == 0 and current > 0:  # going to zero (staying there has its own reason)
            assert "scale to zero" in d.reason
        high[d.window_start] = max(window, d.desired)
        previous, current = d, d.desired
