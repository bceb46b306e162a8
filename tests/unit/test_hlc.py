"""Hybrid logical clock: monotonic on one node, and past everything it has observed."""

from __future__ import annotations

import threading
from collections.abc import Callable

from hypothesis import given, settings
from hypothesis import strategies as st

from pleaco.store.hlc import HLC, Timestamp

NODE = "a" * 32


class FakeClock:
    """A wall clock in milliseconds that tests set by hand."""

    def __init__(self, ms: int = 1_000) -> None:
        self.ms = ms

    def __call__(self) -> int:
        return self.ms


def make_hlc(clock: Callable[[], int], node_id: str = NODE) -> HLC:
    return HLC(node_id, now_ms=clock)


def test_follows_the_wall_clock_when_it_moves_forward() -> None:
    clock = FakeClock(1_000)
    hlc = make_hlc(clock)
    assert hlc.now() == Timestamp(1_000, 0, NODE)
    clock.ms = 1_500
    assert hlc.now() == Timestamp(1_500, 0, NODE)


def test_clock_standing_still_bumps_the_counter() -> None:
    clock = FakeClock(1_000)
    hlc = make_hlc(clock)
    stamps = [hlc.now() for _ in range(5)]
    assert stamps == [Timestamp(1_000, i, NODE) for i in range(5)]


def test_clock_going_backwards_never_goes_backwards() -> None:
    clock = FakeClock(10_000)
    hlc = make_hlc(clock)
    first = hlc.now()
    clock.ms = 5  # NTP step far into the past
    second = hlc.now()
    third = hlc.now()
    assert first < second < third
    assert second.wall_ms == 10_000  # stays at the highest wall time seen
    clock.ms = 10_001
    fourth = hlc.now()
    assert fourth == Timestamp(10_001, 0, NODE)
    assert third < fourth


def test_timestamps_carry_the_node_id() -> None:
    hlc = make_hlc(FakeClock(), node_id="b" * 32)
    assert hlc.now().node_id == "b" * 32


@settings(max_examples=300, deadline=None)
@given(readings=st.lists(st.integers(min_value=0, max_value=10_000), min_size=1, max_size=60))
def test_timestamps_strictly_increase_for_any_clock(readings: list[int]) -> None:
    clock = FakeClock(readings[0])
    hlc = make_hlc(clock)
    previous: Timestamp | None = None
    for reading in readings:
        clock.ms = reading
        ts = hlc.now()
        if previous is not None:
            assert ts > previous
        # Never behind the physical clock.
        assert ts.wall_ms >= reading
        previous = ts


def test_observe_from_the_future_moves_past_it() -> None:
    clock = FakeClock(1_000)
    hlc = make_hlc(clock)
    remote = Timestamp(50_000, 7, "f" * 32)
    hlc.observe(remote)
    nxt = hlc.now()
    assert nxt > remote
    assert (nxt.wall_ms, nxt.counter) > (remote.wall_ms, remote.counter)


def test_observe_same_wall_higher_counter_moves_past_it() -> None:
    clock = FakeClock(1_000)
    hlc = make_hlc(clock)
    hlc.now()
    # A remote node with a lower id at the same millisecond and a higher counter: comparing
    # node ids alone would not be enough, the counter has to move past it.
    remote = Timestamp(1_000, 40, "0" * 32)
    hlc.observe(remote)
    nxt = hlc.now()
    assert (nxt.wall_ms, nxt.counter) > (remote.wall_ms, remote.counter)


def test_observe_from_the_past_does_not_rewind() -> None:
    clock = FakeClock(9_000)
    hlc = make_hlc(clock)
    before = hlc.now()
    hlc.observe(Timestamp(10, 0, "f" * 32))
    after = hlc.now()
    assert after > before


@settings(max_examples=300, deadline=None)
@given(
    steps=st.lists(
        st.tuples(
            st.integers(min_value=0, max_value=2_000),  # wall clock reading
            st.none() | st.tuples(st.integers(0, 2_000), st.integers(0, 50), st.sampled_from(["0" * 32, "f" * 32])),
        ),
        min_size=1,
        max_size=40,
    )
)
def test_now_exceeds_everything_issued_or_observed(
    steps: list[tuple[int, tuple[int, int, str] | None]],
) -> None:
    clock = FakeClock(0)
    hlc = make_hlc(clock)
    highest: tuple[int, int] = (-1, -1)
    for reading, remote in steps:
        clock.ms = reading
        if remote is not None:
            hlc.observe(Timestamp(*remote))
            highest = max(highest, remote[:2])
        ts = hlc.now()
        assert (ts.wall_ms, ts.counter) > highest
        highest = (ts.wall_ms, ts.counter)


def test_concurrent_callers_get_distinct_timestamps() -> None:
    hlc = make_hlc(FakeClock(1_000))  # a frozen clock forces every stamp through the counter
    results: list[Timestamp] = []
    lock = threading.Lock()

    def worker() -> None:
        mine = [hlc.now() for _ in range(500)]
        with lock:
            results.extend(mine)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 2_000
