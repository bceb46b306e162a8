"""The autoscaler's decision, in the style of Knative's KPA, as a pure function.

``decide(policy, current, samples, now, previous)`` answers how many replicas an app
should have, from a window of samples of one metric (each the cluster-wide total at one
moment: in-flight requests, requests per second, or CPU cores in use) and the decision
before it. It reads no clock, store or network, so it is tested over synthetic series and
the loop that calls it (the app's owner, a later session) only gathers samples and writes
the answer.

What is kept from Knative's KPA (serving pkg/autoscaler/scaling/autoscaler.go, Scale):

- a target per replica: the wanted count is ceil(average / target), over a stable window
  (default 60 s) and over a panic window (default 6 s);
- panic: entered when the panic window's demand is at least ``panic_threshold`` (2.0)
  times what the current replicas serve at the target (``panic_average / (target *
  max(1, current))``: KPA's ``dppc / readyPodsCount``, before rounding up); while in panic
  the count takes the larger of the two windows' wants and never goes down; panic ends
  once the demand has stayed under the threshold for a whole stable window (KPA's
  ``panicTime + StableWindow``);
- a scale-down rate (``scale_down_rate``, KPA's max-scale-down-rate, default 2.0): the
  count may fall at most to ``ceil(count / rate)``;
- no samples, no decision: the count stays (KPA returns an invalid result on ErrNoData).

What is changed, and why:

- KPA keeps its panic state (panic start, highest panic count) in the autoscaler object,
  which is lost when the autoscaler restarts. Here it travels in the ``Decision``: the
  caller hands the previous one back, and the loop records each decision in the store,
  so when an app's owner dies the next owner continues the same panic and the same
  scale-down window, with no gap and no second opinion.
- The scale-down limit is per stable window, not per decision tick: within one window
  the count never falls below ceil(highest count of the window / rate), so a count of 16
  takes four windows, not four 2-second ticks, to reach 1. KPA's per-tick limit lets the
  stable average's slow fall drive a fast cascade.
- A tolerance band (HPA's, default 10 %): in stable mode, no change while the stable
  average per replica is within ``tolerance`` of the target. KPA has none; it relies on
  rounding, which flaps around integer boundaries under noisy load.
- Scale to zero is decided here too (in Knative it is the KPA reconciler's, with a grace
  period): only with ``min_replicas`` 0 and ``scale_to_zero_after`` set, outside panic, and
  only when the samples cover the whole idle window and every one in it is zero. It is
  not held back by the scale-down rate: zero demand for the whole window is explicit.
  With ``min_replicas`` 0 and some demand (or no proof of idleness) the count stays at
  least 1; an app at 0 stays at 0 until demand shows in the samples.
- A scale-down must be wanted by both windows: never below what the panic window's load
  needs. After a panic ends during a steady ramp, KPA's stable average (lagging the ramp by
  half a window) brings the count down while the load still rises, and the next panic
  takes it up again.
- Not kept: the activation scale, target burst capacity and excess burst capacity (the
  activator comes with scale to zero), the scale-up rate limit (max-scale-up-rate 1000
  never binds at pleaco's sizes: ``max_replicas`` does), and the scale-down delay.
- Samples that are negative, NaN or infinite, or later than ``now``, are ignored: a broken
  metric must not make a wild decision.

The bounds always win: the answer is within [min_replicas, max_replicas] whatever the
samples, the previous decision or the current count say.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

from pleaco.errors import InvalidInput

METRICS = ("concurrency", "rps", "cpu")
# The target per replica when none is given: Knative's defaults for concurrency
# (container-concurrency-target-default) and requests per second (rps target 200); for CPU,
# 0.7 cores in use per replica, HPA's customary 70 % of one core.
DEFAULT_TARGETS = {"concurrency": 100.0, "rps": 200.0, "cpu": 0.7}
# Rounding noise in averages must not turn 2.0000000001 replicas' worth into 3.
_EPSILON = 1e-9


class PolicyError(InvalidInput, ValueError, code="invalid_autoscale"):
    """An autoscale setting that is out of range or inconsistent; the message names it."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise PolicyError(name, f"expected a number, got {value!r}")
    if not math.isfinite(value):
        raise PolicyError(name, f"must be a finite number, got {value!r}")
    return float(value)


