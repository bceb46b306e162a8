"""The autoscaler's decision, in the style of Knative's KPA, as a pure function.

``decide(policy, current, samples, now, previous)`` answers how many replicas an app
should have, from a window of samples of one metric (each the cluster-wide total at one
moment: in-flight requests, requests per second, or CPU cores in use) and the decision
before it. It reads no clock, store or network, so it is tested over synthetic series and
the loop that calls it (the app's owner, a later session) only gathers samples and writes
the answer.

What is kept from Knative's KPA (serving pkg/autoscaler/scaling/autoscaler.go, Scale):

- a target per replica: the wanted count is about average / target, rounded up (within
  the tolerance, below), over a stable window (default 60 s) and over a panic window
  (default 6 s);
- panic: entered when the replicas the panic window's demand wants are at least
  ``panic_threshold`` (2.0) times the replicas serving (KPA's ``dppc / readyPodsCount >=
  PanicThreshold``, with the want rounded up as KPA's ``dppc`` is; see below for what
  "serving" is here), and the load is outside the tolerance band of what serves (rounding
  alone never panics); while in panic the count takes the larger of the two windows' wants
  and never goes down; panic ends once the demand has stayed under the threshold for a
  whole stable window (KPA's ``panicTime + StableWindow``);
- a scale-down rate (``scale_down_rate``, KPA's max-scale-down-rate, default 2.0): the
  count may fall at most to ``ceil(count / rate)``;
- no samples, no decision: the count stays (KPA returns an invalid result on ErrNoData).

What is changed, and why:

- KPA keeps its panic state (panic start, highest panic count) in the autoscaler object,
  which is lost when the autoscaler restarts. Here it travels in the ``Decision``: the
  caller hands the previous one back, and the loop records each decision in the store,
  so when an app's owner dies the next owner continues the same panic and the same
  scale-down window, with no gap and no second opinion.
- The scale-down limit is over a sliding stable window, not per decision tick: the count
  never falls below ceil(highest count in force in the last stable window / rate), so a
  count of 16 takes four windows, not four 2-second ticks, to reach 1. KPA's per-tick
  limit lets the stable average's slow fall drive a fast cascade. (A fixed window, tried
  first, let 4 -> 3 -> 2 -> 1 through in 4.6 s with a 6 s window: 4 -> 2 at the end of one
  window, 2 -> 1 at the start of the next.) The counts in force over the last stable
  window travel in the ``Decision`` (``counts``).
- "The replicas serving", which the panic threshold is measured against, is the lowest
  count in force during the last panic window (at least 1), not the count now: a count
  raised within the panic window is not serving yet (its containers are starting). KPA
  uses its ready pods for this. Without it, a stable-window decision 2 -> 3 taken while an
  exact 2x step fills the panic window moved the bar to 2x of 3, which that load never
  reaches: 4 replicas came only after the 60 s stable window (55.6 s in the benchmark).
  The ready count of the load reports is not used: it lags a report interval and reads 0
  while an app is first deployed, which would panic on every fresh deploy.
- The panic window's average weighs each sample by its recency (linearly, from 1 for
  now to 0 at the window's start); the stable window's is plain. The samples are already
  smoothed and late (pleaco.ingress.traffic counts a request when it ends and averages 2 s
  of them, then a load report every 1-2 s carries the figure): with a plain average an exact
  2x step reached the panic bar only when the window was more than half full of samples
  that were themselves seconds old (9.9-11.3 s from the step to 4 healthy replicas in the
  benchmark, against the goal of the 6 s panic window plus the start). With the weights a
  sustained step crosses it once about 30-40 % of the window holds it. A single high
  sample weighs more too, but a spike still needs the same 2x of the serving count to
  panic, and the stable window keeps the count from following noise.
- The count a demand wants rounds up only past ``tolerance`` of one replica's worth:
  ``ceil(demand / target - tolerance)``, not KPA's ``ceil(demand / target)``. A load of
  8.06 requests in flight at a target of 2 (requests of 1.0075 s at 8 per second) is 4
  replicas and 3 % of one; KPA's rounding took 5 (the overshoot the benchmark measured).
  The count chosen leaves each replica at most ``tolerance / count`` above the target,
  inside the band below, so the band then keeps it. (Rounding within the band per replica,
  ``ceil(demand / (target * (1 + tolerance)))``, was tried first: 7 in flight at a target
  of 2 then needed an average of 6.6 before a 4th replica, which a load measured a little
  under its true figure reached only through the stable window.)
- A tolerance band (HPA's, default 10 %): in stable mode, no change while the stable
  average per replica is within ``tolerance`` of the target; in panic, no increase while
  both averages per replica are at most ``tolerance`` above it (a load step measured 10 %
  high while its new containers start took a 5th replica for 4 replicas' worth). KPA has none; it relies on
  rounding, which flaps around integer boundaries under noisy load.
- Scale to zero is decided here too (in Knative it is the KPA reconciler's, with a grace
  period): only with ``min_replicas`` 0 and ``scale_to_zero_after`` set, outside panic, and
  only when the samples cover the whole idle window and every one in it is zero. It is
  not held back by the scale-down rate: zero demand for the whole window is explicit.
  With ``min_replicas`` 0 and some demand (or no proof of idleness) the count stays at
  least 1; an app at 0 stays at 0 until demand shows in the samples of the last
  min(panic window, idle window) seconds (older ones predate the idleness).
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
# More replicas than any policy allows (a policy's max is a store count, far below).
_TOO_MANY = 2**53


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
    panic_threshold: float = 2.0  # wanted replicas per replica serving (Knative's 200 %)
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
    # The counts in force over the last stable window, each with the time it came into
    # force, oldest first (the first was already in force when the window began). The
    # scale-down limit takes their highest, the panic bar their lowest in the panic window.
    counts: tuple[tuple[float, int], ...] = ()

    def to_value(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_state(cls, reason: str, state: dict[str, Any]) -> Decision:
        """A decision from its stored form (``to_value`` without the reason); ValueError,
        TypeError or KeyError when it is not one (a record from an incompatible version)."""
        counts = tuple((float(at), int(count)) for at, count in state.get("counts", ()))
        panic_last = state["panic_last"]
        return cls(desired=int(state["desired"]), reason=reason, panic=bool(state["panic"]),
                   panic_last=None if panic_last is None else float(panic_last), counts=counts)


# Count changes kept in a Decision (its ``counts``): the record travels in one gossip
# packet. More changes than this within one stable window (a count set by hand again and
# again) merge the oldest two into the higher, which only makes the scale-down limit
# stricter.
COUNTS_KEPT = 8
# The reason of the activator's wake (0 -> 1) in the decision history.
WAKE_REASON = "request while at zero"


def _replicas_for(demand: float, target: float, tolerance: float) -> int:
    """The replicas ``demand`` needs at ``target`` each, rounded up past ``tolerance`` of
    one; at least 1 for any demand (0 is the idle rule's alone), and more than any
    ``max_replicas`` for a demand too large for a float's range."""
    if demand <= 0:
        return 0
    wanted = demand / target - tolerance
    return max(1, math.ceil(wanted - _EPSILON)) if wanted < _TOO_MANY else _TOO_MANY


def _average(samples: Sequence[Sample], now: float, window: float) -> float | None:
    values = [s.value for s in samples if now - window < s.at <= now]
    return sum(values) / len(values) if values else None


def _recent_average(samples: Sequence[Sample], now: float, window: float) -> float | None:
    """The average over the window, each sample weighted by its recency: 1 now, falling
    linearly to 0 at the window's start (the panic window's; see above)."""
    weighted = [(1 - (now - s.at) / window, s.value) for s in samples if now - window < s.at <= now]
    total = sum(w for w, _ in weighted)
    return sum(w * v for w, v in weighted) / total if total > 0 else None


def _in_force(previous: Decision | None, current: int, now: float, window: float) -> list[tuple[float, int]]:
    """The counts in force over the last ``window`` seconds, ending with ``current`` (a
    count set by hand since the previous decision counts from now)."""
    counts = list(previous.counts) if previous is not None else []
    if not counts or counts[-1][1] != current:
        counts.append((now, current))
    while len(counts) > 1 and counts[1][0] <= now - window:
        del counts[0]  # ended before the window began
    return counts


def _kept(counts: list[tuple[float, int]]) -> tuple[tuple[float, int], ...]:
    """At most COUNTS_KEPT counts: the oldest two merged into the higher while more."""
    while len(counts) > COUNTS_KEPT:
        counts[0:2] = [(counts[1][0], max(counts[0][1], counts[1][1]))]
    return tuple(counts)


def woken(policy: AutoscalePolicy, previous: Decision | None, now: float) -> Decision:
    """The decision the activator (pleaco.ingress.activator) records when a request comes
    for an app at zero and it sets the count to 1: it is not ``decide``'s (the demand is a
    held request the samples do not show yet), but it goes into the same history, and the
    count it starts is one the scale-down limit then counts."""
    counts = _in_force(previous, 0, now, policy.stable_window)
    return Decision(1, WAKE_REASON, False, None, _kept([*counts, (now, 1)]))


def _lowest_since(counts: Sequence[tuple[float, int]], since: float) -> int:
    """The lowest count in force at some moment after ``since``."""
    ends = [at for at, _ in counts[1:]] + [math.inf]
    return min(count for (_, count), end in zip(counts, ends, strict=True) if end > since)


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
    counts = _in_force(previous, current, now, policy.stable_window)

    def done(desired: int, reason: str, panic_last: float | None = None) -> Decision:
        # 0 comes only from the idle rule or an app at 0 without demand (see above).
        bounded = min(max(desired, policy.min_replicas), policy.max_replicas)
        if bounded != desired:
            which = f"max {policy.max_replicas}" if bounded < desired else f"min {policy.min_replicas}"
            reason += f"; held to {which}"
        kept = [*counts, (now, bounded)] if bounded != current else counts
        return Decision(bounded, reason, panic_last is not None, panic_last, _kept(kept))

    stable = _average(samples, now, policy.stable_window)
    if stable is None:
        # No figures: keep the count (within bounds), and whatever panic was under way.
        keep = previous.panic_last if previous is not None else None
        return done(current, f"no {unit} samples in the last {_fmt(policy.stable_window)}s: keeping {current}", keep)
    panic_avg = _recent_average(samples, now, policy.panic_window)
    if panic_avg is None:
        panic_avg = stable
    if current == 0 and policy.scale_to_zero_after is not None:
        # At zero only the demand since the app went idle counts: with an idle window
        # shorter than the stable (or panic) window, those windows still hold the traffic
        # from before it, which would bring the app straight back (a flap seen in
        # tests/integration/test_autoscale.py). The last min(panic, idle) seconds were all
        # zero when the app went to zero, so any demand in them is new.
        recent = _average(samples, now, min(policy.panic_window, policy.scale_to_zero_after))
        stable = panic_avg = recent if recent is not None else 0.0
    want_stable = _replicas_for(stable, target, policy.tolerance)
    want_panic = _replicas_for(panic_avg, target, policy.tolerance)
    serving = max(1, _lowest_since(counts, now - policy.panic_window))
    ratio = want_panic / serving

    panic_last: float | None = None
    # Over the bar, and outside the tolerance band of what is serving: rounding alone (a
    # load inside the band of 2 replicas wants 3 of them) never panics.
    if ratio >= policy.panic_threshold and panic_avg > target * serving * (1 + policy.tolerance):
        panic_last = now
    elif previous is not None and previous.panic_last is not None and now - previous.panic_last < policy.stable_window:
        panic_last = previous.panic_last

    if panic_last is not None:
        held = previous.desired if previous is not None and previous.panic else 0
        desired = max(want_stable, want_panic, held, current)
        if max(stable, panic_avg) <= target * max(1, current) * (1 + policy.tolerance):
            # What runs already serves the load within the band: no more (a request or two
            # slowed by the containers starting is not a reason for another replica).
            desired = max(held, current)
        if panic_last == now:
            reason = (f"panic: {_fmt(policy.panic_window)}s average {_fmt(panic_avg)} {unit} wants {want_panic}, "
                      f"{ratio:.2f}x the {serving} replica(s) serving, at {_fmt(target)} each: {desired}")
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
        high = max(count for _, count in counts)
        lowest = math.ceil(high / policy.scale_down_rate - _EPSILON)
        if desired < lowest:
            desired = lowest
            reason += (f"; down to {lowest} at most (1/{_fmt(policy.scale_down_rate)} of {high}, the highest "
                       f"in the last {_fmt(policy.stable_window)}s)")
    return done(desired, reason)
