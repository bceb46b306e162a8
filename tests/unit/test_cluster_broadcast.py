"""The piggyback queue: byte budget, least-sent first, retransmit limit, replacement by key."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pleaco.cluster.broadcast import BroadcastQueue


def queue_of(n_nodes: int = 1, mult: int = 2) -> BroadcastQueue:
    return BroadcastQueue(mult, lambda: n_nodes)


def test_empty_queue() -> None:
    q = queue_of()
    assert len(q) == 0
    assert q.take(1000) == []


@pytest.mark.parametrize(("n", "expected"), [
    (0, 1), (1, 1), (8, 1), (9, 1), (10, 2), (98, 2), (99, 2), (100, 3), (999, 3), (1000, 4), (10**6, 7),
])
def test_limit_grows_with_log10_of_n_plus_one(n: int, expected: int) -> None:
    assert queue_of(n, mult=4).limit() == 4 * expected
    assert expected == max(1, math.ceil(math.log10(n + 1)))


def test_limit_follows_the_current_cluster_size() -> None:
    size = [1]
    q = BroadcastQueue(3, lambda: size[0])
    assert q.limit() == 3
    size[0] = 50
    assert q.limit() == 6


def test_take_respects_the_byte_budget() -> None:
    q = queue_of(mult=10)
    for i in range(10):
        q.queue(f"k{i}", f"p{i}", 99)
    got = q.take(1000, per_item_overhead=1)  # 100 bytes each with the overhead
    assert len(got) == 10
    q2 = queue_of(mult=10)
    for i in range(10):
        q2.queue(f"k{i}", f"p{i}", 99)
    assert len(q2.take(399, per_item_overhead=1)) == 3
    assert q2.take(99, per_item_overhead=1) == []  # one item would need 100 bytes
    assert q2.take(0) == []


def test_items_too_big_are_skipped_but_smaller_ones_still_go() -> None:
    q = queue_of(mult=5)
    q.queue("small", "s", 10)
    q.queue("big", "b", 500)  # newest, so tried first, but it does not fit
    assert q.take(100) == ["s"]
    assert len(q) == 2  # the big one waits for a packet with room
    assert q.take(1000)[0] == "b"  # sent fewer times, so first now


def test_least_transmitted_first_then_newest() -> None:
    q = queue_of(mult=10)
    q.queue("a", "A", 10)
    q.queue("b", "B", 10)
    assert q.take(1000) == ["B", "A"]  # both sent 0 times: newest first
    q.queue("c", "C", 10)
    assert q.take(1000) == ["C", "B", "A"]  # C has been sent least
    assert q.take(11) == ["C"]  # room for exactly one: the least sent


def test_an_item_is_dropped_after_limit_sends() -> None:
    q = queue_of(n_nodes=10, mult=3)  # limit 3 * ceil(log10(11)) = 6
    assert q.limit() == 6
    q.queue("k", "payload", 10)
    sends = 0
    while q.take(1000):
        sends += 1
        assert sends <= 100
    assert sends == 6
    assert len(q) == 0


def test_queue_under_an_existing_key_replaces_the_item() -> None:
    q = queue_of(mult=2)
    q.queue("m:node1", "old", 10)
    assert q.take(1000) == ["old"]  # sent once
    q.queue("m:node1", "new", 20)
    assert len(q) == 1
    # The replacement starts with a fresh count: it goes out limit() more times.
    assert q.take(1000) == ["new"]
    assert q.take(1000) == ["new"]
    assert q.take(1000) == []


@settings(max_examples=200, deadline=None, derandomize=True)
@given(
    st.integers(1, 5), st.integers(0, 2000),
    st.lists(st.tuples(st.sampled_from("abcdefgh"), st.integers(0, 300)), max_size=30),
    st.lists(st.integers(0, 1500), min_size=1, max_size=40),
)
def test_budget_and_limit_hold_for_any_schedule(mult: int, n: int, items: list[tuple[str, int]],
                                                budgets: list[int]) -> None:
    q = BroadcastQueue(mult, lambda: n)
    sizes: dict[int, int] = {}
    sent: dict[int, int] = {}
    for serial, (key, size) in enumerate(items):
        q.queue(key, serial, size)
        sizes[serial] = size
    for budget in budgets:
        got = q.take(budget, per_item_overhead=2)
        assert sum(sizes[p] + 2 for p in got) <= budget
        assert len(got) == len(set(got))
        for p in got:
            sent[p] = sent.get(p, 0) + 1
    assert all(count <= q.limit() for count in sent.values())
    # Only the newest item per key is ever sent.
    newest = {key: serial for serial, (key, _) in enumerate(items)}
    assert set(sent) <= set(newest.values())
    assert len(q) <= len(newest)