def _count(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise PolicyError(name, f"expected a whole number, got {value!r}")
    if value < 0:
        raise PolicyError(name, f"must be at least 0, got {value}")
    return value


@dataclass(frozen=True)
class AutoscalePolicy:
    """How one app scales. Validated on construction: a bad one raises PolicyError naming
    the field, so a policy that exists is one ``decide`` can use."""

    min_replicas: int
    max_replicas: int
    metric: str = "concurrency"
    # Per replica, in the metric's unit; None: the metric's default (DEFAULT_TARGETS).
    target: float | None = None
    stable_window: float = 60.0  # seconds (Knative's stable-window)
    panic_window: float = 6.0  # seconds (Knative's 10 % of the stable window)
    panic_threshold: float = 2.0  # times the current capacity (Knative's 200 %)
    tolerance: float = 0.1  # HPA's 10 %
    scale_down_rate: float = 2.0  # Knative's max-scale-down-rate
    scale_to_zero_after: float | None = None  # seconds of zero demand; None: never to zero

    def __post_init__(self) -> None:
        lo = _count("min_replicas", self.min_replicas)
        hi = _count("max_replicas", self.max_replicas)
        if hi < 1:
            raise PolicyError("max_replicas", "must be at least 1")
        if lo > hi:
            raise PolicyError("min_replicas", f"{lo} is above max_replicas {hi}")
        if self.metric not in METRICS:
            raise PolicyError("metric", f"{self.metric!r} is not one of {', '.join(METRICS)}")
        if self.target is None:
            object.__setattr__(self, "target", DEFAULT_TARGETS[self.metric])
        elif _number("target", self.target) <= 0:
            raise PolicyError("target", f"must be greater than 0, got {self.target!r}")
        for name in ("target", "stable_window", "panic_window", "panic_threshold", "tolerance", "scale_down_rate",
                     "scale_to_zero_after"):
            value = getattr(self, name)
            if isinstance(value, int) and not isinstance(value, bool):
                object.__setattr__(self, name, float(value))  # 50 and 50.0 are one policy
        for name in ("stable_window", "panic_window"):
            if _number(name, getattr(self, name)) <= 0:
                raise PolicyError(name, f"must be greater than 0 seconds, got {getattr(self, name)!r}")
        if self.panic_window > self.stable_window:
            raise PolicyError("panic_window", f"{self.panic_window:g} s is longer than the stable window "
                                              f"({self.stable_window:g} s)")
        tolerance = _number("tolerance", self.tolerance)
        if not 0 <= tolerance < 1:
            raise PolicyError("tolerance", f"must be at least 0 and below 1, got {tolerance}")
        if _number("panic_threshold", self.panic_threshold) <= 1 + tolerance:
            raise PolicyError("panic_threshold", f"must be above 1 + tolerance ({1 + tolerance}), else a load "
                                                 "inside the tolerance band would panic")
        if _number("scale_down_rate", self.scale_down_rate) <= 1:
            raise PolicyError("scale_down_rate", f"must be above 1 (1 would never scale down), "
                                                 f"got {self.scale_down_rate}")
        if self.scale_to_zero_after is not None and _number("scale_to_zero_after", self.scale_to_zero_after) <= 0:
            raise PolicyError("scale_to_zero_after", f"must be greater than 0 seconds, got {self.scale_to_zero_after}")
        if lo == 0 and self.scale_to_zero_after is None:
            raise PolicyError("min_replicas", "0 scales the app to zero: give scale_to_zero_after too")
        if lo > 0 and self.scale_to_zero_after is not None:
            raise PolicyError("scale_to_zero_after", f"needs min_replicas 0 (it is {lo})")

    @property
    def per_replica(self) -> float:
        assert self.target is not None  # set in __post_init__
        return self.target

    def to_value(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_value(cls, value: dict[str, Any]) -> AutoscalePolicy:
        """A policy from its stored form (or an API body with these names); PolicyError on
        an unknown field, as on any bad value."""
        if not isinstance(value, dict):
            raise PolicyError("autoscale", "expected an object")
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(value) - known)
        if unknown:
            raise PolicyError(unknown[0], f"unknown field (allowed: {', '.join(sorted(known))})")
        for required in ("min_replicas", "max_replicas"):
            if required not in value:
                raise PolicyError(required, "missing")
        return cls(**value)


class Sample(NamedTuple):
    """The cluster-wide total of the metric at one moment (seconds, any clock ``now`` uses)."""

    at: float
    value: float


@dataclass(frozen=True)
class Decision:
    """How many replicas, why, and the state the next decision continues from."""

    desired: int
    reason: str
    panic: bool
    # The last time the panic window was over the threshold (None: not panicking).
    panic_last: float | None = None
    # The scale-down window: when it began and the highest count seen in it.
    window_start: float = 0.0
    window_high: int = 0

    def to_value(self) -> dict[str, Any]:
        return asdict(self)


def _replicas_for(demand: float, target: float) -> int:
    return max(0, math.ceil(demand / target - _EPSILON))


def _average(samples: Sequence[Sample], now: float, window: float) -> float | None:
    values = [s.value for s in samples if now - window < s.at <= now]
    return sum(values) / len(values) if values else None


def _fmt(x: float) -> str:
    return f"{x:.3g}"


def decide(policy: AutoscalePolicy, current: int, samples: Sequence[Sample], now: float,
           previous: Decision | None = None) -> Decision:
    """The replica count ``policy`` wants now. ``current`` is the count in force (the
    desired count last written), ``samples`` the metric's recent history (covering at
    least the stable window, and ``scale_to_zero_after`` when set), ``previous`` the
    decision before this one (None: the first, or after a policy change)."""
    samples = [s for s in samples if math.isfinite(s.at) and math.isfinite(s.value) and s.value >= 0 and s.at <= now]
    target, unit = policy.per_replica, policy.metric
    # The scale-down window: continue the previous one while it lasts, else start one now.
    if previous is not None and now - previous.window_start < policy.stable_window:
        window_start, window_high = previous.window_start, max(previous.window_high, current)
    else:
        window_start, window_high = now, current

    def done(desired: int, reason: str, panic_last: float | None = None) -> Decision:
        # 0 comes only from the idle rule or an app at 0 without demand (see above).
        bounded = min(max(desired, policy.min_replicas), policy.max_replicas)
        if bounded != desired:
            which = f"max {policy.max_replicas}" if bounded < desired else f"min {policy.min_replicas}"
            reason += f"; held to {which}"
        return Decision(bounded, reason, panic_last is not None, panic_last, window_start, window_high)

    stable = _average(samples, now, policy.stable_window)
    if stable is None:
        # No figures: keep the count (within bounds), and whatever panic was under way.
        keep = previous.panic_last if previous is not None else None
        return done(current, f"no {unit} samples in the last {_fmt(policy.stable_window)}s: keeping {current}", keep)
    panic_avg = _average(samples, now, policy.panic_window)
    if panic_avg is None:
        panic_avg = stable
    want_stable = _replicas_for(stable, target)
    want_panic = _replicas_for(panic_avg, target)
    capacity = max(1, current)
    ratio = panic_avg / (target * capacity)

    panic_last: float | None = None
    if ratio >= policy.panic_threshold:
        panic_last = now
    elif previous is not None and previous.panic_last is not None and now - previous.panic_last < policy.stable_window:
        panic_last = previous.panic_last

    if panic_last is not None:
        held = previous.desired if previous is not None and previous.panic else 0
        desired = max(want_stable, want_panic, held, current)
        if panic_last == now:
            reason = (f"panic: {_fmt(policy.panic_window)}s average {_fmt(panic_avg)} {unit} is "
                      f"{ratio:.2f}x what {capacity} replica(s) serve at {_fmt(target)} each: {desired}")
        else:
            reason = (f"panic since a surge {_fmt(now - panic_last)}s ago (ends after "
                      f"{_fmt(policy.stable_window)}s under {policy.panic_threshold}x): holding {desired}, "
                      "never down in panic")
        return done(desired, reason, panic_last)

    # Stable mode.
    if policy.scale_to_zero_after is not None and policy.min_replicas == 0 and current > 0:
        idle_from = now - policy.scale_to_zero_after
        covered = any(s.at <= idle_from for s in samples)
        if covered and all(s.value == 0 for s in samples if s.at > idle_from):
            return done(0, f"no {unit} for {_fmt(policy.scale_to_zero_after)}s: scale to zero")
    if current == 0:
        if want_stable == 0 and want_panic == 0:
            return done(0, f"no {unit}: staying at zero")
        desired = max(want_stable, want_panic)
        return done(desired, f"{_fmt(max(stable, panic_avg))} {unit} at zero replicas: {desired}")
    per_replica = stable / current
    if abs(per_replica / target - 1) <= policy.tolerance:
        return done(current, f"{_fmt(per_replica)} {unit} per replica is within {policy.tolerance:.0%} of the "
                             f"target {_fmt(target)}: keeping {current}")
    desired = want_stable
    reason = (f"{_fmt(policy.stable_window)}s average {_fmt(stable)} {unit} at {_fmt(target)} per replica: "
              f"{desired}")
    if desired < current and want_panic > desired:
        # The load of the last seconds needs more than the stable average says (it rises):
        # going down now would only go up again.
        desired = min(current, want_panic)
        reason += f"; the last {_fmt(policy.panic_window)}s need {want_panic}: {desired}"
    if desired < current:
        lowest = math.ceil(window_high / policy.scale_down_rate - _EPSILON)
        if desired < lowest:
            desired = lowest
            reason += (f"; down to {lowest} at most (1/{_fmt(policy.scale_down_rate)} of {window_high} "
                       f"per {_fmt(policy.stable_window)}s window)")
    return done(desired, reason)
