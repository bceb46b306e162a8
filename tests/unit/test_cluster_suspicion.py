"""Lifeguard suspicion: memberlist's bounds, and a timeout that shrinks with independent confirmations."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pleaco.cluster.suspicion import Suspicion, suspicion_bounds


def memberlist_bounds(mult: int, max_mult: int, n: int, interval: float) -> tuple[float, float]:
    # memberlist suspicionTimeout(): nodeScale = max(1, log10(max(1, n))); min = mult*scale*interval.
    scale = max(1.0, math.log10(max(1.0, float(n))))
    low = mult * scale * interval
    return low, low * max_mult


@pytest.mark.parametrize(("mult", "max_mult", "n", "interval", "low", "high"), [
    (4, 6, 0, 1.0, 4.0, 24.0),
    (4, 6, 1, 1.0, 4.0, 24.0),
    (4, 6, 5, 1.0, 4.0, 24.0),
    (4, 6, 10, 1.0, 4.0, 24.0),
    (4, 6, 100, 1.0, 8.0, 48.0),
    (4, 6, 1000, 0.5, 6.0, 36.0),
    (5, 2, 10_000, 0.2, 4.0, 8.0),
])
def test_bounds_known_values(mult: int, max_mult: int, n: int, interval: float, low: float, high: float) -> None:
    got = suspicion_bounds(mult, max_mult, n, interval)
    assert got == pytest.approx((low, high))


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.integers(1, 10), st.integers(1, 10), st.integers(-5, 100_000), st.floats(0.01, 10))
def test_bounds_match_memberlist(mult: int, max_mult: int, n: int, interval: float) -> None:
    low, high = suspicion_bounds(mult, max_mult, n, interval)
    assert (low, high) == pytest.approx(memberlist_bounds(mult, max_mult, n, interval))
    assert low <= high


def test_bounds_grow_with_cluster_size() -> None:
    lows = [suspicion_bounds(4, 6, n, 1.0)[0] for n in (10, 50, 100, 500, 1000)]
    assert lows == sorted(lows) and lows[0] < lows[-1]


def test_timeout_starts_at_max_and_reaches_min_after_k_confirmations() -> None:
    s = Suspicion(start=100.0, low=4.0, high=24.0, k=3, source="accuser")
    assert s.timeout() == 24.0
    assert s.deadline() == 124.0
    timeouts = []
    for who in ("b", "c", "d"):
        assert s.confirm(who) is True
        timeouts.append(s.timeout())
    assert timeouts[0] < 24.0
    assert timeouts == sorted(timeouts, reverse=True)
    assert timeouts[-1] == pytest.approx(4.0)
    assert s.deadline() == pytest.approx(104.0)
    # Lifeguard's formula in between.
    assert timeouts[0] == pytest.approx(24.0 - 20.0 * math.log(2) / math.log(4))
    assert timeouts[1] == pytest.approx(24.0 - 20.0 * math.log(3) / math.log(4))


def test_more_than_k_confirmations_change_nothing() -> None:
    s = Suspicion(0.0, 4.0, 24.0, k=2, source="a")
    assert s.confirm("b") and s.confirm("c")
    assert s.confirm("d") is False
    assert s.timeout() == pytest.approx(4.0)


def test_the_accuser_and_duplicates_are_not_confirmations() -> None:
    s = Suspicion(0.0, 4.0, 24.0, k=3, source="accuser")
    assert s.confirm("accuser") is False
    assert s.timeout() == 24.0
    assert s.confirm("b") is True
    after_one = s.timeout()
    assert s.confirm("b") is False
    assert s.timeout() == after_one
    assert s.confirmations == {"b"}


@pytest.mark.parametrize("k", [0, -1])
def test_k_below_one_means_min(k: int) -> None:
    s = Suspicion(10.0, 4.0, 24.0, k=k, source="a")
    assert s.timeout() == 4.0
    assert s.deadline() == 14.0
    assert s.confirm("b") is False
    assert s.timeout() == 4.0


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.integers(1, 20), st.floats(0.1, 100), st.floats(1, 10), st.lists(st.sampled_from("abcdefghij"), max_size=40))
def test_timeout_stays_between_bounds_and_never_grows(k: int, low: float, factor: float, confirms: list[str]) -> None:
    s = Suspicion(0.0, low, low * factor, k, source="a")
    last = s.timeout()
    assert last == pytest.approx(low * factor)
    for who in confirms:
        s.confirm(who)
        now = s.timeout()
        assert low - 1e-9 <= now <= last + 1e-9
        last = now
    if len(set(confirms) - {"a"}) >= k:
        assert last == pytest.approx(low)
