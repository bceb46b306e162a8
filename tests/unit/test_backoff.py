"""Crash back-off: doubling delays with a cap, readiness, reset."""

from __future__ import annotations

from pleaco.reconcile.backoff import Backoff


def test_no_failures_no_delay() -> None:
    b = Backoff(base=1.0, maximum=60.0)
    assert b.delay() == 0.0
    assert b.ready(0.0)


def test_delays_double_up_to_the_cap() -> None:
    b = Backoff(base=1.5, maximum=20.0)
    delays = [b.fail(now=100.0) for _ in range(8)]
    assert delays == [1.5, 3.0, 6.0, 12.0, 20.0, 20.0, 20.0, 20.0]
    assert b.failures == 8
    assert all(isinstance(d, float) for d in delays)


def test_fail_sets_the_next_attempt() -> None:
    b = Backoff(base=2.0, maximum=60.0)
    assert b.fail(now=1000.0) == 2.0
    assert b.next_attempt == 1002.0
    assert b.fail(now=1002.5) == 4.0
    assert b.next_attempt == 1006.5


def test_ready_only_after_the_delay() -> None:
    b = Backoff(base=10.0, maximum=60.0)
    b.fail(now=50.0)
    assert not b.ready(50.0)
    assert not b.ready(59.999)
    assert b.ready(60.0)
    assert b.ready(1e9)


def test_reset_forgets_failures() -> None:
    b = Backoff(base=1.0, maximum=8.0)
    for _ in range(5):
        b.fail(now=500.0)
    assert not b.ready(501.0)
    b.reset()
    assert b.failures == 0
    assert b.delay() == 0.0
    assert b.ready(0.0)
    assert b.fail(now=10.0) == 1.0  # starts again from base


def test_base_above_max_is_capped() -> None:
    b = Backoff(base=100.0, maximum=30.0)
    assert b.fail(now=0.0) == 30.0


def test_many_failures_stay_capped() -> None:
    b = Backoff(base=1.0, maximum=60.0)
    for _ in range(1100):
        delay = b.fail(now=0.0)
    assert delay == 60.0
